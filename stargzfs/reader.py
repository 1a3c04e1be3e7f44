"""Reading file contents out of a lazy layer: fetch the compressed range of each chunk a read
needs, decompress it off the event loop, verify it, return the requested bytes.

This is the plain path (no cache, no coalescing); the mount's chunk reader builds on it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from .cache import ChunkCache
from .errors import FormatError
from .formats.decompress import inflate_range, verify_sha256
from .index.layer_index import Chunk, Entry, LayerIndex
from .source import ByteSource

__all__ = ["ChunkReader", "decode_chunk", "iter_file", "read_chunk", "read_file_range"]


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

    async def fetch(chunk: Chunk, what: str) -> bytes:
        return await read_chunk(source, index, chunk, what)

    return await _read_range(index, entry, offset, length, fetch)


async def _read_range(
    index: LayerIndex,
    entry: Entry,
    offset: int,
    length: int,
    fetch: Callable[[Chunk, str], Awaitable[bytes]],
) -> bytes:
    what = index.path_of(entry.name_id)
    end = min(offset + length, entry.size)
    out = []
    for chunk in index.chunks_for(entry, offset, length):
        data = await fetch(chunk, what)
        lo = max(offset - chunk.file_offset, 0)
        out.append(data[lo : min(end - chunk.file_offset, chunk.size)])
    return b"".join(out)


async def iter_file(source: ByteSource, index: LayerIndex, entry: Entry) -> AsyncIterator[bytes]:
    """A whole file, chunk by chunk, each verified."""
    what = index.path_of(entry.name_id)
    for chunk in index.chunks(entry):
        yield await read_chunk(source, index, chunk, what)


class ChunkReader:
    """Chunk reads for one layer through a :class:`ChunkCache`, with single flight: readers
    of a chunk that is already being fetched wait for that fetch instead of repeating it."""

    def __init__(self, source: ByteSource, index: LayerIndex, cache: ChunkCache) -> None:
        self.source = source
        self.index = index
        self.cache = cache
        self._inflight: dict[tuple[int, int], trio.Event] = {}
        self.fetches = 0

    async def chunk(self, chunk: Chunk, what: str) -> bytes:
        if chunk.digest is None:  # unverified layer: never cached
            return await read_chunk(self.source, self.index, chunk, what)
        key = (chunk.comp_offset, chunk.inner_offset)
        while True:
            data = await trio.to_thread.run_sync(self.cache.get, chunk.digest)
            if data is not None:
                return data
            event = self._inflight.get(key)
            if event is None:
                break
            await event.wait()  # someone else fetched it: look in the cache again
        event = self._inflight[key] = trio.Event()
        try:
            # A fetch may have completed while our cache lookup ran in its thread: it stored
            # the chunk before leaving _inflight, so memory has it now.
            data = self.cache.get_memory(chunk.digest)
            if data is not None:
                return data
            self.fetches += 1
            data = await read_chunk(self.source, self.index, chunk, what)
            await trio.to_thread.run_sync(self.cache.put, chunk.digest, data)
            return data
        finally:
            del self._inflight[key]
            event.set()

    async def read(self, entry: Entry, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of a regular file (short at end of file)."""
        return await _read_range(self.index, entry, offset, length, self.chunk)
