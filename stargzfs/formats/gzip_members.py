"""Writing single gzip members, the unit an eStargz blob is made of.

An eStargz blob is a concatenation of independent gzip members (RFC 1952), so each member can be
compressed on its own, in any thread, and stitched in order afterwards. The helpers here write the
gzip framing by hand around raw deflate data instead of letting zlib do it (``wbits=31``): zlib
stamps its compile-time OS code into the header, which would make blobs differ between platforms.
We always write MTIME=0 and OS=255 ("unknown"), like Go's ``compress/gzip`` that upstream uses.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

__all__ = [
    "ESTARGZ_FOOTER_SIZE",
    "BytesLike",
    "MemberWriter",
    "compress_member",
    "compress_member_parts",
    "member_header",
]

BytesLike = bytes | bytearray | memoryview

ESTARGZ_FOOTER_SIZE = 51

_OS_UNKNOWN = 255
_FEXTRA = 0x04
# Incompressible data (already-compressed files: .gz, .jar, .png...) costs zlib about as much
# CPU per byte at level 1 as at level 6, ten times what storing it costs, and deflating it even
# comes out slightly larger. Large members whose first _PROBE bytes don't shrink below
# _PROBE_RATIO are therefore stored (deflate level 0). The decision depends on content only,
# so output stays deterministic.
_PROBE = 64 << 10
_PROBE_MIN = 256 << 10
_PROBE_RATIO = 0.99


def member_header(level: int) -> bytes:
    """The 10-byte header of a deflate gzip member without name, comment or mtime."""
    # XFL: 2 = "maximum compression", 4 = "fastest"; informational only (RFC 1952 2.3.1).
    xfl = 2 if level == 9 else 4 if level == 1 else 0
    return bytes((0x1F, 0x8B, 8, 0, 0, 0, 0, 0, xfl, _OS_UNKNOWN))


def _trailer(crc: int, size: int) -> bytes:
    return struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)


def compress_member_parts(segments: Sequence[BytesLike], level: int) -> list[bytes]:
    """One complete gzip member holding ``segments`` concatenated, as a list of byte strings.

    Stored (deflate level 0) if a large member's start proves incompressible. Meant for
    worker threads, so it avoids holding the GIL for long: zlib releases it while deflating
    and checksumming, but joining megabytes (of input or of output) would not, which is why
    the parts are returned unjoined and a large payload is never copied into a joined buffer.
    """
    total = sum(len(s) for s in segments)
    first = segments[0] if segments else b""
    if level > 0 and len(first) >= _PROBE_MIN:
        probe = zlib.compress(memoryview(first)[:_PROBE], level, -zlib.MAX_WBITS)
        if len(probe) >= _PROBE * _PROBE_RATIO:
            level = 0
    parts = [member_header(level)]
    crc = 0
    if len(segments) > 1 and len(first) < _PROBE:
        # Many small pieces (headers, small files): one deflate call over a joined buffer is
        # cheaper than a compressobj fed each piece, and the copy is small.
        data = b"".join(segments)
        parts.append(zlib.compress(data, level, -zlib.MAX_WBITS))
        crc = zlib.crc32(data)
    elif len(segments) == 1:
        parts.append(zlib.compress(first, level, -zlib.MAX_WBITS))
        crc = zlib.crc32(first)
    else:
        z = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        for segment in segments:
            parts.append(z.compress(segment))
            crc = zlib.crc32(segment, crc)
        parts.append(z.flush())
    parts.append(_trailer(crc, total))
    return parts


def compress_member(segments: Sequence[BytesLike], level: int) -> bytes:
    """:func:`compress_member_parts`, joined."""
    return b"".join(compress_member_parts(segments, level))


class MemberWriter:
    """A gzip member compressed incrementally; each method returns compressed bytes to emit.

    Used where members must be produced in sequence (min-chunk-size packing, which has to know
    the compressed size so far) or may be too large to hold in memory (the TOC).
    """

    def __init__(self, level: int) -> None:
        self._level = level
        self._z = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        self._crc = 0
        self.uncompressed_size = 0
        self._started = False
        self._finished = False

    def _head(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        return member_header(self._level)

    def start(self) -> bytes:
        """The member header; writing it early makes the member's compressed size exact."""
        return self._head()

    def compress(self, data: BytesLike) -> bytes:
        self._crc = zlib.crc32(data, self._crc)
        self.uncompressed_size += len(data)
        return self._head() + self._z.compress(data)

    def flush_sync(self) -> bytes:
        """Everything compressed so far, ending on a byte boundary (Z_SYNC_FLUSH).

        The same as Go's ``gzip.Writer.Flush`` that upstream calls before measuring how big
        the current member has grown.
        """
        return self._head() + self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        if self._finished:
            return b""
        self._finished = True
        return (
            self._head()
            + self._z.flush(zlib.Z_FINISH)
            + _trailer(self._crc, self.uncompressed_size)
        )
