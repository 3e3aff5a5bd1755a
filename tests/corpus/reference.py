#!/usr/bin/env python3
# tests/corpus/reference.py: the .bin and .idx that scripts/prepare-corpus must write for local files,
# built from docs/data.md's layout alone (written apart from the script: fields assembled with
# int.to_bytes, no shared code). Byte tokenizer: one token per byte, its value as id; one document and
# one sequence per non-empty file. Usage: reference.py PREFIX uint8|uint16 FILE...
import sys

prefix, dtype, files = sys.argv[1], sys.argv[2], sys.argv[3:]
code, size = {"uint8": (1, 1), "uint16": (8, 2)}[dtype]
docs = []
for name in files:
    with open(name, "rb") as f:
        data = f.read()
    if data:
        docs.append(data)


def le(value, width):
    return value.to_bytes(width, "little", signed=True)


idx = bytearray(b"MMIDIDX" + bytes(2))   # magic, 9 bytes
idx += le(1, 8)                           # version
idx += bytes([code])                      # dtype code
idx += le(len(docs), 8)                   # sequence_count
idx += le(len(docs) + 1, 8)               # document_count: the boundaries 0 .. n
for d in docs:
    idx += le(len(d), 4)                  # sequence_lengths, tokens
offset = 0
for d in docs:
    idx += le(offset, 8)                  # sequence_pointers, bytes into .bin
    offset += len(d) * size
for i in range(len(docs) + 1):
    idx += le(i, 8)                       # document_indices
assert len(idx) == 34 + 12 * len(docs) + 8 * (len(docs) + 1)

binary = bytearray()
for d in docs:
    for byte in d:
        binary += byte.to_bytes(size, "little")
with open(prefix + ".idx", "wb") as f:
    f.write(idx)
with open(prefix + ".bin", "wb") as f:
    f.write(binary)
