#!/usr/bin/env python3
# tests/plot/png_check.py FILE WIDTH HEIGHT: exit 0 when FILE is a whole, valid PNG of WIDTH x HEIGHT
# pixels, else print why and exit 1. Checked from the bytes (PNG specification, ISO/IEC 15948): the
# signature; IHDR first, of 13 bytes, with the size; every chunk's CRC-32; IEND last, nothing after it;
# and the IDAT stream inflates to exactly the filtered scanlines the header implies (height rows of one
# filter byte plus width * bits-per-pixel / 8 bytes), each filter byte 0-4.
import struct
import sys
import zlib

CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


def check(path, want_w, want_h):
    with open(path, "rb") as f:
        data = f.read()
    if len(data) == 0:
        return "empty file"
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return "no PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        if pos + 12 > len(data):
            return f"truncated chunk at byte {pos}"
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            return f"chunk {kind!r} runs past the end of the file"
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            return f"chunk {kind!r} at byte {pos}: bad CRC"
        chunks.append((kind, body))
        pos += 12 + length
        if kind == b"IEND":
            break
    if pos != len(data):
        return f"{len(data) - pos} bytes after IEND"
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        return "the first chunk is not a 13-byte IHDR"
    if chunks[-1][0] != b"IEND":
        return "no IEND chunk"
    w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if (w, h) != (want_w, want_h):
        return f"{w}x{h} pixels, expected {want_w}x{want_h}"
    if colour not in CHANNELS or depth not in (1, 2, 4, 8, 16):
        return f"colour type {colour} / bit depth {depth} is not valid"
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    if interlace == 0:
        row = 1 + (w * CHANNELS[colour] * depth + 7) // 8
        if len(raw) != h * row:
            return f"image data inflates to {len(raw)} bytes, expected {h} rows of {row}"
        bad = [y for y in range(h) if raw[y * row] > 4]
        if bad:
            return f"row {bad[0]}: filter type {raw[bad[0] * row]} (0-4 are defined)"
    return None


if __name__ == "__main__":
    why = check(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    if why:
        print(f"{sys.argv[1]}: {why}")
        sys.exit(1)
