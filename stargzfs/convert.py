"""Library entry point for converting a layer to eStargz.

:func:`convert_layer` takes a layer as a tar, tar.gz or tar.zst stream (told apart by their
magic bytes, never by a file name), decompresses it on the fly and hands the tar stream to the
writer in :mod:`stargzfs.formats.estargz_writer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO

from .errors import FormatError, UnsupportedError
from .formats.estargz_writer import (
    DEFAULT_CHUNK_SIZE,
    ESTARGZ,
    ConvertResult,
    Readable,
    write_estargz,
)
from .formats.layer_stream import Decompressor

__all__ = ["ConvertResult", "convert_layer", "open_layer_stream"]

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_READ = 1 << 20


class _Prefixed:
    """A stream with bytes already read from its start put back in front."""

    def __init__(self, prefix: bytes, rest: Readable) -> None:
        self._prefix = prefix
        self._rest = rest

    def read(self, n: int = -1, /) -> bytes:
        if self._prefix:
            if n < 0 or n >= len(self._prefix):
                out, self._prefix = self._prefix, b""
            else:
                out, self._prefix = self._prefix[:n], self._prefix[n:]
            return out
        return self._rest.read(n)


class _GzipStream:
    """Decompressed bytes of a (possibly multi-member) gzip stream, with the input's errors
    said to be the input's."""

    def __init__(self, src: Readable) -> None:
        self._d = Decompressor(src, "gzip")

    def read(self, n: int = -1, /) -> bytes:
        try:
            return self._d.read(_READ if n < 0 else n)
        except FormatError as e:
            raise FormatError(f"input: {e}") from None


class _ZstdStream:
    def __init__(self, src: Readable) -> None:
        import zstandard

        self._error = zstandard.ZstdError
        # zstandard only needs .read(); its stubs ask for IO[bytes].
        self._r = zstandard.ZstdDecompressor().stream_reader(
            src,  # type: ignore[arg-type]
            read_size=_READ,
            read_across_frames=True,
            closefd=False,
        )

    def read(self, n: int = -1, /) -> bytes:
        try:
            data: bytes = self._r.read(_READ if n < 0 else n)
        except self._error as e:
            raise FormatError(f"input is not valid zstd: {e}") from None
        return data


def open_layer_stream(src: Readable) -> Readable:
    """The uncompressed tar stream of a layer given as tar, tar.gz or tar.zst."""
    head = b""
    while len(head) < 6:
        more = src.read(6 - len(head))
        if not more:
            break
        head += more
    stream = _Prefixed(head, src)
    if head.startswith(_GZIP_MAGIC):
        return _GzipStream(stream)
    if head.startswith(_ZSTD_MAGIC):
        return _ZstdStream(stream)
    if head.startswith(b"BZh"):
        raise UnsupportedError("bzip2-compressed layers are not supported (tar, gzip, zstd)")
    if head.startswith(b"\xfd7zXZ\x00"):
        raise UnsupportedError("xz-compressed layers are not supported (tar, gzip, zstd)")
    return stream


def convert_layer(
    src: IO[bytes] | Readable,
    dst: IO[bytes],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized: Sequence[str] = (),
    min_chunk_size: int = 0,
    compression_level: int | None = None,
    workers: int | None = None,
    layer_format: str = ESTARGZ,
) -> ConvertResult:
    """Convert the layer read from ``src`` to an eStargz blob written to ``dst``.

    ``src`` is read once, front to back, so a pipe works; ``dst`` is only written, never
    seeked. ``chunk_size`` is the largest payload piece per gzip member; ``prioritized`` lists
    paths to put first (prefetched after mount), which spools the layer to a temporary file;
    ``min_chunk_size`` > 0 packs consecutive small files into one member until it reaches that
    many compressed bytes (entries then carry ``innerOffset``); ``workers`` threads compress
    (default: the usable CPUs); the output does not depend on it. ``compression_level`` defaults
    to 6, see :mod:`stargzfs.formats.estargz_writer` for why not 9. ``layer_format`` may be
    ``"zstd:chunked"`` for stargz-snapshotter's zstd dialect (zstd level, default 3).

    Raises :class:`~stargzfs.errors.FormatError` for a corrupt or truncated input,
    :class:`~stargzfs.errors.UnsafePathError` for hostile entry names,
    :class:`~stargzfs.errors.NotFoundError` for a prioritized path missing from the layer.
    """
    return write_estargz(
        open_layer_stream(src),
        dst,
        chunk_size=chunk_size,
        prioritized=prioritized,
        min_chunk_size=min_chunk_size,
        compression_level=compression_level,
        workers=workers,
        layer_format=layer_format,
    )
