"""HTTP byte ranges: ``Range`` headers, ``Content-Range``, ``multipart/byteranges`` bodies.

Pure functions, no I/O. Parts are located by the lengths their ``Content-Range`` headers
announce, not by scanning for the boundary, because blob bytes may contain the boundary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import FormatError

__all__ = [
    "ContentRange",
    "Part",
    "boundary_of",
    "parse_content_range",
    "parse_multipart_byteranges",
    "range_header",
    "slice_from_parts",
]

_CONTENT_RANGE_RE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", re.IGNORECASE)
_BOUNDARY_RE = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


@dataclass(frozen=True)
class ContentRange:
    """``bytes first-last/total``; ``total`` is ``None`` for ``*``."""

    first: int
    last: int
    total: int | None

    @property
    def length(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class Part:
    """One part of a multipart/byteranges body: bytes at ``offset``."""

    offset: int
    data: bytes


def range_header(ranges: Sequence[tuple[int, int]]) -> str:
    """``Range`` value for ``(offset, length)`` pairs (lengths must be positive)."""
    return "bytes=" + ",".join(f"{off}-{off + n - 1}" for off, n in ranges)


def parse_content_range(value: str | None) -> ContentRange | None:
    if value is None:
        return None
    m = _CONTENT_RANGE_RE.fullmatch(value)
    if m is None:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < first or (total is not None and last >= total):
        return None
    return ContentRange(first, last, total)


def boundary_of(content_type: str | None) -> str | None:
    """The boundary of a ``multipart/byteranges`` content type, else ``None``."""
    if not content_type or not content_type.lower().lstrip().startswith("multipart/byteranges"):
        return None
    m = _BOUNDARY_RE.search(content_type)
    if m is None:
        return None
    return m.group(1) or m.group(2)


def parse_multipart_byteranges(body: bytes, boundary: str) -> list[Part]:
    """Split a ``multipart/byteranges`` body (RFC 7233 appendix A) into parts."""
    delim = b"--" + boundary.encode("latin-1")
    pos = body.find(delim)
    if pos < 0:
        raise FormatError("multipart/byteranges body without its boundary")
    parts: list[Part] = []
    while True:
        pos += len(delim)
        if body.startswith(b"--", pos):
            return parts  # closing delimiter
        # Transport padding then CRLF, then the part's headers up to an empty line.
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise FormatError("truncated multipart/byteranges body")
        head_end = body.find(b"\r\n\r\n", eol)
        if head_end < 0:
            raise FormatError("truncated multipart/byteranges part headers")
        headers = body[eol + 2 : head_end].decode("latin-1")
        content_range: ContentRange | None = None
        for line in headers.split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-range":
                content_range = parse_content_range(value)
        if content_range is None:
            raise FormatError("multipart/byteranges part without a valid Content-Range")
        start = head_end + 4
        end = start + content_range.length
        if end > len(body):
            raise FormatError("truncated multipart/byteranges part")
        parts.append(Part(content_range.first, body[start:end]))
        pos = body.find(delim, end)
        if pos < 0:
            raise FormatError("multipart/byteranges body without its closing boundary")


def slice_from_parts(parts: Sequence[Part], offset: int, length: int) -> bytes:
    """The bytes of ``[offset, offset+length)`` from whichever part contains them.

    Servers may merge overlapping or adjacent requested ranges into one part (RFC 7233 §4.1).
    """
    for part in parts:
        start = offset - part.offset
        if start >= 0 and start + length <= len(part.data):
            return part.data[start : start + length]
    raise FormatError(f"multipart response lacks the requested range {offset}+{length}")
