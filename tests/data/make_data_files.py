#!/usr/bin/env python3
"""Writes the tiny IDX and image files under tests/data/idx and tests/data/images (deterministic).

Run from anywhere: python3 tests/data/make_data_files.py. Only the standard library is used.
"""
import gzip
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
IDX = os.path.join(HERE, "idx")
IMAGES = os.path.join(HERE, "images")


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def idx(dims, payload, dtype=0x08, magic=b"\x00\x00"):
    return magic + bytes([dtype, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + bytes(payload)


def png(width, height, channels, pixel):
    """PNG (RFC 2083) with colour type 0 (grey) or 2 (RGB), 8 bits, no filtering."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    rows = b""
    for y in range(height):
        rows += b"\x00" + bytes(v for x in range(width) for v in pixel(x, y))
    colour = 0 if channels == 1 else 2
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def bmp(width, height, pixel):
    """24-bit BMP: BITMAPINFOHEADER, bottom-up BGR rows padded to 4 bytes."""
    row_size = (3 * width + 3) // 4 * 4
    data = b""
    for y in reversed(range(height)):
        row = b"".join(bytes(reversed(pixel(x, y))) for x in range(width))
        data += row + b"\x00" * (row_size - len(row))
    header = struct.pack("<2sIHHI", b"BM", 54 + len(data), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(data), 2835, 2835, 0, 0)
    return header + info + data


def main():
    # 4 images of 3 x 5 pixels, value 16 * n + 3 * y + x; labels 0 2 1 2.
    n, h, w = 4, 3, 5
    pixels = [16 * i + 3 * y + x for i in range(n) for y in range(h) for x in range(w)]
    images = idx([n, h, w], pixels)
    labels = idx([n], [0, 2, 1, 2])
    write(os.path.join(IDX, "tiny-images-idx3-ubyte"), images)
    write(os.path.join(IDX, "tiny-labels-idx1-ubyte"), labels)
    write(os.path.join(IDX, "tiny-images-idx3-ubyte.gz"), gzip.compress(images, 9, mtime=0))
    write(os.path.join(IDX, "tiny-labels-idx1-ubyte.gz"), gzip.compress(labels, 9, mtime=0))
    # Malformed files: each must give input_error naming the file.
    write(os.path.join(IDX, "truncated-images-idx3-ubyte"), images[:-10])
    write(os.path.join(IDX, "trailing-images-idx3-ubyte"), images + b"\x00\x01\x02")
    write(os.path.join(IDX, "short-header-idx3-ubyte"), images[:9])
    write(os.path.join(IDX, "wrong-magic-idx3-ubyte"), idx([n, h, w], pixels, magic=b"\x08\x03"))
    write(os.path.join(IDX, "float-images-idx3-ubyte"), idx([n, h, w], pixels * 4, dtype=0x0D))
    write(os.path.join(IDX, "overflow-images-idx3-ubyte"), idx([0xFFFFFFFF] * 3, pixels))
    write(os.path.join(IDX, "rank0-idx"), idx([], []))
    write(os.path.join(IDX, "count-mismatch-labels-idx1-ubyte"), idx([3], [0, 1, 2]))
    gz = bytearray(gzip.compress(images, 9, mtime=0))
    for i in range(12, 20):
        gz[i] ^= 0x5A  # damage the deflate stream
    write(os.path.join(IDX, "corrupt-images-idx3-ubyte.gz"), bytes(gz))
    write(os.path.join(IDX, "truncated-images-idx3-ubyte.gz"), gzip.compress(images, 9, mtime=0)[:-12])
    write(os.path.join(IDX, "garbage-after-images-idx3-ubyte.gz"), gzip.compress(images, 9, mtime=0) + b"junk")

    # Images.
    write(os.path.join(IMAGES, "corrupt.png"), b"\x89PNG\r\n\x1a\n" + bytes(range(7, 200, 3)))
    write(os.path.join(IMAGES, "mixed", "a.png"), png(8, 8, 1, lambda x, y: (8 * y + x,)))
    write(os.path.join(IMAGES, "mixed", "b.png"), png(16, 16, 1, lambda x, y: (x + y,)))
    # A class set: cat (2 RGB PNGs, one with an upper-case suffix), dog (a grey PNG and a BMP), a text file.
    write(os.path.join(IMAGES, "classes", "cat", "0.png"), png(8, 8, 3, lambda x, y: (200, 10 * x, 10 * y)))
    write(os.path.join(IMAGES, "classes", "cat", "1.PNG"), png(8, 8, 3, lambda x, y: (180, 20, 5 * (x + y))))
    write(os.path.join(IMAGES, "classes", "dog", "0.png"), png(8, 8, 1, lambda x, y: (30 + x,)))
    write(os.path.join(IMAGES, "classes", "dog", "1.bmp"), bmp(8, 8, lambda x, y: (10, 100 + y, 250)))
    write(os.path.join(IMAGES, "classes", "dog", "notes.txt"), b"not an image\n")


if __name__ == "__main__":
    main()
