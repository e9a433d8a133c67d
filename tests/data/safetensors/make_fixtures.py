#!/usr/bin/env python3
"""Writes the small safetensors fixtures of this folder (run from anywhere; standard library only).

valid_small.safetensors is laid out exactly as diffuse's writer lays it out (tensors sorted by name,
compact JSON, "__metadata__" first, padded with spaces so that 8 + N is a multiple of 8), so that
re-serializing it must reproduce it byte for byte. Every other file is malformed in one way; the
test table in tests/io_safetensors_test.cpp names the error each must raise.
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def pack(header_text, data=b"", pad=True):
    h = header_text.encode("utf-8")
    if pad:
        h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def compact(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def write(name, data):
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)


def valid_small():
    tensors = [  # (name, dtype, shape, raw little-endian bytes), already sorted by name
        ("a.mask", "BOOL", [3], bytes([1, 0, 1])),
        ("b.bf16", "BF16", [2, 2], struct.pack("<4H", 0x3F80, 0xC000, 0x3EAB, 0x0000)),  # 1 -2 0.333984 0
        ("c.half", "F16", [3], struct.pack("<3e", 0.5, -1.25, 65504.0)),
        ("d.steps", "I64", [2], struct.pack("<2q", 10, -937)),
        ("e.pixels", "U8", [2, 3], bytes([0, 1, 127, 128, 254, 255])),
        ("f.weight", "F32", [2, 1], struct.pack("<2f", 3.5, -0.125)),
        ("g.scalar", "F64", [], struct.pack("<d", 2.718281828459045)),
        ("h.empty", "I32", [0, 4], b""),
    ]
    header = {"__metadata__": {"format": "pt", "note": "diffuse test"}}
    data = b""
    for name, dtype, shape, raw in tensors:
        header[name] = entry(dtype, shape, len(data), len(data) + len(raw))
        data += raw
    return pack(compact(header), data)


def main():
    write("valid_small.safetensors", valid_small())
    write("truncated_prefix.safetensors", b"\x10\x00\x00\x00\x00")
    # The prefix announces 1000 header bytes; the file holds 32.
    write("header_too_long.safetensors", struct.pack("<Q", 1000) + b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'[:24])
    write("invalid_json.safetensors", pack('{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]', b"\x00" * 4))
    write("unknown_dtype.safetensors", pack(compact({"a": entry("F8_E4M3", [4], 0, 4)}), b"\x00" * 4))
    write("overlap.safetensors",
          pack(compact({"a": entry("U8", [8], 0, 8), "b": entry("U8", [8], 4, 12)}), bytes(range(12))))
    write("gap.safetensors",
          pack(compact({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 8, 12)}), bytes(range(12))))
    write("trailing_bytes.safetensors", pack(compact({"a": entry("F32", [1], 0, 4)}), b"\x00" * 8))
    write("duplicate_names.safetensors",
          pack('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
               '"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}', b"\x01\x02\x03\x04"))
    write("shape_mismatch.safetensors", pack(compact({"a": entry("F32", [2, 2], 0, 12)}), b"\x00" * 12))
    # A legacy torch.save file opens with a pickled magic number: PROTO 2, LONG1 0x1950a86a20f9469cfc6c.
    write("pickle_legacy.safetensors", b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e" + b"\x00" * 17)
    # torch.save since PyTorch 1.6: a zip archive.
    write("pickle_zip.safetensors", b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"archive/data.pkl" + b"\x00" * 6)


if __name__ == "__main__":
    main()
