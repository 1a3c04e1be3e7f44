"""Reading file contents out of a lazy layer: fetch the compressed range of each chunk a read
needs, decompress it off the event loop, verify it, return the requested bytes.

This is the plain path (no cache, no coalescing); the mount's chunk reader builds on it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager

import trio

from .cache import ChunkCache
from .errors import FormatError
from .formats.decompress import inflate_range, verify_sha256
from .index.layer_index import Chunk, Entry, LayerIndex
from .source import ByteSource, check_range

__all__ = [
    "ChunkReader",
    "FetchGate",
    "decode_chunk",
    "iter_file",
    "read_chunk",
    "read_file_range",
    "stream_range",
]

log = logging.getLogger(__name__)


def decode_chunk(compression: str, comp: bytes, chunk: Chunk, what: str) -> bytes:
    """Decompress one chunk's compressed range and verify it (CPU: run in a thread)."""
    where = f"{what} (chunk at offset {chunk.file_offset})"
    if chunk.zeros and chunk.comp_end == chunk.comp_offset:
        # A hole (zstd:chunked "zeros" chunk) with no bytes in the blob.
        data = bytes(chunk.size)
        verify_sha256(data, chunk.digest, where)
        return data
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
        lo = max(offset - chunk.file_offset, 0)
        hi = min(end - chunk.file_offset, chunk.size)
        if _is_hole(chunk):
            # Zeros the TOC declares, with no bytes in the blob: only the part asked for (a
            # hole may be gigabytes), nothing fetched or cached.
            out.append(bytes(hi - lo))
            continue
        data = await fetch(chunk, what)
        out.append(data[lo:hi])
    return b"".join(out)


def _is_hole(chunk: Chunk) -> bool:
    return chunk.zeros and chunk.comp_end == chunk.comp_offset


async def iter_file(source: ByteSource, index: LayerIndex, entry: Entry) -> AsyncIterator[bytes]:
    """A whole file, chunk by chunk, each verified."""
    what = index.path_of(entry.name_id)
    for chunk in index.chunks(entry):
        if _is_hole(chunk):
            for start in range(0, chunk.size, 1 << 20):
                yield bytes(min(1 << 20, chunk.size - start))
            continue
        yield await read_chunk(source, index, chunk, what)


class FetchGate:
    """On-demand fetches go first; background work (prefetch, ``--background-fetch``,
    read-ahead) waits its turn. Shared by the readers of one view (one image, one registry
    host in practice).

    * A background request starts only while no on-demand fetch is in progress, and at most
      ``background_slots`` of them run at once, so most of the client's per-host connections
      stay free for readers even when background work is already under way.
    * On-demand fetches never wait here.
    """

    def __init__(self, background_slots: int = 2) -> None:
        self._background = trio.CapacityLimiter(background_slots)
        self._foreground = 0
        self._idle = trio.Event()
        self._idle.set()

    @property
    def foreground_active(self) -> int:
        return self._foreground

    @asynccontextmanager
    async def foreground(self) -> AsyncIterator[None]:
        if self._foreground == 0:
            self._idle = trio.Event()
        self._foreground += 1
        try:
            yield
        finally:
            self._foreground -= 1
            if self._foreground == 0:
                self._idle.set()

    @asynccontextmanager
    async def background(self) -> AsyncIterator[None]:
        async with self._background:
            while self._foreground:
                await self._idle.wait()
            yield


async def stream_range(
    source: ByteSource, offset: int, length: int, piece: int = 8 << 20
) -> AsyncGenerator[bytes, None]:
    """``[offset, offset+length)`` of ``source`` in pieces, never whole: a registry blob as
    one streamed range request decoded as it arrives, anything else ``piece`` bytes at a
    time. Use it as ``async with aclosing(stream_range(...))``."""
    if length <= piece:
        yield await source.read_at(offset, length)
        return
    from .registry.blob_source import RegistryBlobSource
    from .source import TailCachedSource

    inner = source.inner if isinstance(source, TailCachedSource) else source
    if isinstance(inner, RegistryBlobSource):
        check_range(inner.size, offset, length, f"blob {inner.digest}")
        pieces = inner.client.stream_blob_range(inner.repo, inner.digest, offset, length)
        async with aclosing(pieces):
            async for data in pieces:
                yield data
        return
    for start in range(offset, offset + length, piece):
        yield await source.read_at(start, min(piece, offset + length - start))


class ChunkReader:
    """Chunk reads for one layer through a :class:`ChunkCache`.

    * Single flight: readers of a chunk that is being fetched wait for that fetch, whoever
      started it (another reader, read-ahead, the prefetch or the background fetch).
    * Coalescing: the missing chunks of one read are fetched with one range request per
      contiguous run of compressed bytes (small gaps are read through).
    * Read-ahead: a sequential reader of a multi-chunk file gets the next chunks fetched in
      the background while it consumes the current one.
    * Priority: background fetches go through the :class:`FetchGate` (on-demand first).
    * Memory: a large run is streamed and decoded as it arrives, chunk by chunk; a waiter
      is released as soon as its chunk is cached, not when the whole run is.
    """

    READ_AHEAD = 2  # chunks
    MAX_GAP = 64 * 1024  # compressed bytes read through to merge two runs
    NEAR = 2 << 20  # a read this close to the previous one's end counts as sequential
    PIECE = 8 << 20  # runs larger than this are streamed, not held whole
    DECODE_BATCH = 1 << 20  # compressed bytes decoded per thread hop while streaming

    def __init__(
        self,
        source: ByteSource,
        index: LayerIndex,
        cache: ChunkCache,
        gate: FetchGate | None = None,
    ) -> None:
        self.source = source
        self.index = index
        self.cache = cache
        self.gate = gate if gate is not None else FetchGate()
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

    def _claim(self, run: list[Chunk]) -> list[tuple[Chunk, trio.Event]]:
        """Register the chunks nobody is fetching and that are not in memory as ours."""
        mine: list[tuple[Chunk, trio.Event]] = []
        for chunk in run:
            assert chunk.digest is not None
            if _key(chunk) in self._inflight or self.cache.peek_memory(chunk.digest) is not None:
                continue
            event = self._inflight[_key(chunk)] = trio.Event()
            mine.append((chunk, event))
        return mine

    async def _fetch_run(self, run: list[Chunk], what: str, background: bool = False) -> int:
        """Fetch chunks whose compressed ranges are (nearly) adjacent with one request,
        verify each and cache it. Chunks already in flight elsewhere are left to that.
        Background runs wait for the gate first and only then claim their chunks, so an
        on-demand reader never waits behind a background fetch that has not started."""
        if background:
            async with self.gate.background():
                return await self._fetch_claimed(self._claim(run), what)
        async with self.gate.foreground():
            return await self._fetch_claimed(self._claim(run), what)

    async def _fetch_claimed(self, mine: list[tuple[Chunk, trio.Event]], what: str) -> int:
        if not mine:
            return 0
        try:
            start, end = mine[0][0].comp_offset, max(c.comp_end for c, _ in mine)
            self.requests += 1
            self.fetches += len(mine)
            compression = self.index.compression

            def decode(batch: list[tuple[Chunk, trio.Event]], buf: bytes, at: int) -> None:
                for chunk, _ in batch:
                    piece = buf[chunk.comp_offset - at : chunk.comp_end - at]
                    data = decode_chunk(compression, piece, chunk, what)
                    assert chunk.digest is not None
                    self.cache.put(chunk.digest, data)

            if end - start <= self.PIECE:
                comp = await self.source.read_at(start, end - start)
                await trio.to_thread.run_sync(decode, mine, comp, start)
                return len(mine)
            # Large (prefetch, background fetch): decode as the bytes arrive, release each
            # chunk's waiters at once, keep only the undecoded tail in memory.
            buf, at, todo = bytearray(), start, 0
            pieces = stream_range(self.source, start, end - start, self.PIECE)
            async with aclosing(pieces):
                async for data in pieces:
                    buf += data
                    have = at + len(buf)
                    ready = todo
                    while ready < len(mine) and mine[ready][0].comp_end <= have:
                        ready += 1
                    if ready == todo:
                        continue
                    span = mine[ready - 1][0].comp_end - mine[todo][0].comp_offset
                    if span < self.DECODE_BATCH and ready < len(mine):
                        continue
                    batch = mine[todo:ready]
                    await trio.to_thread.run_sync(decode, batch, bytes(buf), at)
                    for _, event in batch:
                        event.set()
                    todo = ready
                    keep = mine[todo][0].comp_offset if todo < len(mine) else have
                    del buf[: keep - at]
                    at = keep
            if todo < len(mine):  # the source ended early: a truncated blob
                raise FormatError(f"{what}: blob ended before byte {end}")
            return len(mine)
        finally:
            for chunk, event in mine:
                if self._inflight.get(_key(chunk)) is event:
                    del self._inflight[_key(chunk)]
                event.set()

    def _runs(self, chunks: list[Chunk]) -> list[list[Chunk]]:
        gap = self.MAX_GAP
        runs: list[list[Chunk]] = []
        for chunk in sorted(chunks, key=lambda c: c.comp_offset):
            if runs and 0 <= chunk.comp_offset - runs[-1][-1].comp_end <= gap:
                runs[-1].append(chunk)
            elif runs and chunk.comp_offset == runs[-1][-1].comp_offset:
                runs[-1].append(chunk)  # packed chunks sharing one compressed member
            else:
                runs.append([chunk])
        return runs

    async def _missing(self, chunks: list[Chunk]) -> list[Chunk]:
        verified = [c for c in chunks if c.digest is not None and not _is_hole(c)]
        return await trio.to_thread.run_sync(
            lambda: [c for c in verified if c.digest is not None and not self.cache.has(c.digest)]
        )

    async def warm(self, chunks: list[Chunk], what: str, background: bool = False) -> int:
        """Make sure these chunks are cached, fetching the missing ones in coalesced runs
        (``background``: at low priority). Returns how many chunks this call fetched."""
        missing = await self._missing(chunks)
        fetched = 0

        async def run_one(run: list[Chunk]) -> None:
            nonlocal fetched
            fetched += await self._fetch_run(run, what, background)

        if missing:
            async with trio.open_nursery() as nursery:
                for run in self._runs(missing):
                    nursery.start_soon(run_one, run)
        return fetched

    async def is_cached(self, end: int) -> bool:
        """Whether every chunk before blob offset ``end`` is in the cache (chunks without a
        digest never are: they are not cached, only read)."""
        chunks = await trio.to_thread.run_sync(self.index.chunks_before, end)
        if any(c.digest is None and not _is_hole(c) for c in chunks):
            return False
        return not await self._missing(chunks)

    async def prefetch(self, end: int, what: str) -> int | None:
        """Fetch every chunk before blob offset ``end`` (the prioritized range) at low
        priority, in as few streamed requests as the cache allows (normally one). Returns
        how many chunks it fetched, or None if all were cached already. On-demand readers of
        these chunks share the fetch instead of making their own."""
        chunks = await trio.to_thread.run_sync(self.index.chunks_before, end)
        missing = await self._missing(chunks)
        if not missing:
            # A remount with a warm disk cache: the prioritized files are what the workload
            # reads first, so have them in memory before it asks (a disk-tier read on the
            # first access costs a thread hop, a file read and a sha256 each).
            # (abandoned if cancelled: the mount's ready budget must not wait for disk reads)
            await trio.to_thread.run_sync(self._preload, chunks, abandon_on_cancel=True)
            return None
        fetched = 0
        async with self.gate.background():
            # Read on demand while we waited for the gate: not ours to fetch any more.
            missing = await self._missing(missing)
            # One request for the whole range unless chunks read meanwhile split it.
            for run in self._runs(missing):
                fetched += await self._fetch_claimed(self._claim(run), what)
        return fetched

    def _preload(self, chunks: list[Chunk]) -> None:
        """Bring cached chunks into the memory tier, up to half of it (blocking)."""
        budget = self.cache.memory_bytes // 2
        for chunk in chunks:
            if chunk.digest is None or budget < chunk.size:
                continue
            if self.cache.peek_memory(chunk.digest) is None and self.cache.get(chunk.digest):
                budget -= chunk.size

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
            await self.warm(chunks, what, background=True)
        except Exception as e:  # read-ahead is an optimisation: the real read will report
            log.debug("read-ahead in %s failed: %s", what, e)


def _key(chunk: Chunk) -> tuple[int, int]:
    return (chunk.comp_offset, chunk.inner_offset)
