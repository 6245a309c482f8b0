"""An image's format and size read straight from its header, for JPEG, PNG and simple WebP.

Pillow's `Image.open` builds a whole image object (plugin lookup, EXIF and ICC parsing, for
WebP a libwebp demuxer) just to report a size: a noticeable share of a worker's CPU per image
when nothing is resized. These parsers walk the same structure Pillow walks to find the size
(JPEG markers up to the scan, PNG chunks up to the image data with their checksums, the WebP
RIFF frame) and refuse what Pillow refuses (other bit depths and layer counts, zero sizes).
Anything unusual or truncated answers None and the caller asks Pillow, so a strange file
always gets Pillow's verdict.
"""

from __future__ import annotations

import struct
import zlib

# JPEG start-of-frame markers (baseline, extended, progressive, lossless; Huffman or
# arithmetic); C4, C8 and CC share the range but are other segments.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7,
                  0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# The other segments an ordinary header holds: Huffman tables, restart interval, comments,
# application data (JFIF, Exif, ICC, XMP, Adobe). Any other marker is left to Pillow.
_PLAIN = frozenset({0xC4, 0xDD, 0xFE, *range(0xE0, 0xF0)})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_SEGMENTS = 512  # real headers have a few dozen at most


def probe(body: bytes) -> tuple[str, int, int] | None:
    """(Pillow's format name, width, height), or None: ask Pillow."""
    if body.startswith(b"\xff\xd8\xff"):
        return _jpeg(body)
    if body.startswith(_PNG_SIGNATURE):
        return _png(body)
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return _webp(body)
    return None


def _jpeg(body: bytes) -> tuple[str, int, int] | None:
    at, end = 2, len(body)
    size: tuple[int, int] | None = None
    for _ in range(_MAX_SEGMENTS):
        if at + 4 > end or body[at] != 0xFF:
            return None
        marker = body[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        length = (body[at + 2] << 8) | body[at + 3]
        stop = at + 2 + length
        if length < 2 or stop > end:
            return None
        data = body[at + 4:stop]
        if marker == 0xDA:  # start of scan: the header is complete
            return ("JPEG", *size) if size else None
        if marker in _SOF:
            if size is not None or length < 8:
                return None
            bits, height, width, layers = struct.unpack_from(">BHHB", data)
            if bits != 8 or layers not in (1, 3, 4) or not width or not height:
                return None
            size = (width, height)
        elif marker == 0xDB:
            if not _quantization_tables_fit(data):
                return None
        elif marker not in _PLAIN or not _app_data_plain(marker, data):
            return None
        at = stop
    return None


def _quantization_tables_fit(data: bytes) -> bool:
    """Pillow refuses a DQT segment whose last table is cut short."""
    at = 0
    while at < len(data):
        at += 1 + (64 if data[at] >> 4 == 0 else 128)
        if at > len(data):
            return False
    return True


def _app_data_plain(marker: int, data: bytes) -> bool:
    """Application segments Pillow reads fields from must be long enough to hold them; a
    multi-picture file (MPF) is one Pillow names MPO."""
    if marker == 0xE0 and data.startswith(b"JFIF"):
        return len(data) >= 7
    if marker == 0xE2:
        if data.startswith(b"MPF\0"):
            return False
        if data.startswith(b"ICC_PROFILE\0"):
            return len(data) >= 14
    return True


def _png(body: bytes) -> tuple[str, int, int] | None:
    if len(body) < 33 or body[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    width, height = struct.unpack_from(">II", body, 16)
    if not (0 < width < 2**31 and 0 < height < 2**31):
        return None
    at, end = 8, len(body)
    for _ in range(_MAX_SEGMENTS):
        if at + 12 > end:
            return None
        length, kind = struct.unpack_from(">I4s", body, at)
        if kind == b"IDAT":
            return "PNG", width, height
        stop = at + 8 + length
        if length >= 2**31 or stop + 4 > end:
            return None
        if zlib.crc32(body[at + 4:stop]) != struct.unpack_from(">I", body, stop)[0]:
            return None
        at = stop + 4
    return None


def _webp(body: bytes) -> tuple[str, int, int] | None:
    """The simple format: one VP8 (lossy) or VP8L (lossless) chunk filling the RIFF, with the
    frame-header checks libwebp's demuxer makes before Pillow gets a size."""
    if len(body) < 30 or struct.unpack_from("<I", body, 4)[0] + 8 != len(body):
        return None
    chunk, chunk_size = body[12:16], struct.unpack_from("<I", body, 16)[0]
    if 20 + chunk_size + (chunk_size & 1) != len(body):
        return None
    if chunk == b"VP8 " and body[23:26] == b"\x9d\x01\x2a":
        tag = int.from_bytes(body[20:23], "little")
        key_frame, version, shown, partition = not tag & 1, (tag >> 1) & 7, tag >> 4 & 1, \
            tag >> 5
        if not key_frame or version > 3 or not shown or partition >= chunk_size:
            return None
        width, height = struct.unpack_from("<HH", body, 26)
        width, height = width & 0x3FFF, height & 0x3FFF
    elif chunk == b"VP8L" and body[20] == 0x2F:
        bits = int.from_bytes(body[21:25], "little")
        if bits >> 29:  # version bits
            return None
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    else:  # VP8X (alpha, animation, metadata) is left to Pillow's demuxer
        return None
    return ("WEBP", width, height) if width and height else None
