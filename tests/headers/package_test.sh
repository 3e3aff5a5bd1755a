#!/usr/bin/env bash
# The exported CMake package as a plugin author uses it: tests/headers/example_plugin (find_package(dsmoe)
# + dsmoe_add_plugin) is configured and built against this build tree (-Ddsmoe_DIR=<build>) and against
# an install of the package's "dev" component (CMAKE_PREFIX_PATH=<prefix>), and each result must be
# libdsmoe_kernel_example.so exporting exactly the v2 entry symbol (nm -D), loadable, with the table the
# header describes (check_entry.c), compiled against the right headers and installed to lib/dsmoe.
# Usage: package_test.sh <cmake> <c compiler> <dsmoe build dir> <dsmoe source dir>
set -u
cmake=$1
cc=$2
build=$3
src=$4
example=$src/tests/headers/example_plugin
work=$(mktemp -d /tmp/dsmoe_package.XXXXXX)
trap 'rm -rf "$work"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# Independent of the package: the checker is built here from the header alone.
"$cc" -std=c11 -Wall -Wextra -Werror -I"$src/include" "$src/tests/headers/check_entry.c" -o "$work/check_entry" -ldl ||
  { echo "FAIL: cannot build check_entry"; exit 1; }

# build_example <label> <expected plugin dir> <expected include dir> <cmake args...>
build_example() {
  local label=$1 want_dir=$2 want_inc=$3
  shift 3
  local b=$work/$label out
  if ! out=$("$cmake" -S "$example" -B "$b" -DCMAKE_C_COMPILER="$cc" -DCMAKE_BUILD_TYPE=Release "$@" 2>&1); then
    fail "$label: configure"; echo "$out" | tail -30; return 1
  fi
  grep -q -- "-- example: plugin dir $want_dir\$" <<<"$out" || fail "$label: dsmoe_PLUGIN_DIR is not $want_dir: $(grep 'plugin dir' <<<"$out")"
  grep -q -- "-- example: headers $want_inc\$" <<<"$out" || fail "$label: dsmoe::plugin_headers is not $want_inc: $(grep 'headers' <<<"$out")"
  grep -q -- "-- example: dsmoe .* kernel ABI [0-9]" <<<"$out" || fail "$label: no ABI versions from the package"
  if ! out=$("$cmake" --build "$b" 2>&1); then fail "$label: build"; echo "$out" | tail -30; return 1; fi
  local so=$b/libdsmoe_kernel_example.so
  [ -f "$so" ] || { fail "$label: no $so (built: $(cd "$b" && ls *.so 2>/dev/null))"; return 1; }
  local syms
  syms=$(nm -D --defined-only "$so" | awk '{print $NF}' | LC_ALL=C sort | tr '\n' ' ')
  [ "$syms" = "dsmoe_kernel_plugin_entry_v3 " ] || fail "$label: exports '$syms', expected exactly dsmoe_kernel_plugin_entry_v3"
  "$work/check_entry" "$so" example || fail "$label: entry check"
  echo "$label: $so exports: $syms"
}

# 1. Against the build tree.
build_example build-tree "$build/lib/dsmoe" "$src/include" -Ddsmoe_DIR="$build"

# 2. Against an installed package (headers, config, helper: no dsmoe binaries needed).
prefix=$work/prefix
if out=$("$cmake" --install "$build" --component dev --prefix "$prefix" 2>&1); then
  [ -f "$prefix/include/dsmoe/kernel_plugin.h" ] || fail "install: no include/dsmoe/kernel_plugin.h"
  [ -f "$prefix/lib/cmake/dsmoe/dsmoeConfig.cmake" ] || fail "install: no lib/cmake/dsmoe/dsmoeConfig.cmake"
  if build_example installed "$prefix/lib/dsmoe" "$prefix/include" -DCMAKE_PREFIX_PATH="$prefix"; then
    # dsmoe_add_plugin's install rule puts the plugin where this dsmoe looks: <prefix>/lib/dsmoe.
    "$cmake" --install "$work/installed" --prefix "$prefix" >/dev/null 2>&1 || fail "installed: cmake --install of the plugin"
    [ -f "$prefix/lib/dsmoe/libdsmoe_kernel_example.so" ] || fail "installed: plugin not installed to <prefix>/lib/dsmoe"
  fi
else
  fail "cmake --install --component dev"; echo "$out" | tail -20
fi

# 3. The helper's argument checks: a bad KIND is a configure error that says so.
mkdir -p "$work/bad"
cat > "$work/bad/CMakeLists.txt" <<CM
cmake_minimum_required(VERSION 3.25)
project(bad LANGUAGES C)
find_package(dsmoe REQUIRED)
dsmoe_add_plugin(bad KIND kernels NAME x SOURCES $example/example.c)
CM
if out=$("$cmake" -S "$work/bad" -B "$work/bad/b" -Ddsmoe_DIR="$build" 2>&1); then
  fail "KIND kernels was accepted"
else
  grep -q "KIND must be kernel or comm" <<<"$out" || { fail "bad KIND: unexpected message"; echo "$out" | tail -10; }
fi

[ $failures -eq 0 ] && echo "package: ok"
[ $failures -eq 0 ]
