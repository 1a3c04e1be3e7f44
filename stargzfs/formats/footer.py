"""Blob footers: where a layer's table of contents is, and in which format.

Pure byte logic. Four footers exist in the wild (see ``shared/formats.md``):

* eStargz (51 bytes): an empty gzip member whose FEXTRA field holds an RFC 1952 subfield
  ``SG`` of 22 bytes: ``%016x`` TOC offset + ``STARGZ``.
* legacy stargz (47 bytes): the same, but the 22 bytes are the whole extra field.
* zstd:chunked, stargz-snapshotter dialect (40-byte payload in a zstd skippable frame):
  u64 LE TOC offset, compressed size, uncompressed size, type (1), magic ``GnUlInUx``.
* zstd:chunked, containers/storage dialect (64 bytes): the same four fields, then tar-split
  offset, compressed and uncompressed sizes, then magic ``GNUlInUx``.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass

from ..errors import FormatError

__all__ = [
    "ESTARGZ_FOOTER_SIZE",
    "LEGACY_FOOTER_SIZE",
    "MAX_FOOTER_SIZE",
    "ZSTD_SKIPPABLE_MAGIC",
    "Footer",
    "LayerFormat",
    "detect_plain_format",
    "estargz_footer",
    "parse_footer",
]

ESTARGZ_FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
ZSTD_CHUNKED_FOOTER_SIZE = 40
ZSTD_CHUNKED_STORAGE_FOOTER_SIZE = 64
# The longest footer, plus the 8-byte skippable-frame header in front of a zstd footer.
MAX_FOOTER_SIZE = ZSTD_CHUNKED_STORAGE_FOOTER_SIZE + 8

ZSTD_SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_CHUNKED_MAGIC = b"GnUlInUx"
_ZSTD_CHUNKED_STORAGE_MAGIC = b"GNUlInUx"


class LayerFormat(enum.StrEnum):
    """What a layer blob is. Only the first three can be read lazily, per chunk."""

    ESTARGZ = "estargz"
    ZSTD_CHUNKED = "zstd:chunked"
    GZIP = "gzip"
    ZSTD = "zstd"
    TAR = "tar"

    @property
    def lazy(self) -> bool:
        return self in (LayerFormat.ESTARGZ, LayerFormat.ZSTD_CHUNKED)

    @property
    def compression(self) -> str:
        """``gzip``, ``zstd`` or ``none``: how the payload bytes are compressed."""
        if self in (LayerFormat.ESTARGZ, LayerFormat.GZIP):
            return "gzip"
        if self in (LayerFormat.ZSTD_CHUNKED, LayerFormat.ZSTD):
            return "zstd"
        return "none"


@dataclass(frozen=True, slots=True)
class Footer:
    """Where the TOC is. ``toc_size`` is only known for zstd:chunked (the TOC frame length);
    for eStargz the TOC member runs from ``toc_offset`` to the footer."""

    format: LayerFormat
    toc_offset: int
    footer_size: int
    toc_size: int | None = None
    toc_uncompressed_size: int | None = None
    dialect: str = ""  # "estargz", "stargz-legacy", "zstd-chunked-v1", "zstd-chunked-storage"


def _gzip_extra_footer(tail: bytes) -> bytes | None:
    """The FEXTRA payload of a footer-shaped empty gzip member, or None."""
    if len(tail) < 12 or tail[:4] != b"\x1f\x8b\x08\x04":
        return None
    xlen = struct.unpack_from("<H", tail, 10)[0]
    if 12 + xlen > len(tail):
        return None
    return tail[12 : 12 + xlen]


# What Go's strconv.ParseInt(s, 16, 64) accepts (upstream's parser): an optional sign and hex
# digits only. Python's int(s, 16) would also take "0x", "_" separators and blanks.
_GO_HEX = re.compile(rb"[+-]?[0-9a-fA-F]+")


def _parse_stargz_payload(payload: bytes, what: str) -> int:
    if len(payload) != 22 or payload[16:] != b"STARGZ":
        raise FormatError(f"{what} footer: bad magic")
    text = payload[:16]
    if not _GO_HEX.fullmatch(text):
        raise FormatError(f"{what} footer: TOC offset {text!r} is not hexadecimal")
    value = int(text, 16)
    if not -(1 << 63) <= value < 1 << 63:
        raise FormatError(f"{what} footer: TOC offset {text!r} is out of range")
    return value


def parse_footer(tail: bytes, blob_size: int) -> Footer | None:
    """Find a lazy-format footer at the end of ``tail`` (the last bytes of a blob).

    Returns None when no known footer is there (a plain gzip/zstd/tar layer). Raises
    :class:`FormatError` when a footer is recognisable but invalid (offset out of range).
    """
    footer = _try_parse(tail)
    if footer is None:
        return None
    limit = blob_size - footer.footer_size
    if not 0 <= footer.toc_offset < limit:
        raise FormatError(
            f"{footer.dialect} footer: TOC offset {footer.toc_offset} is outside the blob "
            f"({blob_size} bytes): truncated or corrupt"
        )
    if footer.toc_size is not None and footer.toc_offset + footer.toc_size > limit:
        raise FormatError(
            f"{footer.dialect} footer: TOC ({footer.toc_size} bytes at {footer.toc_offset}) "
            f"runs past the footer: truncated or corrupt"
        )
    return footer


def _try_parse(tail: bytes) -> Footer | None:
    if len(tail) >= ESTARGZ_FOOTER_SIZE:
        extra = _gzip_extra_footer(tail[-ESTARGZ_FOOTER_SIZE:])
        if extra is not None and len(extra) == 26 and extra[:2] == b"SG":
            sub_len = struct.unpack_from("<H", extra, 2)[0]
            if sub_len != 22:
                raise FormatError(f"eStargz footer: subfield length {sub_len}, expected 22")
            off = _parse_stargz_payload(extra[4:], "eStargz")
            return Footer(LayerFormat.ESTARGZ, off, ESTARGZ_FOOTER_SIZE, dialect="estargz")
    if len(tail) >= LEGACY_FOOTER_SIZE:
        extra = _gzip_extra_footer(tail[-LEGACY_FOOTER_SIZE:])
        if extra is not None and len(extra) == 22 and extra.endswith(b"STARGZ"):
            off = _parse_stargz_payload(extra, "legacy stargz")
            return Footer(LayerFormat.ESTARGZ, off, LEGACY_FOOTER_SIZE, dialect="stargz-legacy")
    if tail.endswith(_ZSTD_CHUNKED_STORAGE_MAGIC) and len(tail) >= 64:
        off, csize, usize, kind = struct.unpack_from("<QQQQ", tail, len(tail) - 64)
        if kind != 1:
            raise FormatError(f"zstd:chunked footer: unknown manifest type {kind}")
        return Footer(LayerFormat.ZSTD_CHUNKED, off, 64, csize, usize, "zstd-chunked-storage")
    if tail.endswith(_ZSTD_CHUNKED_MAGIC) and len(tail) >= 40:
        off, csize, usize, kind = struct.unpack_from("<QQQQ", tail, len(tail) - 40)
        if kind != 1:
            raise FormatError(f"zstd:chunked footer: unknown manifest type {kind}")
        # The 40 bytes sit in a skippable frame whose 8-byte header precedes them.
        size = 48 if tail[-48:-44] == ZSTD_SKIPPABLE_MAGIC else 40
        return Footer(LayerFormat.ZSTD_CHUNKED, off, size, csize, usize, "zstd-chunked-v1")
    return None


def detect_plain_format(head: bytes) -> LayerFormat:
    """Classify a layer without a lazy footer from its first bytes."""
    if head.startswith(GZIP_MAGIC):
        return LayerFormat.GZIP
    if head.startswith(ZSTD_MAGIC) or head.startswith(ZSTD_SKIPPABLE_MAGIC):
        return LayerFormat.ZSTD
    return LayerFormat.TAR


def estargz_footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer pointing at ``toc_offset`` (an empty gzip member)."""
    payload = b"SG" + struct.pack("<H", 22) + b"%016xSTARGZ" % toc_offset
    header = b"\x1f\x8b\x08\x04" + b"\x00\x00\x00\x00" + b"\x00\xff" + struct.pack("<H", 26)
    # An empty deflate stream (final stored block of length 0) + CRC32 0 + ISIZE 0.
    return header + payload + b"\x01\x00\x00\xff\xff" + b"\x00" * 8
