#!/usr/bin/env bash
# scripts/prepare-corpus without the network: its .bin/.idx for local files against the pair that
# tests/corpus/reference.py builds from docs/data.md (byte for byte, uint16 and uint8), document and token
# counts against the files' sizes, dsmoe reading the pair back (--check's data line, a 2-step training,
# the byte 255 refused by model.vocab = 255: token id = byte), the POD stripper against a hand-written
# text, the same output twice, and the refusals (apt-get cannot fetch, a bad --deb, a missing file).
# Usage: corpus_test.sh <dsmoe binary> <source dir>
set -u
dsmoe=$1
src=$2
prep=$src/scripts/prepare-corpus
here=$src/tests/corpus
work=$(mktemp -d /tmp/dsmoe_corpus.XXXXXX)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1
unset DSMOE_PLUGIN_PATH
source "$src/tests/cli/lib.sh" # fail, ok, show, expect, finish
command -v python3 > /dev/null || { echo "SKIP: scripts/prepare-corpus needs python3"; exit 77; }

# The documents: English text, UTF-8, an empty file (skipped), and every byte value once.
cat > "$work/a.txt" <<'TEXT'
Perl is a highly capable, feature-rich programming language with over 30 years of development.
It runs on over 100 platforms from portables to mainframes and is suitable for both rapid
prototyping and large scale development projects.
TEXT
printf 'Caf\xc3\xa9 cr\xc3\xa8me, na\xc3\xafve r\xc3\xa9sum\xc3\xa9 \xe2\x80\x94 bytes, not characters.\n' > "$work/b.txt"
: > "$work/empty.txt"
python3 -c 'import sys; sys.stdout.buffer.write(bytes(range(256)))' > "$work/all.bin"
files=("$work/a.txt" "$work/b.txt" "$work/empty.txt" "$work/all.bin")
tokens=$(cat "${files[@]}" | wc -c)
docs=0
for f in "${files[@]}"; do [ -s "$f" ] && docs=$((docs + 1)); done
[ "$docs" -eq 3 ] && [ "$tokens" -gt 400 ] || fail "the test's own files: $docs documents, $tokens bytes"

# The writer against the reference, both dtypes.
for dtype in uint16 uint8; do
  expect "prepare $dtype" 0 "wrote .*: $docs documents \(1 empty skipped\), $tokens tokens \($dtype" -- \
    "$prep" --files "${files[@]}" --dtype "$dtype" --output "$work/$dtype"
  python3 "$here/reference.py" "$work/ref-$dtype" "$dtype" "${files[@]}" || fail "reference.py $dtype"
  for ext in idx bin; do
    cmp "$work/$dtype.$ext" "$work/ref-$dtype.$ext" && ok || fail "$dtype.$ext differs from the reference"
  done
done
[ "$(stat -c %s "$work/uint16.bin")" -eq $((2 * tokens)) ] && ok || fail "uint16.bin is not 2 bytes per input byte"
ls "$work" | grep -q '\.tmp\.' && fail "a temporary file was left behind" || ok

# Deterministic: the same input gives the same bytes.
"$prep" --files "${files[@]}" --output "$work/again" > /dev/null || fail "second run"
cmp "$work/again.bin" "$work/uint16.bin" && cmp "$work/again.idx" "$work/uint16.idx" && ok || fail "two runs differ"

# dsmoe reads them back.
deck="$work/tiny.deck"
cat > "$deck" <<DECK
[run]
output_dir = $work/out
log_every = 1
[model]
vocab = 256
seq_len = 8
layers = 2
hidden = 16
heads = 2
[moe]
experts = 2
[train]
steps = 2
batch = 2
eval_every = 0
eval_batches = 1
[data]
source = megatron
path = $work/uint16
valid_fraction = 0.1
[checkpoint]
every = 0
DECK
for dtype in uint16 uint8; do
  expect "dsmoe --check $dtype" 0 "data: megatron: 1 prefix, $docs documents, $tokens tokens \($dtype\)" -- \
    "$dsmoe" --check "$deck" data.path="$work/$dtype"
done
expect "2-step training" 0 "step +2/2 \| loss [0-9]+\.[0-9]+" -- "$dsmoe" "$deck"
# all.bin is the third document (sequence 2); its byte 255 sits at position 255 and is token 255.
expect "token = byte" nonzero "uint16\.bin: sequence 2 holds token 255 \(position 255\)" -- \
  "$dsmoe" --check "$deck" model.vocab=255

# POD to text: the sample against the text worked out by hand.
"$prep" --files "$here/sample.pod" --pod --dtype uint8 --output "$work/pod" > /dev/null || fail "prepare --pod"
cmp "$work/pod.bin" "$here/sample.txt" && ok || { fail "sample.pod: text differs from sample.txt"; diff "$work/pod.bin" "$here/sample.txt"; }

# Refusals: nothing is written.
mkdir -p "$work/fakebin"
cat > "$work/fakebin/apt-get" <<'FAKE'
#!/bin/sh
echo "E: Failed to fetch http://deb.debian.org/debian/pool/main/p/perl/perl-doc.deb  Temporary failure resolving 'deb.debian.org'" >&2
exit 100
FAKE
chmod +x "$work/fakebin/apt-get"
expect "no network" nonzero "^prepare-corpus: error: cannot fetch perl-doc: .apt-get .*download perl-doc. failed" -- \
  env PATH="$work/fakebin:$PATH" "$prep" --output "$work/fetched"
expect "no network: apt's reason" nonzero "^E: Failed to fetch .*Temporary failure resolving" -- \
  env PATH="$work/fakebin:$PATH" "$prep" --output "$work/fetched"
[ -e "$work/fetched.bin" ] || [ -e "$work/fetched.idx" ] && fail "a refused fetch wrote files" || ok
expect "bad --deb" nonzero "error: .*a.txt is not a readable \.deb" -- "$prep" --deb "$work/a.txt" --output "$work/deb"
expect "missing file" nonzero "error: cannot read $work/nothing.txt" -- "$prep" --files "$work/nothing.txt" --output "$work/x"
expect "only empty files" nonzero "error: no text" -- "$prep" --files "$work/empty.txt" --output "$work/x"

finish corpus
