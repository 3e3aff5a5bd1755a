#!/usr/bin/env bash
# tests/site/module_session.sh: one user's session with the dsmoe module, run by module_test.sh in a
# clean shell (env -i bash --norc --noprofile): no PATH entry, variable or module from the test's own
# environment. Sources the module system's init, loads dsmoe, checks what the module sets, runs
# dsmoe --version and a few steps of the quickstart from another directory, tries a second dsmoe
# version (one dsmoe at a time), unloads, and checks that everything set is gone again.
# Usage: bash module_session.sh <init file defining `module`> <modulepath> <prefix> <version> <work dir>
set -u
init=$1 modulepath=$2 prefix=$3 version=$4 work=$5
failures=0
pass=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
ok() { pass=$((pass + 1)); }
# has <list> <entry>: the ':'-list contains the entry
has() { case ":$1:" in *":$2:"*) return 0 ;; esac; return 1; }

# shellcheck disable=SC1090 # the module system's init, named by the caller
source "$init" || { echo "FAIL: cannot source $init"; exit 1; }
type module > /dev/null 2>&1 || { echo "FAIL: $init defines no 'module' command"; exit 1; }
if command -v dsmoe > /dev/null; then fail "dsmoe on PATH before the module is loaded: $(command -v dsmoe)"; else ok; fi
orig_path=$PATH

module use "$modulepath"
module load dsmoe > "$work/load.log" 2>&1
rc=$?
if [ $rc -eq 0 ]; then ok; else fail "module load dsmoe: exit $rc: $(cat "$work/load.log")"; fi
case ":${LOADEDMODULES:-}:" in *":dsmoe/$version:"*) ok ;; *) fail "LOADEDMODULES='${LOADEDMODULES:-}', expected dsmoe/$version" ;; esac

[ "$(command -v dsmoe)" = "$prefix/bin/dsmoe" ] && ok || fail "dsmoe on PATH is '$(command -v dsmoe)', expected $prefix/bin/dsmoe"
[ "${DSMOE_ROOT:-}" = "$prefix" ] && ok || fail "DSMOE_ROOT='${DSMOE_ROOT:-}', expected $prefix"
[ "${DSMOE_PLUGIN_DIR:-}" = "$prefix/lib/dsmoe" ] && ok || fail "DSMOE_PLUGIN_DIR='${DSMOE_PLUGIN_DIR:-}', expected $prefix/lib/dsmoe"
[ -z "${DSMOE_PLUGIN_PATH+x}" ] && ok || fail "the module set DSMOE_PLUGIN_PATH='$DSMOE_PLUGIN_PATH' (it must leave it alone)"
has "${MANPATH:-}" "$prefix/share/man" && ok || fail "MANPATH='${MANPATH:-}' lacks $prefix/share/man"
has "${CMAKE_PREFIX_PATH:-}" "$prefix" && ok || fail "CMAKE_PREFIX_PATH='${CMAKE_PREFIX_PATH:-}' lacks $prefix"
if command -v man > /dev/null; then
  [ "$(man -w dsmoe 2>&1)" = "$prefix/share/man/man1/dsmoe.1" ] && ok || fail "man -w dsmoe: '$(man -w dsmoe 2>&1)'"
  # The system's pages are still found (an empty MANPATH entry): any page the system has.
  sys=$(ls /usr/share/man/man1 2>/dev/null | sed -n 's/^\([A-Za-z0-9_-]*\)\.1\(\.gz\)\{0,1\}$/\1/p' | head -1)
  if [ -n "$sys" ]; then man -w "$sys" > /dev/null 2>&1 && ok || fail "with the module loaded, man -w $sys fails (MANPATH='$MANPATH')"; fi
fi

module whatis dsmoe > "$work/whatis.log" 2>&1
grep -q "Version: $version" "$work/whatis.log" && ok || fail "module whatis dsmoe: no 'Version: $version': $(cat "$work/whatis.log")"
module help dsmoe > "$work/help.log" 2>&1
grep -q "dsmoe --config" "$work/help.log" && grep -q "srun --mpi=pmix" "$work/help.log" && ok ||
  fail "module help dsmoe lacks the usage lines: $(head -20 "$work/help.log")"

out=$(dsmoe --version 2>&1)
[ "$(echo "$out" | head -1)" = "dsmoe $version" ] && ok || fail "dsmoe --version: '$(echo "$out" | head -3)'"
echo "$out" | grep -q "^plugin search path: .*$prefix/lib/dsmoe" && ok || fail "dsmoe --version: search path lacks $prefix/lib/dsmoe"

# The quickstart deck, a few steps, from a directory that is neither the prefix nor the source tree.
mkdir -p "$work/run" && cd "$work/run" || exit 1
OMP_NUM_THREADS=1 dsmoe "$DSMOE_ROOT/share/dsmoe/inputs/quickstart.deck" train.steps=3 > run.log 2>&1
rc=$?
[ $rc -eq 0 ] && ok || { fail "quickstart: exit $rc"; tail -15 run.log; }
grep -q "^backends: kernel cpu ($prefix/lib/dsmoe/libdsmoe_kernel_cpu.so" run.log && ok ||
  fail "quickstart: the cpu plugin was not the installed one: $(grep '^backends:' run.log)"
grep -q "comm mpi ($prefix/lib/dsmoe/libdsmoe_comm_mpi.so" run.log && ok || fail "quickstart: the mpi plugin was not the installed one"
[ -f quickstart_out/resolved.deck ] && grep -Eq '^steps += 3( |$)' quickstart_out/resolved.deck && ok ||
  fail "quickstart: no quickstart_out/resolved.deck with steps = 3 in $work/run"
last=$(tail -1 quickstart_out/metrics.csv 2>/dev/null)
step=${last%%,*} loss=$(echo "$last" | cut -d, -f2)
[ "$step" = 3 ] && ok || fail "quickstart: the last metrics row is step '$step', expected 3"
# A loss at all: finite and positive (a model of 64 tokens starts near ln 64 = 4.16).
awk -v l="$loss" 'BEGIN { exit !(l + 0 > 0 && l + 0 < 10) }' && ok || fail "quickstart: loss '$loss' at step 3"
[ -f quickstart_out/checkpoints/step_00000003.safetensors ] && ok || fail "quickstart: no checkpoint of step 3"

# A second dsmoe version: either it replaces the first (Lmod's one-name rule) or the conflict refuses it
# (Environment Modules); never both loaded, never both on PATH.
mkdir -p "$work/other/dsmoe" "$work/fake/bin"
for f in "$modulepath"/dsmoe/*; do
  sed "s#$prefix#$work/fake#g" "$f" > "$work/other/dsmoe/9.9.9${f##*/"$version"}"
done
module use "$work/other"
module load dsmoe/9.9.9 > "$work/second.log" 2>&1
n=$(echo ":${LOADEDMODULES:-}:" | grep -o ':dsmoe/' | wc -l)
[ "$n" = 1 ] && ok || fail "after loading dsmoe/9.9.9: LOADEDMODULES='${LOADEDMODULES:-}' ($n dsmoe loaded)"
n=0
has "$PATH" "$prefix/bin" && n=$((n + 1))
has "$PATH" "$work/fake/bin" && n=$((n + 1))
[ "$n" = 1 ] && ok || fail "after loading dsmoe/9.9.9: PATH='$PATH' holds $n dsmoe bin directories"
if has "$PATH" "$work/fake/bin"; then
  [ "${DSMOE_ROOT:-}" = "$work/fake" ] && ok || fail "swapped to dsmoe/9.9.9, but DSMOE_ROOT='${DSMOE_ROOT:-}'"
else
  grep -qi "conflict" "$work/second.log" && ok || fail "dsmoe/9.9.9 neither swapped in nor refused by the conflict: $(cat "$work/second.log")"
fi

module unload dsmoe > "$work/unload.log" 2>&1 || fail "module unload dsmoe: $(cat "$work/unload.log")"
command -v dsmoe > /dev/null && fail "dsmoe still on PATH after unload: $(command -v dsmoe)" || ok
[ "$PATH" = "$orig_path" ] && ok || fail "PATH after unload '$PATH', before load '$orig_path'"
for v in DSMOE_ROOT DSMOE_PLUGIN_DIR MANPATH CMAKE_PREFIX_PATH; do
  [ -z "${!v+x}" ] && ok || fail "$v='${!v}' after unload (was unset before load)"
done

echo "module session: $pass passed, $failures failed"
[ "$failures" -eq 0 ]
