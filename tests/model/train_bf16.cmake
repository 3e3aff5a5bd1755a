# run.precision = bf16 through the training driver (tests/model/test_train_bf16.c): convergence beside fp32 toward
# the synthetic bound, bitwise determinism (also over run.threads), resume == uninterrupted, checkpoints that
# continue fp32 -> bf16 -> fp32 and stay float32, the MoE variants beside fp32, and the config's refusals.
dsmoe_test(test_train_bf16 SOURCES ${DSMOE_TEST_DIR}/model/test_train_bf16.c TIMEOUT 300 LIBS m)
add_dependencies(test_train_bf16 dsmoe_kernel_cpu dsmoe_comm_mpi)
