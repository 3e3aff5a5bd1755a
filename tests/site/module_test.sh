#!/usr/bin/env bash
# tests/site/module_test.sh: the installed modulefiles under a module system, in a clean shell
# (module_session.sh says what a session checks). Flavours:
#   lmod-lua     Lmod with share/modulefiles/lua
#   lmod-tcl     Lmod with share/modulefiles/tcl (Lmod reads Tcl modulefiles too)
#   envmodules   Environment Modules with share/modulefiles/tcl. Debian's environment-modules conflicts
#                with lmod (apt refuses both), so it is not installed: its package is downloaded once
#                (apt-get download) and unpacked into <cache dir>, and its modulecmd.tcl runs under the
#                tclsh that lmod pulls in. Exit 77 (skipped) with the reason when that cannot be done.
# Usage: module_test.sh <flavour> <prefix> <source dir> <cache dir>
set -u
flavour=${1:?usage: module_test.sh <lmod-lua|lmod-tcl|envmodules> <prefix> <source dir> <cache dir>}
prefix=${2:?} src=${3:?} cache=${4:?}
here=$(cd "$(dirname "$0")" && pwd)
version=$(sed -n 's/^project(dsmoe VERSION \([0-9][0-9.]*\).*/\1/p' "$src/CMakeLists.txt")
[ -x "$prefix/bin/dsmoe" ] || { echo "FAIL: no $prefix/bin/dsmoe (the site_install test installs it)"; exit 1; }
work=$(mktemp -d /tmp/dsmoe_site_module.XXXXXX)
trap 'rm -rf "$work"' EXIT

skip() { echo "SKIPPED: $*"; exit 77; }

case $flavour in
  lmod-lua | lmod-tcl)
    init=""
    for f in "${LMOD_PKG:+$LMOD_PKG/init/bash}" /usr/share/lmod/lmod/init/bash /usr/share/lmod/lmod/init/sh; do
      [ -n "$f" ] && [ -f "$f" ] && { init=$f; break; }
    done
    [ -n "$init" ] || skip "Lmod is not installed (apt-get install lmod; scripts/test installs it)"
    modulepath=$prefix/share/modulefiles/${flavour#lmod-}
    ;;
  envmodules)
    tclsh=$(command -v tclsh8.6 || command -v tclsh) || skip "no tclsh (the tcl package; lmod depends on it)"
    em=$cache/environment-modules
    modulecmd=$(find "$em/root" -name modulecmd.tcl -type f 2>/dev/null | head -1)
    if [ -z "$modulecmd" ]; then
      command -v apt-get > /dev/null || skip "no apt-get to download environment-modules"
      rm -rf "$em" && mkdir -p "$em/root" || exit 1
      if ! (cd "$em" && apt-get download environment-modules > download.log 2>&1); then
        skip "apt-get download environment-modules failed (offline, or stale package lists: apt-get update): $(tail -2 "$em/download.log" | tr '\n' ' ')"
      fi
      dpkg -x "$em"/environment-modules_*.deb "$em/root" || skip "dpkg -x of $(ls "$em"/*.deb) failed"
      modulecmd=$(find "$em/root" -name modulecmd.tcl -type f | head -1)
      [ -n "$modulecmd" ] || skip "the environment-modules package has no modulecmd.tcl"
    fi
    # What Environment Modules' init does, without its absolute paths into /usr (the package is not
    # installed): `module` evaluates what modulecmd.tcl prints for bash.
    init=$work/envmodules-init.sh
    printf 'module() { eval "$(%q %q bash "$@")"; }\n' "$tclsh" "$modulecmd" > "$init"
    echo "Environment Modules: $("$tclsh" "$modulecmd" bash --version 2>&1 | head -1) ($modulecmd under $tclsh)"
    modulepath=$prefix/share/modulefiles/tcl
    ;;
  *) echo "FAIL: unknown flavour $flavour"; exit 2 ;;
esac

[ -d "$modulepath/dsmoe" ] || { echo "FAIL: no $modulepath/dsmoe"; exit 1; }
echo "$flavour: $init, module use $modulepath"
# The sanitized build's options (docs/testing.md) belong to the build, not to the user's shell: kept.
keep=()
for v in ASAN_OPTIONS LSAN_OPTIONS UBSAN_OPTIONS ASAN_SYMBOLIZER_PATH; do [ -n "${!v+x}" ] && keep+=("$v=${!v}"); done
env -i HOME="$work" PATH=/usr/bin:/bin USER="${USER:-root}" ${keep[@]+"${keep[@]}"} \
  bash --norc --noprofile "$here/module_session.sh" "$init" "$modulepath" "$prefix" "$version" "$work"
