#!/usr/bin/env bash
# tests/site/man_test.sh: the man page dsmoe(1) (packaging/man/dsmoe.1, written by hand) keeps up with the
# program: every option `dsmoe --help` prints is described, every exit code --help and core/drivers/
# train.h name is listed, the header names the project's version, and groff formats it without warnings.
# Usage: man_test.sh <dsmoe> <source dir>
set -u
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../cli/lib.sh"
dsmoe=${1:?usage: man_test.sh <dsmoe> <source dir>}
src=${2:?}
page=$src/packaging/man/dsmoe.1
[ -f "$page" ] || { echo "FAIL: no $page"; exit 1; }
# The page as text: roff's \- is a hyphen; font changes (\fB, \fI, \fR, \fP) and request names go.
text=$(sed -e 's/\\-/-/g' -e 's/\\f[BIRP]//g' -e 's/^\.[A-Z][A-Z]* *//' "$page")

help=$("$dsmoe" --help 2>&1) || { echo "FAIL: dsmoe --help: exit $?"; exit 1; }
options=$(grep -oE '(^|[^A-Za-z0-9-])--[a-z][a-z-]*' <<<"$help" | grep -oE -- '--[a-z][a-z-]*' | sort -u)
[ "$(wc -l <<<"$options")" -ge 5 ] || fail "found only $(wc -w <<<"$options") options in dsmoe --help: $options"
for o in $options; do
  # described: the option opens a line of the page (a .TP/.B item), not only mentioned in passing
  if grep -qE -- "^(\.[A-Z]+ +)?$(sed 's/-/\\\\-/g' <<<"$o")( |,|\"|$)" "$page"; then ok
  else fail "--help prints $o, but the man page has no item for it"; fi
done
# "--help keys": the argument is described too.
if grep -q -- '--help \[keys\]' <<<"$help"; then
  grep -qE -- '^\.B \\-\\-help keys$' "$page" && ok || fail "the man page has no item for '--help keys'"
fi

# Exit codes: those --help names ("Exit codes: 0 done; 1 error; ...") and the DSMOE_EXIT_* of train.h.
codes=$( { sed -n '/^Exit codes:/,$p' <<<"$help" | grep -oE '(^|[;:] *)[0-9]+ ' | grep -oE '[0-9]+'
           sed -n 's/^#define DSMOE_EXIT_[A-Z_]* \([0-9]*\).*/\1/p' "$src/core/drivers/train.h" "$src/core/drivers/watchdog.h"; } | sort -un)
[ "$(wc -l <<<"$codes")" -ge 5 ] || fail "found only these exit codes: $codes"
exit_section=$(sed -n '/^\.SH EXIT STATUS/,/^\.SH /p' "$page")
for c in $codes; do
  grep -qE "^\.B $c$" <<<"$exit_section" && ok || fail "exit code $c is not in the man page's EXIT STATUS"
done

version=$(sed -n 's/^project(dsmoe VERSION \([0-9][0-9.]*\).*/\1/p' "$src/CMakeLists.txt")
grep -qE "^\.TH DSMOE 1 .*\"dsmoe $version\"" "$page" && ok || fail "the .TH line does not name dsmoe $version: $(grep '^\.TH' "$page")"
grep -qF -- "$("$dsmoe" --version | head -1)" <<<"$text" && ok || fail "the page does not name '$("$dsmoe" --version | head -1)'"

if command -v groff > /dev/null; then
  warnings=$(groff -man -Tutf8 -ww -z "$page" 2>&1)
  [ -z "$warnings" ] && ok || fail "groff warns: $warnings"
else
  echo "note: no groff here: the page's formatting was not checked"
fi

finish "man page"
