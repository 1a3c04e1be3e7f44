"""Open a layer blob through a :class:`~stargzfs.source.ByteSource`: detect its format and
fetch its table of contents with as few reads as possible.

One tail read usually does it: the last ``tail_size`` bytes hold the footer and, for all but
huge layers, the whole TOC. Only when the TOC starts before that tail is one more read made,
for exactly the missing prefix (or, when the TOC ends before the tail starts, as behind a large
containers/storage tar-split frame, for exactly the TOC).
"""

from __future__ import annotations

import hashlib
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import trio

from ..errors import DigestMismatchError, FormatError, NotLazyError
from ..source import ByteSource
from .footer import MAX_FOOTER_SIZE, Footer, LayerFormat, detect_plain_format, parse_footer
from .toc import TOC_TAR_NAME

__all__ = [
    "ANNOTATION_TOC_DIGEST",
    "ANNOTATION_UNCOMPRESSED_SIZE",
    "ANNOTATION_ZSTD_MANIFEST_CHECKSUM",
    "ANNOTATION_ZSTD_MANIFEST_POSITION",
    "DEFAULT_TAIL_SIZE",
    "LayerToc",
    "RawToc",
    "detect_format",
    "fetch_toc",
    "read_toc",
]

ANNOTATION_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ANNOTATION_UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
ANNOTATION_ZSTD_MANIFEST_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
ANNOTATION_ZSTD_MANIFEST_POSITION = "io.containers.zstd-chunked.manifest-position"
ANNOTATION_ZSTD_STORAGE_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"
ANNOTATION_ZSTD_STORAGE_POSITION = "io.github.containers.zstd-chunked.manifest-position"

DEFAULT_TAIL_SIZE = 512 * 1024
MAX_TOC_SIZE = 1 << 30  # an uncompressed TOC beyond 1 GiB is an attack, not a layer


@dataclass(frozen=True, slots=True)
class LayerToc:
    """A located, decompressed and (when possible) verified table of contents."""

    format: LayerFormat
    footer: Footer
    toc_json: bytes
    toc_digest: str  # sha256 of toc_json, "sha256:…"
    verified: bool  # toc_digest matched an annotation that vouches for the layer
    head: bytes  # the first bytes of the blob, if they were read (else b"")


async def _read_tail(source: ByteSource, tail_size: int) -> tuple[int, bytes]:
    start = max(0, source.size - tail_size)
    return start, await source.read_at(start, source.size - start)


async def detect_format(
    source: ByteSource, *, tail_size: int = MAX_FOOTER_SIZE
) -> tuple[LayerFormat, Footer | None]:
    """The layer's format from its footer, or from its first bytes when it has none."""
    if source.size == 0:
        return LayerFormat.TAR, None
    _, tail = await _read_tail(source, min(tail_size, source.size))
    footer = parse_footer(tail, source.size)
    if footer is not None:
        return footer.format, footer
    head = await source.read_at(0, min(source.size, 8))
    return detect_plain_format(head), None


@dataclass(frozen=True, slots=True)
class RawToc:
    """A located TOC, still compressed: decode it whole (:meth:`json`) or in pieces
    (:meth:`pieces`, what the index builder uses so a huge TOC never sits in memory)."""

    format: LayerFormat
    footer: Footer
    raw: bytes
    what: str
    head: bytes
    # A zstd:chunked manifest-checksum annotation matched the compressed TOC: it vouches for
    # the TOC as the toc.digest annotation does for the uncompressed one.
    verified: bool = False

    def pieces(self) -> Iterator[bytes]:
        """The uncompressed TOC JSON, a piece at a time (CPU work: run in a thread)."""
        if self.format is LayerFormat.ESTARGZ:
            return _gzip_toc_pieces(self.raw, self.what)
        return _zstd_toc_pieces(self.raw, self.footer.toc_uncompressed_size, self.what)

    def json(self) -> bytes:
        return b"".join(self.pieces())


async def fetch_toc(
    source: ByteSource,
    annotations: Mapping[str, str] | None = None,
    *,
    tail_size: int = DEFAULT_TAIL_SIZE,
    what: str = "layer",
) -> RawToc:
    """Locate and fetch a lazy layer's compressed TOC: one tail read, at most one more.

    Raises :class:`NotLazyError` for plain gzip/zstd/tar layers, :class:`FormatError` for a
    malformed footer, :class:`DigestMismatchError` when a zstd:chunked manifest checksum
    annotation does not match.
    """
    annotations = annotations or {}
    size = source.size
    if size == 0:
        raise NotLazyError(f"{what} is empty: not a lazily readable layer")
    tail_start, tail = await _read_tail(source, min(tail_size, size))
    footer = parse_footer(tail, size)
    if footer is None:
        head = tail[:8] if tail_start == 0 else await source.read_at(0, min(size, 8))
        fmt = detect_plain_format(head)
        raise NotLazyError(f"{what} is a plain {fmt.value} layer without a TOC: not lazy")
    toc_start = footer.toc_offset
    toc_end = size - footer.footer_size
    if footer.toc_size is not None:
        toc_end = toc_start + footer.toc_size
    if toc_end <= tail_start:
        # The TOC lies wholly before the tail (containers/storage's zstd:chunked puts the
        # tar-split frame between TOC and footer, and it can be larger than the tail): one
        # read of exactly the TOC.
        raw = await source.read_at(toc_start, toc_end - toc_start)
    elif toc_start < tail_start:
        # One more read, for exactly the part of the TOC the tail did not cover.
        prefix = await source.read_at(toc_start, tail_start - toc_start)
        raw = prefix + tail[: toc_end - tail_start]
    else:
        raw = tail[toc_start - tail_start : toc_end - tail_start]
    verified = False
    if footer.format is LayerFormat.ZSTD_CHUNKED:
        verified = _check_zstd_checksum(raw, annotations, what)
    head = tail[:8] if tail_start == 0 else b""
    return RawToc(footer.format, footer, raw, what, head, verified)


async def read_toc(
    source: ByteSource,
    annotations: Mapping[str, str] | None = None,
    *,
    tail_size: int = DEFAULT_TAIL_SIZE,
    what: str = "layer",
) -> LayerToc:
    """Locate, fetch, decompress and verify the TOC of a lazy layer (held whole in memory;
    the index builder streams it instead, see :func:`stargzfs.index.load_index`).

    Raises as :func:`fetch_toc`, plus :class:`FormatError` for a malformed TOC and
    :class:`DigestMismatchError` when the TOC does not match the
    ``containerd.io/snapshot/stargz/toc.digest`` annotation.
    """
    annotations = annotations or {}
    raw = await fetch_toc(source, annotations, tail_size=tail_size, what=what)
    toc_json = await trio.to_thread.run_sync(raw.json)
    digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
    expected = annotations.get(ANNOTATION_TOC_DIGEST)
    if expected is not None and expected != digest:
        raise DigestMismatchError(f"TOC of {what}", expected, digest)
    return LayerToc(
        format=raw.format,
        footer=raw.footer,
        toc_json=toc_json,
        toc_digest=digest,
        verified=expected is not None or raw.verified,
        head=raw.head,
    )


_PIECE = 1 << 20  # compressed bytes inflated per step, and at most uncompressed bytes out
# After stargz.index.json the TOC member holds only tar padding and end-of-archive blocks
# (Go writes two, some tars pad to a 10 KiB record): more than this is not a TOC member.
_MAX_TOC_TRAILER = 64 * 1024


def _gzip_toc_pieces(raw: bytes, what: str) -> Iterator[bytes]:
    """Stream ``stargz.index.json`` out of the TOC member: a gzip'd tar with that one file.

    Each step inflates at most ``_PIECE`` bytes, so a TOC member that inflates to far more
    than its tar header announces is never held in memory.
    """
    d = zlib.decompressobj(wbits=31)
    view = memoryview(raw)
    pos = 0
    tail = b""  # compressed input that the last step left unconsumed (output limit hit)

    def inflate_more() -> bytes:
        nonlocal pos, tail
        while tail or pos < len(view):
            if not tail:
                tail = bytes(view[pos : pos + _PIECE])
                pos += len(tail)
            try:
                out = d.decompress(tail, _PIECE)
            except zlib.error as e:
                raise FormatError(f"TOC of {what}: corrupt gzip data: {e}") from None
            tail = d.unconsumed_tail
            if out or d.eof:
                return out
        return b""

    header = b""
    while len(header) < 512:
        more = inflate_more()
        if not more:
            raise FormatError(f"TOC of {what}: gzip member is truncated")
        header += more
    try:
        info = tarfile.TarInfo.frombuf(header[:512], "utf-8", "surrogateescape")
    except tarfile.TarError as e:
        raise FormatError(f"TOC of {what}: not a valid tar: {e}") from None
    if info.name != TOC_TAR_NAME or not info.isfile():
        raise FormatError(f"TOC of {what}: expected {TOC_TAR_NAME}, found {info.name!r}")
    if info.size > MAX_TOC_SIZE:
        raise FormatError(f"TOC of {what} is larger than {MAX_TOC_SIZE} bytes")
    remaining = info.size
    pending = header[512:]
    while remaining:
        if not pending:
            pending = inflate_more()
            if not pending:
                raise FormatError(f"TOC of {what}: {TOC_TAR_NAME} is truncated")
        take = pending[:remaining]
        remaining -= len(take)
        pending = pending[len(take) :]
        yield take
    trailer = len(pending)
    while not d.eof:  # the rest is tar padding; the member must still be complete
        more = inflate_more()
        if not more and not d.eof:
            raise FormatError(f"TOC of {what}: gzip member is truncated")
        trailer += len(more)
        if trailer > _MAX_TOC_TRAILER:
            raise FormatError(
                f"TOC of {what}: more than {_MAX_TOC_TRAILER} bytes after {TOC_TAR_NAME} "
                "in its gzip member: not a TOC member"
            )


def _zstd_toc_pieces(raw: bytes, uncompressed_size: int | None, what: str) -> Iterator[bytes]:
    import zstandard

    limit = uncompressed_size if uncompressed_size is not None else MAX_TOC_SIZE
    if limit > MAX_TOC_SIZE:
        raise FormatError(f"TOC of {what} claims {limit} bytes: too large")
    total = 0
    try:
        for piece in zstandard.ZstdDecompressor().read_to_iter(raw, read_size=_PIECE):
            total += len(piece)
            if total > limit:
                raise FormatError(f"TOC of {what} is larger than {limit} bytes")
            yield piece
    except zstandard.ZstdError as e:
        raise FormatError(f"TOC of {what}: corrupt zstd data: {e}") from None
    if uncompressed_size is not None and total != uncompressed_size:
        raise FormatError(f"TOC of {what}: {total} bytes, footer says {uncompressed_size}: corrupt")


def _check_zstd_checksum(raw: bytes, annotations: Mapping[str, str], what: str) -> bool:
    """zstd:chunked annotations vouch for the *compressed* TOC bytes: True when one matched
    (and raise when one does not)."""
    checked = False
    for key in (ANNOTATION_ZSTD_MANIFEST_CHECKSUM, ANNOTATION_ZSTD_STORAGE_CHECKSUM):
        expected = annotations.get(key)
        if expected is not None:
            actual = "sha256:" + hashlib.sha256(raw).hexdigest()
            if actual != expected:
                raise DigestMismatchError(f"compressed TOC of {what}", expected, actual)
            checked = True
    return checked
