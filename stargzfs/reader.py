"""Reading file contents out of a lazy layer: fetch the compressed range of each chunk a read
needs, decompress it off the event loop, verify it, return the requested bytes.

This is the plain path (no cache, no coalescing); the mount's chunk reader builds on it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio

from .errors import FormatError
from .formats.decompress import inflate_range, verify_sha256
from .index.layer_index import Chunk, Entry, LayerIndex
from .source import ByteSource

__all__ = ["decode_chunk", "iter_file", "read_chunk", "read_file_range"]


def decode_chunk(compression: str, comp: bytes, chunk: Chunk, what: str) -> bytes:
    """Decompress one chunk's compressed range and verify it (CPU: run in a thread)."""
    where = f"{what} (chunk at offset {chunk.file_offset})"
    try:
        stream = inflate_range(compression, comp, chunk.inner_offset + chunk.size)
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    data = stream[chunk.inner_offset : chunk.inner_offset + chunk.size]
    verify_sha256(data, chunk.digest, where)
    return data


async def read_chunk(source: ByteSource, index: LayerIndex, chunk: Chunk, what: str) -> bytes:
    """The verified uncompressed bytes of one chunk."""
    comp = await source.read_at(chunk.comp_offset, chunk.comp_end - chunk.comp_offset)
    return await trio.to_thread.run_sync(decode_chunk, index.compression, comp, chunk, what)


async def read_file_range(
    source: ByteSource, index: LayerIndex, entry: Entry, offset: int, length: int
) -> bytes:
    """Bytes ``[offset, offset+length)`` of a regular file (short at end of file)."""
    what = index.path_of(entry.name_id)
    out = []
    end = min(offset + length, entry.size)
    for chunk in index.chunks_for(entry, offset, length):
        data = await read_chunk(source, index, chunk, what)
        lo = max(offset - chunk.file_offset, 0)
        hi = min(end - chunk.file_offset, chunk.size)
        out.append(data[lo:hi])
    return b"".join(out)


async def iter_file(source: ByteSource, index: LayerIndex, entry: Entry) -> AsyncIterator[bytes]:
    """A whole file, chunk by chunk, each verified."""
    what = index.path_of(entry.name_id)
    for chunk in index.chunks(entry):
        yield await read_chunk(source, index, chunk, what)
