#!/usr/bin/env bash
# scripts/gpu-check end to end on the CPU, so that the script a GPU machine runs has run before one is
# lent: `gpu-check bundle` packs this build (the real cuda plugin, the emulated one, the closure of Open
# MPI, OpenBLAS, oneDNN, hwloc, cmocka), and `GPU_CHECK_DRY=emu gpu-check run` unpacks it and runs the
# steps table, generate, nccl and ranks on the cuda and nccl plugins built for the CUDA emulator, with the
# bundle's relocated Open MPI (orterun for ranks, singletons for the rest). Each step compares numbers
# (the table test's values, greedy tokens against cpu, losses of nccl against mpi and of 2 ranks against
# 1), and the run's exit status is 0 only when every check passed; this test also wants each step's
# result line to say PASS, so that a check the script skipped or left out fails it.
# usage: gpu_check_emu_test.sh <source dir> <build dir>
set -u
src=$1 build=$2
work=$(mktemp -d /tmp/dsmoe_gpu_check.XXXXXX)
trap 'rm -rf "$work"' EXIT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # fail, ok, show, finish

for f in "$build/lib/dsmoe/libdsmoe_kernel_cuda.so" "$build/tests/plugins/cuda_emu/libdsmoe_kernel_cuda.so" \
         "$build/tests/plugins/cuda_emu/libdsmoe_comm_nccl.so"; do
  if [ ! -f "$f" ]; then echo "skip: no $f in this build (the bundle needs the cuda plugin, the run its emulated build)"; exit 77; fi
done

# xz at its fastest: the bundle's size is not what is tested.
if ! XZ_OPT=-0 GPU_CHECK_NO_BUILD=1 timeout 300 "$src/scripts/gpu-check" bundle "$build" "$work/bundle.tar.xz" > "$work/bundle.log" 2>&1; then
  fail "gpu-check bundle"; show "$work/bundle.log"; finish gpu_check_emu; exit
fi
ok
steps=table,generate,nccl,ranks
GPU_CHECK_DRY=emu timeout 500 "$src/scripts/gpu-check" run "$work/bundle.tar.xz" "$work/report" "$steps" > "$work/run.log" 2>&1
rc=$?
report="$work/report/report.md"
sed 's/^/  | /' "$report" | grep -E '^  \| (- \*\*|#|failed)' | cut -c1-220
if [ $rc -ne 0 ]; then fail "gpu-check run: exit $rc"; show "$work/run.log"; else ok; fi
if grep -q '(dry run: the cuda and nccl plugins on the CUDA emulator)' "$report"; then ok; else fail "the report does not name the emulator run"; fi
# Every check each step makes, by the name of its result line.
for check in table "generate fp32 txt" "generate fp32 jsonl" "generate bf16 txt" "generate bf16 jsonl" \
             "nccl train" "nccl alltoall" "nccl comm_device" ranks; do
  if grep -qF -- "- **PASS** $check:" "$report"; then ok
  else fail "no PASS line for '$check': $(grep -F -- "** $check:" "$report" | head -1 | cut -c1-300)"; fi
done
if grep -qE '^- \*\*(FAIL|SKIP)\*\*' "$report"; then fail "failed or skipped checks: $(grep -E '^- \*\*(FAIL|SKIP)\*\*' "$report" | cut -c1-200 | tr '\n' ' ')"; else ok; fi
finish gpu_check_emu
