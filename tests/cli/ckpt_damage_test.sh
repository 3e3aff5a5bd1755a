#!/usr/bin/env bash
# A damaged checkpoint never loads silently (docs/checkpoint.md, "Verification"). A short training run
# writes good checkpoints; copies are damaged here (python3, with its own CRC32C from the definition):
# a flipped data byte, a header length 4 and 1 short, a truncation, NaN and -Inf in a tensor with its
# checksum fixed, a tensor's shape transposed and its dtype changed (the same bytes), another program's
# safetensors metadata, another format version, step = 4294967297 and -1, next_sample = -1, a training
# split's window count that is not a number; each is refused naming the file and the tensor or field. A
# copy without checksums loads with a warning, one without the training split's counts loads.
# checkpoint.resume = auto skips a damaged newest file and resumes from the one before, saying so, and
# removes a dead save's temporary.
# Usage: ckpt_damage_test.sh <dsmoe binary>
set -u
dsmoe=$1
work=$(mktemp -d /tmp/dsmoe_ckpt.XXXXXX)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1
unset DSMOE_PLUGIN_PATH
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # fail, ok, show, expect, finish

tiny="$work/tiny.deck"
cat > "$tiny" <<DECK
[run]
output_dir = $work/out
[model]
vocab = 32
seq_len = 8
layers = 2
hidden = 16
heads = 2
[moe]
experts = 4
[train]
steps = 3
batch = 4
eval_batches = 1
[data]
synthetic_sources = 2
synthetic_branching = 2
[checkpoint]
every = 1
keep = 3
DECK

# damage <in> <out> <what>: a damaged copy. The header is rewritten as dsmoe writes it (compact JSON,
# spaces up to a multiple of 8) when metadata or checksums change.
damage() {
  python3 - "$1" "$2" "$3" <<'PY'
import json, struct, sys
src, dst, what = sys.argv[1:]
b = bytearray(open(src, "rb").read())
n = struct.unpack("<Q", b[:8])[0]
h = json.loads(b[8:8 + n])
data = b[8 + n:]
def crc32c(buf):  # bit by bit, reflected polynomial 0x82F63B78
    c = 0xFFFFFFFF
    for x in buf:
        c ^= x
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 & -(c & 1))
    return c ^ 0xFFFFFFFF
def header(h):
    j = json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode()
    return j + b" " * ((8 - len(j) % 8) % 8)
meta = h["__metadata__"]
if what == "flip":
    b[len(b) - 3] ^= 0x04
elif what in ("short4", "short1"):
    b[:8] = struct.pack("<Q", n - int(what[5:]))
elif what == "trunc":
    b = b[:len(b) - 100]
else:
    if what == "nan":
        t = h["wte.weight"]
        lo, hi = t["data_offsets"]
        data[lo + 4 * 5:lo + 4 * 6] = struct.pack("<f", float("nan"))
        meta["crc32c.wte.weight"] = "%08x" % crc32c(data[lo:hi])
    elif what == "inf":
        t = h["wpe.weight"]
        lo, hi = t["data_offsets"]
        data[lo + 4 * 7:lo + 4 * 8] = struct.pack("<f", float("-inf"))
        meta["crc32c.wpe.weight"] = "%08x" % crc32c(data[lo:hi])
    elif what == "shape":  # the same bytes, read as the transposed shape
        h["wte.weight"]["shape"] = h["wte.weight"]["shape"][::-1]
    elif what == "dtype":  # the same bytes, as 32-bit integers
        h["wte.weight"]["dtype"] = "I32"
    elif what == "foreign":  # a safetensors file of another program (PyTorch's own metadata)
        h["__metadata__"] = {"format": "pt"}
    elif what == "version":
        meta["format_version"] = "99"
    elif what == "step_big":
        meta["step"] = "4294967297"
    elif what == "step_neg":
        meta["step"] = "-1"
    elif what == "sample_neg":
        meta["next_sample"] = "-1"
    elif what == "windows_bad":
        meta["data_train_windows"] = "12x"
    elif what == "data_seed_bad":
        meta["data_seed"] = "0x10"
    elif what == "nodata":  # a file of a dsmoe that did not record the training split nor the data seed
        del meta["data_train_windows"], meta["data_train_tokens"], meta["data_seed"]
    elif what == "nocrc":
        for k in [k for k in meta if k.startswith("crc32c.")]:
            del meta[k]
    else:
        sys.exit("unknown damage " + what)
    j = header(h)
    b = struct.pack("<Q", len(j)) + j + data
open(dst, "wb").write(b)
PY
}

expect train 0 "checkpoint: .*step_00000003.safetensors" -- "$dsmoe" "$tiny"
good="$work/out/checkpoints/step_00000003.safetensors"
grep -aq '"crc32c.wte.weight":"[0-9a-f]\{8\}"' "$good" && ok || fail "no checksum for wte.weight in the written header"
expect good 0 "eval: validation loss [0-9.]+" -- "$dsmoe" "$tiny" run.mode=eval checkpoint.resume="$good"

# Every damage refused, naming the file and what is wrong with it.
refuse() { # refuse <damage> <regex after the file name>
  damage "$good" "$work/$1.safetensors" "$1" || { fail "$1: could not make the damaged copy"; return; }
  expect "$1" nonzero "$1\.safetensors.*$2" -- "$dsmoe" "$tiny" run.mode=eval checkpoint.resume="$work/$1.safetensors"
  expect "$1-train" nonzero "$1\.safetensors.*$2" -- "$dsmoe" "$tiny" train.steps=4 checkpoint.resume="$work/$1.safetensors" \
    run.output_dir="$work/out_$1"
}
refuse flip "tensor '[^']+': its bytes have CRC32C [0-9a-f]{8} but the header records [0-9a-f]{8}"
refuse short4 "(header length [0-9]+ leaves [0-9]+ padding spaces|bad JSON header|the data buffer holds)"
refuse short1 "(header length [0-9]+ leaves [0-9]+ padding spaces|bad JSON header|the data buffer holds)"
refuse trunc "tensor '[^']+' data_offsets .* run past the data buffer"
refuse nan "tensor 'wte.weight' holds NaN at element 5"
refuse inf "tensor 'wpe.weight' holds -Inf at element 7"
refuse shape "tensor 'wte.weight' is F32 \\[16, 32\\], the deck's model needs F32 \\[32, 16\\]"
refuse dtype "tensor 'wte.weight' is I32 \\[32, 16\\], the deck's model needs F32 \\[32, 16\\]"
refuse foreign "is not a dsmoe checkpoint \\(metadata format = 'pt', expected '[a-z-]+'\\)"
refuse version "has format version '99'; this dsmoe reads version [0-9]+"
refuse step_big "metadata 'step' = '4294967297' is not a number in \[0, 2147483647\]"
refuse step_neg "metadata 'step' = '-1' is not a number"
refuse sample_neg "metadata 'next_sample' = '-1' is not a number"
refuse windows_bad "metadata 'data_train_windows' = '12x' is not a number"
refuse data_seed_bad "metadata 'data_seed' = '0x10' is not a number"
[ -e "$work/out_flip/checkpoints" ] && fail "a refused resume wrote checkpoints" || ok

# Another run.seed is refused on resume (it would silently change the data stream), unless allowed.
expect seed-change nonzero "written by a run with run.seed = 1234; this deck has run.seed = 99.*checkpoint.allow_seed_change" -- \
  "$dsmoe" "$tiny" train.steps=4 run.seed=99 checkpoint.resume="$good" run.output_dir="$work/out_seed"
expect seed-change-allowed 0 "run.seed changes from 1234 to 99" -- "$dsmoe" "$tiny" train.steps=4 run.seed=99 \
  checkpoint.allow_seed_change=true checkpoint.resume="$good" run.output_dir="$work/out_seed2"
# data.seed keys the data order when set: another effective data seed is the same change, refused unless
# allowed; data.seed = run.seed is no change.
expect data-seed-change nonzero "data order had seed 1234 \\(data.seed, or run.seed when data.seed = 0\\); this deck's has 7.*checkpoint.allow_seed_change" -- \
  "$dsmoe" "$tiny" train.steps=4 data.seed=7 checkpoint.resume="$good" run.output_dir="$work/out_dseed"
expect data-seed-change-allowed 0 "the data order's seed changes from 1234 to 7" -- "$dsmoe" "$tiny" train.steps=4 \
  data.seed=7 checkpoint.allow_seed_change=true checkpoint.resume="$good" run.output_dir="$work/out_dseed2"
expect data-seed-same 0 "resumed from .* at step 3" -- "$dsmoe" "$tiny" train.steps=4 data.seed=1234 \
  checkpoint.resume="$good" run.output_dir="$work/out_dseed3"

# The damage script itself: the NaN copy's checksum was recomputed right, so the NaN check refused it
# (not the CRC), and the copy without checksums loads, with a warning.
damage "$good" "$work/nocrc.safetensors" nocrc
expect nocrc 0 "warning: checkpoint .*nocrc.safetensors has no checksums" -- \
  "$dsmoe" "$tiny" run.mode=eval checkpoint.resume="$work/nocrc.safetensors"
# A file without the training split's counts (an older dsmoe's) resumes (cli_test checks the warning
# when the counts differ).
damage "$good" "$work/nodata.safetensors" nodata
expect nodata 0 "resumed from .*nodata.safetensors at step 3" -- "$dsmoe" "$tiny" train.steps=4 \
  checkpoint.resume="$work/nodata.safetensors" run.output_dir="$work/out_nodata"

# auto: the newest (step 3) is damaged, step 2 is good; a dead save's temporary lies next to them.
ck="$work/out/checkpoints"
damage "$good" "$ck/step_00000003.safetensors" flip
echo partial > "$ck/step_00000004.safetensors.tmp.999999999"
expect auto-eval 0 "skipped .*step_00000003.safetensors, which does not verify: .*tensor '[^']+': its bytes have CRC32C" -- \
  "$dsmoe" "$tiny" run.mode=eval checkpoint.resume=auto
expect auto 0 "resumed from .*step_00000002.safetensors at step 2" -- "$dsmoe" "$tiny" train.steps=3 checkpoint.resume=auto
[ ! -e "$ck/step_00000004.safetensors.tmp.999999999" ] && ok || fail "the stale temporary is still there"
# A stale temporary is reported when removed.
echo partial > "$ck/step_00000009.safetensors.tmp.999999998"
expect stale 0 "checkpoint: removed .*step_00000009.safetensors.tmp.999999998, left by an interrupted save" -- \
  "$dsmoe" "$tiny" train.steps=4 checkpoint.resume=auto
# Nothing verifies: auto fails rather than starting over.
for f in "$ck"/step_*.safetensors; do damage "$f" "$f.bad" trunc && mv "$f.bad" "$f"; done
expect auto-none nonzero "checkpoint.resume = auto: none of the [0-9]+ checkpoints in .* verifies; the newest: .*step_00000004.safetensors" -- \
  "$dsmoe" "$tiny" train.steps=5 checkpoint.resume=auto

finish ckpt_damage_test
