#!/usr/bin/env bash
# Every public header (include/dsmoe, v1/ too) compiles on its own, twice included (include guards), and
# all together, in one language: the ABI promises plain C11, C++ and CUDA (DSMOE_HD) users.
# Usage: compile_headers.sh c|cxx|cuda <compiler or ""> <source dir> [flags...]
#   c:    <compiler> -std=c11 -Wall -Wextra -Werror -pedantic
#   cxx:  <compiler> -std=c++17 -Wall -Wextra -Werror -pedantic
#   cuda: nvcc -c of a .cu that includes every header and calls the dsmoe_rng_* functions from a
#         __global__ kernel (DSMOE_HD makes them device functions).
# Without nvcc (cuda) or a C++ compiler (cxx) it exits 77: ctest reports the test as skipped.
# The extra flags give <mpi.h> (dsmoe/v1/comm_plugin_v1.h includes it) as -isystem: MPI's own headers
# are not under test. C++ and CUDA skip MPI's deprecated C++ bindings (OMPI_SKIP_MPICXX), as a C++
# plugin would.
set -u
lang=$1
cc=$2
src=$3
shift 3
incs=("-I$src/include" "$@")
[ "$lang" = c ] || incs+=(-DOMPI_SKIP_MPICXX=1 -DMPICH_SKIP_MPICXX=1)
work=$(mktemp -d /tmp/dsmoe_headers.XXXXXX)
trap 'rm -rf "$work"' EXIT

if [ -z "$cc" ] || ! command -v "$cc" >/dev/null 2>&1; then
  # The project itself needs neither nvcc nor a C++ compiler: without one the test is skipped.
  [ "$lang" = c ] || { echo "SKIP: no $lang compiler found"; exit 77; }
  echo "FAIL: no C compiler ('$cc')"; exit 1
fi

case $lang in
  c)    ext=c;   flags=(-std=c11 -Wall -Wextra -Werror -pedantic -fsyntax-only) ;;
  cxx)  ext=cpp; flags=(-x c++ -std=c++17 -Wall -Wextra -Werror -pedantic -fsyntax-only) ;;
  cuda) ext=cu;  flags=(-c -std=c++17 -Werror all-warnings -Xcompiler -Wall,-Wextra) ;;
  *)    echo "usage: $0 c|cxx|cuda <compiler> <source dir> [-I...]"; exit 2 ;;
esac

headers=$(cd "$src/include" && find dsmoe -name '*.h' | LC_ALL=C sort)
[ -n "$headers" ] || { echo "FAIL: no headers under $src/include/dsmoe"; exit 1; }
failures=0
n=0

# compile <name> <file>: one translation unit; its errors are printed, not hidden.
compile() {
  local out
  if [ "$lang" = cuda ]; then
    out=$("$cc" "${flags[@]}" "${incs[@]}" "$2" -o "$work/$1.o" 2>&1)
  else
    out=$("$cc" "${flags[@]}" "${incs[@]}" "$2" 2>&1)
  fi
  if [ $? -ne 0 ]; then
    echo "FAIL: $1 ($lang)"; echo "$out" | head -30; failures=$((failures + 1))
  else
    n=$((n + 1))
  fi
}

for h in $headers; do
  name=$(echo "$h" | tr '/.' '__')
  printf '#include "%s"\n#include "%s"\nint dsmoe_header_check_%s;\n' "$h" "$h" "$name" > "$work/$name.$ext"
  compile "$name" "$work/$name.$ext"
done

all="$work/all.$ext"
for h in $headers; do printf '#include "%s"\n' "$h"; done > "$all"
if [ "$lang" = cuda ]; then
  # Device code calling every dsmoe_rng_* function: only compiles if they are __host__ __device__.
  cat >> "$all" <<'CU'
__global__ void dsmoe_rng_kernel(uint64_t seed, float *out, uint64_t *bits) {
    uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
    uint64_t key = dsmoe_rng_key(seed, 1, 2, 3);
    bits[i] = dsmoe_rng_u64(key, i) ^ dsmoe_mix64(i);
    out[4 * i + 0] = dsmoe_rng_uniform(key, i);
    out[4 * i + 1] = dsmoe_rng_uniform_pos(key, i);
    out[4 * i + 2] = dsmoe_rng_normal(key, i);
    out[4 * i + 3] = dsmoe_rng_gumbel(key, i);
}
// The shared inline helpers are host code; the ABI types are usable in device code.
__global__ void dsmoe_types_kernel(const dsmoe_gating_params *p, int32_t *out) { out[0] = p->S + (int)DSMOE_FLOAT32; }
int dsmoe_host_use(void) { return (int)dsmoe_dtype_size(DSMOE_BFLOAT16) + (int)DSMOE_KERNEL_API_VERSION; }
CU
else
  printf 'int dsmoe_header_check_all(void) { return (int)dsmoe_dtype_size(DSMOE_BFLOAT16) + DSMOE_KERNEL_API_VERSION + DSMOE_COMM_API_VERSION; }\n' >> "$all"
fi
compile all "$all"

echo "$lang: $n translation units compiled, $failures failed ($(echo $headers | wc -w) headers)"
[ $failures -eq 0 ]
