"""Reading file contents out of a lazy layer: fetch the compressed range of each chunk a read
needs, decompress it off the event loop, verify it, return the requested bytes.

This is the plain path (no cache, no coalescing); the mount's chunk reader builds on it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from .cache import ChunkCache
from .errors import FormatError
from .formats.decompress import inflate_range, verify_sha256
from .index.layer_index import Chunk, Entry, LayerIndex
from .source import ByteSource

__all__ = ["ChunkReader", "decode_chunk", "iter_file", "read_chunk", "read_file_range"]

log = logging.getLogger(__name__)


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
    """Chunk reads for one layer through a :class:`ChunkCache`.

    * Single flight: readers of a chunk that is being fetched wait for that fetch.
    * Coalescing: the missing chunks of one read are fetched with one range request per
      contiguous run of compressed bytes (small gaps are read through).
    * Read-ahead: a sequential reader of a multi-chunk file gets the next chunks fetched in
      the background while it consumes the current one.
    """

    READ_AHEAD = 2  # chunks
    MAX_GAP = 64 * 1024  # compressed bytes read through to merge two runs
    NEAR = 2 << 20  # a read this close to the previous one's end counts as sequential

    def __init__(self, source: ByteSource, index: LayerIndex, cache: ChunkCache) -> None:
        self.source = source
        self.index = index
        self.cache = cache
        self._inflight: dict[tuple[int, int], trio.Event] = {}
        self._last_end: dict[int, int] = {}  # inode -> end of its last read (sequential?)
        self.fetches = 0  # chunks fetched from the source
        self.requests = 0  # range requests made for them

    async def chunk(self, chunk: Chunk, what: str) -> bytes:
        if chunk.digest is None:  # unverified layer: never cached
            self.fetches += 1
            self.requests += 1
            return await read_chunk(self.source, self.index, chunk, what)
        while True:
            # Memory first, on the loop; only the disk tier is worth a thread hop.
            data = self.cache.get_memory(chunk.digest)
            if data is None and self.cache.directory is not None:
                data = await trio.to_thread.run_sync(self.cache.get, chunk.digest)
            if data is not None:
                return data
            event = self._inflight.get(_key(chunk))
            if event is None:
                break
            await event.wait()  # someone else fetched it: look in the cache again
        await self._fetch_run([chunk], what)
        data = self.cache.peek_memory(chunk.digest)
        if data is None:  # evicted at once (tiny memory cache): fetch for this reader only
            data = await read_chunk(self.source, self.index, chunk, what)
        return data

    async def _fetch_run(self, run: list[Chunk], what: str) -> None:
        """Fetch chunks whose compressed ranges are (nearly) adjacent with one request,
        verify each and cache it. Chunks already in flight elsewhere are left to that."""
        mine: list[tuple[Chunk, trio.Event]] = []
        for chunk in run:
            assert chunk.digest is not None
            if _key(chunk) in self._inflight or self.cache.peek_memory(chunk.digest) is not None:
                continue
            event = self._inflight[_key(chunk)] = trio.Event()
            mine.append((chunk, event))
        if not mine:
            return
        try:
            start, end = mine[0][0].comp_offset, max(c.comp_end for c, _ in mine)
            self.requests += 1
            self.fetches += len(mine)
            comp = await self.source.read_at(start, end - start)
            compression = self.index.compression

            def decode_all() -> None:
                for chunk, _ in mine:
                    piece = comp[chunk.comp_offset - start : chunk.comp_end - start]
                    data = decode_chunk(compression, piece, chunk, what)
                    assert chunk.digest is not None
                    self.cache.put(chunk.digest, data)

            await trio.to_thread.run_sync(decode_all)
        finally:
            for chunk, event in mine:
                del self._inflight[_key(chunk)]
                event.set()

    def _runs(self, chunks: list[Chunk]) -> list[list[Chunk]]:
        runs: list[list[Chunk]] = []
        for chunk in sorted(chunks, key=lambda c: c.comp_offset):
            if runs and 0 <= chunk.comp_offset - runs[-1][-1].comp_end <= self.MAX_GAP:
                runs[-1].append(chunk)
            else:
                runs.append([chunk])
        return runs

    async def warm(self, chunks: list[Chunk], what: str) -> None:
        """Make sure these chunks are cached, fetching the missing ones in coalesced runs."""
        verified = [c for c in chunks if c.digest is not None]
        missing = await trio.to_thread.run_sync(
            lambda: [c for c in verified if c.digest is not None and not self.cache.has(c.digest)]
        )
        if missing:
            async with trio.open_nursery() as nursery:
                for run in self._runs(missing):
                    nursery.start_soon(self._fetch_run, run, what)

    async def read(self, entry: Entry, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of a regular file (short at end of file)."""
        chunks = self.index.chunks_for(entry, offset, length)
        what = self.index.path_of(entry.name_id)
        if len(chunks) > 1:
            await self.warm(chunks, what)
        last = self._last_end.get(entry.id)
        sequential = last is not None and abs(offset - last) <= self.NEAR
        if len(self._last_end) > 4096:
            self._last_end.clear()
        self._last_end[entry.id] = offset + length
        if chunks and (sequential or offset == 0):
            self._read_ahead(entry, chunks[-1], what)
        return await _read_range(self.index, entry, offset, length, self.chunk)

    def _read_ahead(self, entry: Entry, last: Chunk, what: str) -> None:
        if last.file_offset + last.size >= entry.size:
            return
        ahead = self.index.chunks_for(
            entry, last.file_offset + last.size, self.READ_AHEAD * max(last.size, 1)
        )[: self.READ_AHEAD]
        if ahead:
            trio.lowlevel.spawn_system_task(self._background_warm, ahead, what)

    async def _background_warm(self, chunks: list[Chunk], what: str) -> None:
        try:
            await self.warm(chunks, what)
        except Exception as e:  # read-ahead is an optimisation: the real read will report
            log.debug("read-ahead in %s failed: %s", what, e)


def _key(chunk: Chunk) -> tuple[int, int]:
    return (chunk.comp_offset, chunk.inner_offset)
