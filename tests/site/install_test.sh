#!/usr/bin/env bash
# tests/site/install_test.sh: `cmake --install` of this build tree into a fresh prefix (the one the other
# site tests use), then checks what a site relies on: the program, its plugins, the example decks, the
# man page, the docs, and modulefiles that name the prefix given at install time (not the configure's
# CMAKE_INSTALL_PREFIX), with DESTDIR staging and a relative --prefix handled too.
# Usage: install_test.sh <build dir> <source dir> <prefix>
set -u
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../cli/lib.sh"
build=${1:?usage: install_test.sh <build dir> <source dir> <prefix>}
src=${2:?}
prefix=${3:?}
# The version from the project() line, not from the program.
version=$(sed -n 's/^project(dsmoe VERSION \([0-9][0-9.]*\).*/\1/p' "$src/CMakeLists.txt")
[ -n "$version" ] || { echo "FAIL: no project(dsmoe VERSION ...) in $src/CMakeLists.txt"; exit 1; }
configured=$(sed -n 's/^CMAKE_INSTALL_PREFIX:PATH=//p' "$build/CMakeCache.txt")
work=$(mktemp -d /tmp/dsmoe_site_install.XXXXXX)
trap 'rm -rf "$work"' EXIT

rm -rf "$prefix"
if ! cmake --install "$build" --prefix "$prefix" > "$work/install.log" 2>&1; then
  tail -20 "$work/install.log"
  echo "FAIL: cmake --install $build --prefix $prefix"
  exit 1
fi

lua=$prefix/share/modulefiles/lua/dsmoe/$version.lua
tcl=$prefix/share/modulefiles/tcl/dsmoe/$version
for f in bin/dsmoe lib/dsmoe/libdsmoe_kernel_cpu.so lib/dsmoe/libdsmoe_comm_mpi.so share/dsmoe/inputs/quickstart.deck \
         share/man/man1/dsmoe.1 share/doc/dsmoe/README.md share/doc/dsmoe/docs/install.md \
         share/doc/dsmoe/docs/deck.md lib/cmake/dsmoe/dsmoeConfig.cmake; do
  if [ -f "$prefix/$f" ]; then ok; else fail "not installed: $prefix/$f"; fi
done
# Every plugin the build made is installed.
for p in "$build"/lib/dsmoe/libdsmoe_*.so; do
  [ -e "$p" ] || continue
  if [ -f "$prefix/lib/dsmoe/$(basename "$p")" ]; then ok; else fail "plugin $(basename "$p") built but not installed"; fi
done

# check_modulefiles <lua> <tcl> <prefix they must name>
check_modulefiles() {
  local l=$1 t=$2 want=$3 f
  for f in "$l" "$t"; do
    if [ ! -f "$f" ]; then fail "no modulefile $f"; continue; fi
    if grep -n '@[A-Za-z_]*@' "$f"; then fail "$f: placeholders left"; else ok; fi
    if grep -qF -- "$want" "$f"; then ok; else fail "$f does not name the prefix $want"; fi
    # The configure-time prefix must not leak in when the install went elsewhere.
    if [ "$configured" != "$want" ] && grep -qE -- "(^|[^A-Za-z0-9_/])$configured(/|\\]|\\}|$)" "$f"; then
      fail "$f names the configure-time prefix $configured"
    else ok; fi
    if grep -qF "Version: $version" "$f"; then ok; else fail "$f: no whatis 'Version: $version'"; fi
  done
  [ -f "$l" ] && { if luac5.3 -p "$l" 2>"$work/luac.err" || luac -p "$l" 2>"$work/luac.err"; then ok; else fail "$l: Lua syntax: $(cat "$work/luac.err")"; fi; }
  [ -f "$t" ] && { if head -1 "$t" | grep -q '^#%Module'; then ok; else fail "$t: first line is not #%Module"; fi
    if printf 'set f [open {%s}]; set s [read $f]; exit [expr {[info complete $s] ? 0 : 1}]\n' "$t" | tclsh; then ok
    else fail "$t: Tcl text is not complete (unbalanced braces or quotes)"; fi; }
}
check_modulefiles "$lua" "$tcl" "$prefix"
# The compiled-in docs pointer of the modulefiles: they are named as `module use` needs them.
if grep -qF "module use $prefix/share/modulefiles/lua" "$lua"; then ok; else fail "$lua: no 'module use' hint for its own tree"; fi

# DESTDIR staging: the files land under DESTDIR, but name the prefix (what the package manager installs).
if DESTDIR="$work/stage" cmake --install "$build" --prefix /opt/dsmoe-site-test > "$work/stage.log" 2>&1; then
  ok
  check_modulefiles "$work/stage/opt/dsmoe-site-test/share/modulefiles/lua/dsmoe/$version.lua" \
                    "$work/stage/opt/dsmoe-site-test/share/modulefiles/tcl/dsmoe/$version" /opt/dsmoe-site-test
  if grep -rqF -- "$work/stage" "$work/stage/opt/dsmoe-site-test/share/modulefiles"; then
    fail "the staged modulefiles name DESTDIR ($work/stage)"
  else ok; fi
else
  tail -5 "$work/stage.log"; fail "DESTDIR=... cmake --install"
fi

# A relative --prefix is resolved against the directory cmake --install runs in.
mkdir -p "$work/rel"
if (cd "$work/rel" && cmake --install "$build" --prefix inst > "$work/rel.log" 2>&1); then
  ok
  check_modulefiles "$work/rel/inst/share/modulefiles/lua/dsmoe/$version.lua" \
                    "$work/rel/inst/share/modulefiles/tcl/dsmoe/$version" "$work/rel/inst"
else
  tail -5 "$work/rel.log"; fail "cmake --install --prefix inst (relative)"
fi

finish "site install ($prefix)"
