#!/usr/bin/env python3
# A small Megatron indexed dataset (docs/data.md) for the paper_experiment test, without the network:
# the bytes of the given text files, one document each, as uint16 tokens (the byte tokenizer of
# scripts/prepare-corpus). Usage: make_corpus.py PREFIX FILE... -> PREFIX.bin + PREFIX.idx
import struct
import sys

prefix, files = sys.argv[1], sys.argv[2:]
docs = [open(f, "rb").read() for f in files]
with open(prefix + ".bin", "wb") as b:
    for d in docs:
        b.write(struct.pack(f"<{len(d)}H", *d))
pointers, at = [], 0
for d in docs:
    pointers.append(at)
    at += 2 * len(d)
with open(prefix + ".idx", "wb") as i:
    i.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(docs), len(docs) + 1))
    i.write(struct.pack(f"<{len(docs)}i", *[len(d) for d in docs]))
    i.write(struct.pack(f"<{len(docs)}q", *pointers))
    i.write(struct.pack(f"<{len(docs) + 1}q", *range(len(docs) + 1)))
