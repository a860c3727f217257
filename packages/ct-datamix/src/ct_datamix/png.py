"""A bar chart as a PNG, written with zlib only (no plotting library is a dependency)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def bar_chart(groups: list[list[float]], path: str | Path, width: int = 640, height: int = 320) -> None:
    """Grouped bars (one group per source, one bar per series, colours in PALETTE order); the zero
    line is drawn in grey, negative values hang below it. Labels live in the markdown table."""
    values = [v for g in groups for v in g] or [0.0]
    top, bottom = max(max(values), 0.0), min(min(values), 0.0)
    span = (top - bottom) or 1.0
    pix = [[(255, 255, 255)] * width for _ in range(height)]
    margin = 10
    zero = margin + int((top / span) * (height - 2 * margin))
    slot = (width - 2 * margin) / max(len(groups), 1)
    for gi, g in enumerate(groups):
        bw = max(int(slot * 0.8 / max(len(g), 1)), 1)
        for si, v in enumerate(g):
            x0 = int(margin + gi * slot + slot * 0.1 + si * bw)
            y = margin + int(((top - v) / span) * (height - 2 * margin))
            for yy in range(min(y, zero), max(y, zero) + 1):
                row = pix[yy]
                for xx in range(x0, min(x0 + bw - 1, width)):
                    row[xx] = PALETTE[si % len(PALETTE)]
    for xx in range(width):
        pix[zero][xx] = (128, 128, 128)
    raw = b"".join(b"\x00" + bytes(c for p in row for c in p) for row in pix)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)
