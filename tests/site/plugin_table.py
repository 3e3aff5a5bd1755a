#!/usr/bin/env python3
# tests/site/plugin_table.py: what a plugin's table declares, read with ctypes, not with dsmoe's loader: the
# independent side of config_test.sh's plugin checks. Calls the entry symbol named in the ABI header and
# reads the leading members of the table (include/dsmoe/kernel_plugin.h, comm_plugin.h), which every
# version of the table starts with.
# Usage: plugin_table.py <source dir> <kind: kernel|comm> <plugin file>
# Prints one line per member: api_version, name, description, then kernel: mem_kind, caps, dtypes;
# comm: mem_kinds, caps, mpi_abi. Numbers in hex as 0x...
import ctypes
import re
import sys


def entry_symbol(src, kind):
    text = open(f"{src}/include/dsmoe/{kind}_plugin.h").read()
    m = re.search(r'#define DSMOE_%s_PLUGIN_SYMBOL "([A-Za-z0-9_]+)"' % kind.upper(), text)
    if not m:
        sys.exit(f"no DSMOE_{kind.upper()}_PLUGIN_SYMBOL in {src}/include/dsmoe/{kind}_plugin.h")
    return m.group(1)


class KernelHead(ctypes.Structure):
    _fields_ = [("api_version", ctypes.c_uint32), ("name", ctypes.c_char_p), ("description", ctypes.c_char_p),
                ("mem_kind", ctypes.c_uint32), ("caps", ctypes.c_uint32), ("dtypes", ctypes.c_uint32)]


class CommHead(ctypes.Structure):
    _fields_ = [("api_version", ctypes.c_uint32), ("name", ctypes.c_char_p), ("description", ctypes.c_char_p),
                ("mem_kinds", ctypes.c_uint32), ("caps", ctypes.c_uint32), ("mpi_abi", ctypes.c_char_p)]


def main():
    if len(sys.argv) != 4 or sys.argv[2] not in ("kernel", "comm"):
        sys.exit("usage: plugin_table.py <source dir> <kernel|comm> <plugin file>")
    src, kind, path = sys.argv[1:]
    lib = ctypes.CDLL(path)
    entry = getattr(lib, entry_symbol(src, kind))
    head = KernelHead if kind == "kernel" else CommHead
    entry.restype = ctypes.POINTER(head)
    t = entry().contents
    for name, ctype in head._fields_:
        v = getattr(t, name)
        if ctype is ctypes.c_uint32 and name != "api_version":
            print(f"{name}=0x{v:x}")
        elif ctype is ctypes.c_char_p:
            print(f"{name}={v.decode() if v is not None else ''}")
        else:
            print(f"{name}={v}")


main()
