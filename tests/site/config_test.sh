#!/usr/bin/env bash
# tests/site/config_test.sh: `dsmoe --config` of the installed program, each fact against the same fact
# found another way: the compiler (the build's compiler asked for its version), the flags (the build's
# own flags.make), MPI (mpirun --version, mpi.h), hwloc (pkg-config, hwloc.h), OpenBLAS (pkg-config,
# and the file ldd resolves for the cpu plugin), oneDNN (dnnl_version.h, when ldd shows the cpu plugin
# linked libdnnl), CUDA (nvcc --version and the toolkit headers, when the cuda plugin was built), and
# every installed plugin's table (read with ctypes by plugin_table.py). A file that is not a plugin is
# listed as refused, with the loader's reason.
# Usage: config_test.sh <prefix> <build dir> <source dir>
set -u
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../cli/lib.sh"
prefix=${1:?usage: config_test.sh <prefix> <build dir> <source dir>}
build=${2:?}
src=${3:?}
dsmoe=$prefix/bin/dsmoe
[ -x "$dsmoe" ] || { echo "FAIL: no $dsmoe (the site_install test installs it)"; exit 1; }
work=$(mktemp -d /tmp/dsmoe_site_config.XXXXXX)
trap 'rm -rf "$work"' EXIT
cache() { sed -n "s/^$1:[A-Z]*=//p" "$build/CMakeCache.txt" | head -1; }
version=$(sed -n 's/^project(dsmoe VERSION \([0-9][0-9.]*\).*/\1/p' "$src/CMakeLists.txt")

# The installed program with nothing from the environment steering its plugin search.
if env -u DSMOE_PLUGIN_PATH "$dsmoe" --config > "$work/config.txt" 2>&1; then ok; else fail "dsmoe --config: exit $?"; fi
report=$work/config.txt
# value <indent> <key>: the value of the first "key:" line at that indentation
value() { grep -m1 -E "^ {$1}$2: " "$report" | sed -E "s/^ {$1}$2: +//"; }
# block <kind> <name>: the lines of one plugin's entry (its own line and the deeper-indented ones after it)
block() { awk -v head="  $1 $2:" 'index($0, head) == 1 { on = 1; print; next } on && /^    / { print; next } { on = 0 }' "$report"; }
# expect_in <what> <text> <fixed string>
expect_in() { if grep -qF -- "$3" <<<"$2"; then ok; else fail "$1: '$2' lacks '$3'"; fi; }

[ "$(head -1 "$report")" = "dsmoe $version" ] && ok || fail "first line '$(head -1 "$report")', expected 'dsmoe $version'"

# --- compiler and flags ----------------------------------------------------------------------------
cc=$(cache CMAKE_C_COMPILER)
ccv=$("$cc" -dumpfullversion 2>/dev/null || "$cc" -dumpversion)
expect_in "compiler" "$(value 2 compiler)" "$ccv ($cc)"
flags_make=$build/core/CMakeFiles/dsmoe_core.dir/flags.make
core_flags=$(sed -n 's/^C_FLAGS = //p' "$flags_make")
for w in $(value 2 "C flags"); do
  case " $core_flags " in *" $w "*) ok ;; *) fail "C flags: '$w' is not in the core's C_FLAGS ($flags_make: $core_flags)" ;; esac
done
arch=$(cache DSMOE_CPU_ARCH)
cpu_flags=$(sed -n 's/^C_FLAGS = //p' "$build/plugins/cpu/CMakeFiles/dsmoe_kernel_cpu.dir/flags.make")
arch_line=$(value 2 "CPU architecture")
expect_in "CPU architecture" "$arch_line" "DSMOE_CPU_ARCH=$arch"
for w in ${arch_line%% (*}; do
  case " $cpu_flags " in *" $w "*) ok ;; *) fail "CPU architecture: '$w' is not in the cpu plugin's C_FLAGS ($cpu_flags)" ;; esac
done

# --- MPI -------------------------------------------------------------------------------------------
mpi_run=$(mpirun --version 2>&1 | grep -oE '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -1)
if [ -n "$mpi_run" ]; then expect_in "MPI library" "$(value 2 library)" "$mpi_run"; else fail "mpirun --version gives no version"; fi
mpi_h=$(cache MPI_C_HEADER_DIR)/mpi.h
if grep -q OMPI_MAJOR_VERSION "$mpi_h"; then
  v=$(for p in MAJOR MINOR RELEASE; do sed -n "s/^#define OMPI_${p}_VERSION \([0-9]*\).*/\1/p" "$mpi_h"; done | paste -sd.)
  expect_in "MPI compiled with" "$(value 2 'compiled with')" "Open MPI $v (mpi.h)"
fi

# --- hwloc -----------------------------------------------------------------------------------------
hw=$(sed -n '/^hwloc$/,/^[a-z]/p' "$report")
expect_in "hwloc" "$hw" "$(pkg-config --modversion hwloc) (pkg-config)"
api=$(sed -n 's/^#define HWLOC_API_VERSION \(0x[0-9a-fA-F]*\).*/\1/p' "$(pkg-config --variable=includedir hwloc)/hwloc.h")
expect_in "hwloc API" "$hw" "API $api (hwloc.h)"
expect_in "hwloc library" "$hw" "API $api (hwloc_get_api_version)"

# --- plugins: every installed one, as ctypes reads its table ---------------------------------------
expect_in "search path" "$(value 2 'search path')" "$prefix/lib/dsmoe"
# The capability names the report prints are the header's enum names (DSMOE_KCAP_FUSED_EPILOGUE -> fused-epilogue).
capname() { # capname <header> <prefix> <bit>
  sed -n "s/^ *DSMOE_$2_\([A-Z0-9_]*\) *= *1u *<< *$3,.*/\1/p" "$src/include/dsmoe/$1" | tr 'A-Z_' 'a-z-'
}
n_plugins=0
for so in "$prefix"/lib/dsmoe/libdsmoe_*_*.so; do
  [ -e "$so" ] || continue
  n_plugins=$((n_plugins + 1))
  base=$(basename "$so" .so); base=${base#libdsmoe_}; kind=${base%%_*}; name=${base#*_}
  b=$(block "$kind" "$name")
  if [ -z "$b" ]; then fail "$kind $name: not in the report"; continue; fi
  [ "$(head -1 <<<"$b" | sed -E 's/^  [a-z]+ [a-z0-9_]+: +//')" = "$so" ] && ok || fail "$kind $name: '$(head -1 <<<"$b")', expected the file $so"
  # A plugin of the sanitized clang build (docs/testing.md) leaves the ASan runtime to the program that
  # loads it: python gets clang's shared one.
  asan_rt=
  nm -D --undefined-only "$so" 2>/dev/null | grep -q ' __asan_init$' && asan_rt=$(clang -print-file-name=libclang_rt.asan-x86_64.so)
  LD_PRELOAD=$asan_rt ASAN_OPTIONS=detect_leaks=0 python3 "$here/plugin_table.py" "$src" "$kind" "$so" > "$work/table" 2>&1 ||
    { fail "plugin_table.py $so: $(cat "$work/table")"; continue; }
  t() { sed -n "s/^$1=//p" "$work/table"; }
  bv() { sed -n -E "s/^    $1: +//p" <<<"$b"; }
  [ "$(bv ABI)" = "$(t api_version)" ] && ok || fail "$kind $name: ABI '$(bv ABI)', the table says $(t api_version)"
  [ "$(bv description)" = "$(t description)" ] && ok || fail "$kind $name: description '$(bv description)', the table says '$(t description)'"
  if [ "$kind" = kernel ]; then mem=$(t mem_kind) hdr=kernel_plugin.h pfx=KCAP; else mem=$(t mem_kinds) hdr=comm_plugin.h pfx=CCAP; fi
  expect_in "$kind $name memory" "$(bv memory)" "($mem)"
  caps=$(t caps)
  expect_in "$kind $name caps" "$(bv caps)" "($caps)"
  for bit in $(seq 0 31); do
    [ $(( caps >> bit & 1 )) = 1 ] || continue
    cn=$(capname "$hdr" "$pfx" "$bit")
    if [ -z "$cn" ]; then fail "$kind $name: caps bit $bit is not in $hdr"; continue; fi
    case " $(bv caps) " in *" $cn "*) ok ;; *) fail "$kind $name caps: '$(bv caps)' lacks '$cn' (bit $bit of $hdr)" ;; esac
  done
  if [ "$kind" = kernel ]; then
    expect_in "$kind $name dtypes" "$(bv dtypes)" "($(t dtypes))"
  else
    [ -z "$(t mpi_abi)" ] || expect_in "$kind $name MPI ABI" "$(bv 'MPI ABI')" "$(t mpi_abi)"
  fi
  # Library versions, against what ldd resolves for this plugin and the development headers.
  deps=$(ldd "$so" 2>/dev/null)
  if [ "$kind/$name" = kernel/cpu ]; then
    blas=$(awk '/libopenblas|libblas/ { print $3; exit }' <<<"$deps")
    expect_in "cpu BLAS" "$(bv BLAS)" "OpenBLAS $(pkg-config --modversion openblas)"
    [ -n "$blas" ] && [ "$(readlink -f "$(bv BLAS | sed -E 's/.*; ([^;]*)\)$/\1/')")" = "$(readlink -f "$blas")" ] && ok ||
      fail "cpu BLAS: file in '$(bv BLAS)' is not the one ldd resolves ($blas)"
    if grep -q libdnnl <<<"$deps"; then
      h=$(cache DSMOE_DNNL_INCLUDE_DIR)
      h=$(grep -l '^#define DNNL_VERSION_MAJOR' "$h"/oneapi/dnnl/dnnl_version.h "$h"/dnnl_version.h 2>/dev/null | head -1)
      dv=$(for p in MAJOR MINOR PATCH; do sed -n "s/^#define DNNL_VERSION_$p \([0-9]*\).*/\1/p" "$h"; done | paste -sd.)
      [ "$(bv oneDNN | cut -d' ' -f1)" = "$dv" ] && ok || fail "cpu oneDNN: '$(bv oneDNN)', $h says $dv"
    else
      bv oneDNN | grep -qE '^[0-9]' && fail "cpu oneDNN: a version '$(bv oneDNN)' though the plugin does not link libdnnl" || ok
    fi
  fi
  if [ "$kind/$name" = kernel/cuda ]; then
    nvcc=$(cache CUDAToolkit_NVCC_EXECUTABLE)
    cuda_inc=$(cache CUDAToolkit_INCLUDE_DIR)
    [ -n "$cuda_inc" ] || cuda_inc=$(dirname "$nvcc")/../include
    tk=$("$nvcc" --version | sed -n 's/.*release [0-9.]*, V\([0-9.]*\).*/\1/p')
    expect_in "CUDA toolkit" "$(value 2 'CUDA toolkit')" "$tk (the cuda kernel plugin was built with it)"
    rt=$(sed -n 's/^#define CUDART_VERSION *\([0-9]*\).*/\1/p' "$cuda_inc/cuda_runtime_api.h")
    expect_in "CUDA runtime" "$(bv 'CUDA runtime')" "$((rt / 1000)).$((rt % 1000 / 10)) (cudaRuntimeGetVersion"
    cb=$(for p in MAJOR MINOR PATCH; do sed -n "s/^#define CUBLAS_VER_$p \([0-9]*\).*/\1/p" "$cuda_inc/cublas_api.h"; done | paste -sd.)
    expect_in "cuBLAS" "$(bv cuBLAS)" "$cb (cublasGetProperty"
  fi
done
[ "$n_plugins" -ge 2 ] && ok || fail "only $n_plugins plugins in $prefix/lib/dsmoe"
if [ -e "$prefix/lib/dsmoe/libdsmoe_kernel_cuda.so" ]; then :; else
  expect_in "CUDA toolkit" "$(value 2 'CUDA toolkit')" "none (the cuda kernel plugin was not built)"
fi
if [ -e "$prefix/lib/dsmoe/libdsmoe_comm_nccl.so" ]; then :; else
  expect_in "NCCL" "$(value 2 NCCL)" "none (the nccl comm plugin was not built)"
fi

# --- a refused plugin: listed with the loader's reason; the search path starts with DSMOE_PLUGIN_PATH --
mkdir -p "$work/plugins"
echo "not a shared object" > "$work/plugins/libdsmoe_kernel_bogus.so"
if DSMOE_PLUGIN_PATH=$work/plugins "$dsmoe" --config > "$work/config2.txt" 2>&1; then ok; else fail "dsmoe --config with a bogus plugin: exit $?"; fi
report=$work/config2.txt
expect_in "search path with DSMOE_PLUGIN_PATH" "$(value 2 'search path')" "$work/plugins:$prefix/lib/dsmoe"
line=$(grep -m1 '^  kernel bogus: ' "$report")
expect_in "bogus plugin" "$line" "refused: "
expect_in "bogus plugin" "$line" "$work/plugins/libdsmoe_kernel_bogus.so"
expect_in "bogus plugin" "$line" "not an ELF file"
grep -q '^  kernel cpu: ' "$report" && ok || fail "the bogus plugin hid the others"

finish "dsmoe --config"
