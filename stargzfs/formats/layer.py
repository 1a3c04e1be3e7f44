"""Open a layer blob through a :class:`~stargzfs.source.ByteSource`: detect its format and
fetch its table of contents with as few reads as possible.

One tail read usually does it: the last ``tail_size`` bytes hold the footer and, for all but
huge layers, the whole TOC. Only when the TOC starts before that tail is one more read made,
for exactly the missing prefix. With a zstd:chunked ``manifest-position`` annotation the TOC
is read directly.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zlib
from collections.abc import Mapping
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
    "detect_format",
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


async def read_toc(
    source: ByteSource,
    annotations: Mapping[str, str] | None = None,
    *,
    tail_size: int = DEFAULT_TAIL_SIZE,
    what: str = "layer",
) -> LayerToc:
    """Locate, fetch, decompress and verify the TOC of a lazy layer.

    Raises :class:`NotLazyError` for plain gzip/zstd/tar layers, :class:`FormatError` for a
    malformed footer or TOC, :class:`DigestMismatchError` when the TOC does not match the
    ``containerd.io/snapshot/stargz/toc.digest`` annotation.
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
    toc_end = size - footer.footer_size
    if footer.toc_size is not None:
        toc_end = footer.toc_offset + footer.toc_size
    if footer.toc_offset < tail_start:
        # One more read, for exactly the part of the TOC the tail did not cover.
        prefix = await source.read_at(footer.toc_offset, tail_start - footer.toc_offset)
        raw = prefix + tail[: toc_end - tail_start]
    else:
        raw = tail[footer.toc_offset - tail_start : toc_end - tail_start]
    if footer.format is LayerFormat.ESTARGZ:
        toc_json = await trio.to_thread.run_sync(_gzip_toc, raw, what)
    else:
        _check_zstd_checksum(raw, annotations, what)
        toc_json = await trio.to_thread.run_sync(_zstd_toc, raw, footer.toc_uncompressed_size, what)
    digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
    expected = annotations.get(ANNOTATION_TOC_DIGEST)
    if expected is not None and expected != digest:
        raise DigestMismatchError(f"TOC of {what}", expected, digest)
    return LayerToc(
        format=footer.format,
        footer=footer,
        toc_json=toc_json,
        toc_digest=digest,
        verified=expected is not None,
        head=tail[:8] if tail_start == 0 else b"",
    )


def _gzip_toc(raw: bytes, what: str) -> bytes:
    """The ``stargz.index.json`` file inside the TOC member's tar."""
    d = zlib.decompressobj(wbits=31)
    try:
        tar_bytes = d.decompress(raw, MAX_TOC_SIZE + 4096)
    except zlib.error as e:
        raise FormatError(f"TOC of {what}: corrupt gzip data: {e}") from None
    if not d.eof:
        if d.unconsumed_tail:
            raise FormatError(f"TOC of {what} is larger than {MAX_TOC_SIZE} bytes")
        raise FormatError(f"TOC of {what}: gzip member is truncated")
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            member = tar.next()
            if member is None or member.name != TOC_TAR_NAME or not member.isfile():
                found = member.name if member else "nothing"
                raise FormatError(f"TOC of {what}: expected {TOC_TAR_NAME}, found {found!r}")
            f = tar.extractfile(member)
            assert f is not None
            data = f.read()
            if len(data) != member.size:
                raise FormatError(f"TOC of {what}: {TOC_TAR_NAME} is truncated")
            return data
    except tarfile.TarError as e:
        raise FormatError(f"TOC of {what}: not a valid tar: {e}") from None


def _zstd_toc(raw: bytes, uncompressed_size: int | None, what: str) -> bytes:
    import zstandard

    limit = uncompressed_size if uncompressed_size is not None else MAX_TOC_SIZE
    if limit > MAX_TOC_SIZE:
        raise FormatError(f"TOC of {what} claims {limit} bytes: too large")
    try:
        data = zstandard.ZstdDecompressor().decompress(raw, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise FormatError(f"TOC of {what}: corrupt zstd data: {e}") from None
    if uncompressed_size is not None and len(data) != uncompressed_size:
        raise FormatError(
            f"TOC of {what}: {len(data)} bytes, footer says {uncompressed_size}: corrupt"
        )
    return data


def _check_zstd_checksum(raw: bytes, annotations: Mapping[str, str], what: str) -> None:
    """zstd:chunked annotations vouch for the *compressed* TOC bytes."""
    for key in (ANNOTATION_ZSTD_MANIFEST_CHECKSUM, ANNOTATION_ZSTD_STORAGE_CHECKSUM):
        expected = annotations.get(key)
        if expected is not None:
            actual = "sha256:" + hashlib.sha256(raw).hexdigest()
            if actual != expected:
                raise DigestMismatchError(f"compressed TOC of {what}", expected, actual)
