"""Writes the one-colour 16-bit RGBA PNGs the review tests send as input images (stdlib only):
tiny files that decode to 8 bytes a pixel. Run from this folder: python3 make_png16.py"""
import struct
import zlib


def png16(w, h, rgba=(9000, 20000, 40000, 65535), cut=0, paeth=False):
    """`cut` bytes are left off the end of the pixel data: a decoder reads nearly all of it
    before it finds the image broken. `paeth`: every row Paeth-filtered (for one colour, all
    zeros after the first pixel), which a decoder undoes byte by byte: slow to decode."""
    pixel = struct.pack(">4H", *rgba)
    if paeth:
        first = b"\x04" + pixel + bytes(8 * (w - 1))
        rest = b"\x04" + bytes(8 * w)
        rows = [first] + [rest] * (h - 1)
    else:
        rows = [b"\x00" + pixel * w] * h  # filter type 0 (None)
    c = zlib.compressobj(9)
    data = b"".join(c.compress(r) for r in rows) + c.flush()
    data = data[: len(data) - cut]

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


for w, h, cut, name in [
    (8192, 8192, 0, "bomb-8192x8192-rgba16.png"),
    (2048, 2048, 0, "flat-2048x2048-rgba16.png"),
]:
    with open(name, "wb") as f:
        f.write(png16(w, h, cut=cut))
with open("slow-cut-4096x2048-rgba16.png", "wb") as f:
    f.write(png16(4096, 2048, cut=64, paeth=True))
