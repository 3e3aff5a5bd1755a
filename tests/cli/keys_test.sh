#!/usr/bin/env bash
# Every deck key the documentation and the program's messages name exists. The keys are those declared in
# core/deck/config_keys.c (KEY(...) and ENUM(...) entries, "section.key"); a candidate is a word
# `section.key` ([a-z_]+ "." [a-z0-9_]+) whose section is one of theirs, found in docs/*.md, README.md,
# jobscripts/*, inputs/**/*.deck and inputs/**/README.md, and in the string literals of core/*.c.
# Not candidates: file names (a known extension after the dot: train.c, data.md, run.deck,
# metrics.csv), path components (core/drivers/train.c), parts of longer dotted names (h.0.moe.experts.c_fc),
# C comments, and the misspelt key of an "unknown key '...'" error example.
# Prints file:line for each unknown key and fails if there is one.
# Usage: keys_test.sh <source dir>
set -u
src=${1:?usage: keys_test.sh <source dir>}
cd "$src" || exit 2

keys=$(grep -oE '^[[:space:]]*(KEY|ENUM)\("[a-z_]+\.[a-z0-9_]+"' core/deck/config_keys.c | grep -oE '[a-z_]+\.[a-z0-9_]+' | LC_ALL=C sort -u)
[ "$(echo "$keys" | wc -l)" -ge 20 ] || { echo "FAIL: found only $(echo "$keys" | wc -w) keys in core/deck/config_keys.c"; exit 1; }
sections=$(echo "$keys" | cut -d. -f1 | LC_ALL=C sort -u | paste -sd'|')

# scan <mode> <files...>: prints "file:line:candidate" for each candidate (mode c: string literals only).
scan() {
  local mode=$1
  shift
  SECTIONS="$sections" MODE="$mode" perl -ne '
    BEGIN {
      $sec = $ENV{SECTIONS};
      $ext = "md|c|h|cu|cpp|so|a|o|deck|xml|sh|cmake|txt|csv|py|json|jsonl|bin|idx|safetensors|tmp|log|sbatch|qsub|html|pdf|in";
    }
    my $text = $_;
    if ($ENV{MODE} eq "c") {
      # The string literals of the line, outside comments (a block comment may span lines: $incomment).
      my @lits;
      pos($text) = 0;
      while (pos($text) < length($text)) {
        if ($incomment) { if ($text =~ /\G.*?\*\//gc) { $incomment = 0 } else { last } }
        elsif ($text =~ /\G\/\//gc) { last }
        elsif ($text =~ /\G\/\*/gc) { $incomment = 1 }
        elsif ($text =~ /\G"((?:[^"\\]|\\.)*)"/gc) { push @lits, $1 }
        elsif ($text =~ /\G\x27(?:[^\x27\\]|\\.)*\x27/gc) { }
        else { $text =~ /\G./gcs }
      }
      $text = join(" ", @lits);
    }
    while ($text =~ /(?<![A-Za-z0-9_.\/\-\$])((?:$sec)\.([a-z0-9_]+))(?![A-Za-z0-9_(]|\.[A-Za-z0-9_])/g) {
      next if $2 =~ /^(?:$ext)$/;
      # An example of the unknown-key error (docs/deck.md) misspells a key on purpose.
      next if substr($text, 0, $-[1]) =~ /unknown key \x27$/;
      print "$ARGV:$.:$1\n";
    }
    if (eof) { close ARGV; $incomment = 0 }   # line numbers and comments per file
  ' "$@"
}

# Self-check of the extraction on text with known answers, so that a broken pattern cannot pass by
# finding nothing.
probe=$(mktemp /tmp/dsmoe_keys.XXXXXX)
trap 'rm -f "$probe"' EXIT
printf '%s\n' 'set train.steps = 5 and train.stepz, see core/drivers/train.c, data.md, run.deck and metrics.csv;' \
              "h.0.moe.experts.c_fc.weight; train.steps. unknown key 'model.hiden'" > "$probe"
got=$(scan txt "$probe" | cut -d: -f3 | paste -sd' ')
if [ "$got" != "train.steps train.stepz train.steps" ]; then
  echo "FAIL: self-check: candidates '$got', expected 'train.steps train.stepz train.steps'"; exit 1
fi
printf '%s\n' 'fprintf(out, "use moe.top_k=%d", k); // "moe.bogus" in a comment is not a string' \
              '/* "run.x" */ x = '"'"'"'"'"'; s = "data.pathx"; /* "run.y"' ' "run.z" */ "model.layerz"' > "$probe"
got=$(scan c "$probe" | cut -d: -f3 | paste -sd' ')
if [ "$got" != "moe.top_k data.pathx model.layerz" ]; then
  echo "FAIL: self-check (C): candidates '$got', expected 'moe.top_k data.pathx model.layerz'"; exit 1
fi

docs=(docs/*.md README.md)
for f in jobscripts/* ; do [ -f "$f" ] && docs+=("$f"); done
while IFS= read -r f; do docs+=("$f"); done < <(find inputs \( -name '*.deck' -o -name 'README.md' \) -type f | LC_ALL=C sort)

found=$( { scan txt "${docs[@]}"; scan c core/*.c; } )
n_candidates=$(echo "$found" | grep -c . )
unknown=0
while IFS= read -r hit; do
  [ -n "$hit" ] || continue
  key=${hit##*:}
  if ! grep -qxF -- "$key" <<<"$keys"; then
    echo "unknown key: $hit"
    unknown=$((unknown + 1))
  fi
done <<<"$found"

echo "keys: $(echo "$keys" | wc -l) keys in sections ${sections//|/, }; $n_candidates mentions checked in ${#docs[@]} documents and core/*.c; $unknown unknown"
[ $unknown -eq 0 ]
