# Launching dsmoe as HPC users do (tests/launch/*.sh, inputs/ci-short.deck on 4 ranks, a few seconds
# each): mpiexec and a singleton, the PBS job script in a PBS job's environment, the local mpirun
# script, and srun / sbatch in a real single-node Slurm that a fixture starts (scripts/slurm-local) and
# stops. The Slurm tests skip (77) where Slurm cannot run (not root, packages not installable).
set(DSMOE_LAUNCH_DIR ${CMAKE_CURRENT_LIST_DIR})

function(dsmoe_launch_test name script)
  add_test(NAME ${name} COMMAND bash ${DSMOE_LAUNCH_DIR}/${script} $<TARGET_FILE:dsmoe> ${PROJECT_SOURCE_DIR} ${ARGN})
  set_tests_properties(${name} PROPERTIES TIMEOUT 120 SKIP_RETURN_CODE 77 LABELS launch RESOURCE_LOCK dsmoe_ranks)
endfunction()

dsmoe_launch_test(launch_mpiexec mpiexec.sh ${DSMOE_MPIEXEC} ${DSMOE_MPIEXEC_PREFLAGS})
dsmoe_launch_test(launch_pbs pbs.sh)
dsmoe_launch_test(launch_local local.sh)

# The local Slurm: started once for both Slurm tests, stopped (by PID) only if this run started it.
set(DSMOE_SLURM_MARKER ${CMAKE_CURRENT_BINARY_DIR}/launch-slurm-started)
add_test(NAME launch_slurm_start
         COMMAND bash ${DSMOE_LAUNCH_DIR}/slurm_fixture.sh start ${PROJECT_SOURCE_DIR} ${DSMOE_SLURM_MARKER})
add_test(NAME launch_slurm_stop
         COMMAND bash ${DSMOE_LAUNCH_DIR}/slurm_fixture.sh stop ${PROJECT_SOURCE_DIR} ${DSMOE_SLURM_MARKER})
# Installing the packages on a fresh machine takes about 15 s; apt may wait for another apt's lock.
set_tests_properties(launch_slurm_start PROPERTIES FIXTURES_SETUP dsmoe_slurm TIMEOUT 400 SKIP_RETURN_CODE 77
                     LABELS "launch;slurm")
set_tests_properties(launch_slurm_stop PROPERTIES FIXTURES_CLEANUP dsmoe_slurm TIMEOUT 60 LABELS "launch;slurm")

dsmoe_launch_test(launch_srun slurm_srun.sh)
dsmoe_launch_test(launch_sbatch slurm_sbatch.sh)
dsmoe_launch_test(launch_cpubind slurm_cpubind.sh)
# One node of 8 CPUs: each test's job takes all of it, so they take turns.
set_tests_properties(launch_srun launch_sbatch launch_cpubind PROPERTIES FIXTURES_REQUIRED dsmoe_slurm RESOURCE_LOCK "dsmoe_slurm;dsmoe_ranks"
                     LABELS "launch;slurm")
# launch_sbatch runs four jobs one after another; a sanitized build on a slow machine needs more than 120 s.
set_tests_properties(launch_sbatch PROPERTIES TIMEOUT 400)
