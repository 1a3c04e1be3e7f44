"""Chunk cache: content-addressed, verified on the way back from disk, single flight."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from layer_helpers import FIXTURES, CountingSource, expected, index_of

from stargzfs.cache import ChunkCache
from stargzfs.cache.chunk_cache import STALE_TMP_SECONDS
from stargzfs.reader import ChunkReader, FetchGate
from stargzfs.source import ByteSource, FileSource
from stargzfs.view import ImageView, LayerView

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures is absent")
BIG = "data/random-300000.bin"


async def reader_for(cache: ChunkCache) -> tuple[ChunkReader, CountingSource]:
    source = CountingSource(FileSource(FIXTURES / "chunked.esgz"))
    index = await index_of(source)
    source.reads.clear()
    return ChunkReader(source, index, cache), source


async def test_disk_cache_survives_a_new_process_view(tmp_path: Path) -> None:
    reader, source = await reader_for(ChunkCache(tmp_path))
    entry = reader.index.resolve(BIG)
    assert entry is not None
    first = await reader.read(entry, 0, entry.size)
    # Five adjacent chunks, one read: missing chunks are fetched in coalesced runs.
    assert reader.fetches == len(reader.index.chunks(entry)) == 5
    assert len(source.reads) == reader.requests == 1
    # A fresh cache object on the same directory (a remount): no reads from the blob.
    again, source2 = await reader_for(ChunkCache(tmp_path))
    assert await again.read(entry, 0, entry.size) == first
    assert source2.reads == []
    assert again.cache.stats.disk_hits == len(again.index.chunks(entry))
    files = [p for p in (tmp_path / "chunks").rglob("*") if p.is_file()]
    assert all(not p.name.startswith(".tmp-") for p in files)
    assert hashlib.sha256(first).hexdigest() == (
        "55d4d18a6d0124a45b51592ff386315f02ba146ea13d508e2125dcc4f062f413"
    )


async def test_corrupt_disk_entry_is_dropped_not_served(tmp_path: Path) -> None:
    reader, _ = await reader_for(ChunkCache(tmp_path))
    # No read-ahead: the first reader's could still be storing the next chunk (a race with
    # the garbage below and with the second reader's own read-ahead: a second fetch).
    reader.READ_AHEAD = 0
    entry = reader.index.resolve(BIG)
    assert entry is not None
    good = await reader.read(entry, 0, 1000)
    for path in (tmp_path / "chunks").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    again, source = await reader_for(ChunkCache(tmp_path))
    again.READ_AHEAD = 0
    assert await again.read(entry, 0, 1000) == good
    assert again.cache.stats.corrupt == 1 and len(source.reads) == 1


async def test_concurrent_readers_share_one_fetch() -> None:
    reader, source = await reader_for(ChunkCache(None))
    reader.READ_AHEAD = 0  # count only the chunks the reads themselves need
    entry = reader.index.resolve(BIG)
    assert entry is not None
    results: list[bytes] = []

    async def read() -> None:
        results.append(await reader.read(entry, 70000, 100000))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(read)
    assert len(set(results)) == 1 and len(results[0]) == 100000
    chunks = reader.index.chunks_for(entry, 70000, 100000)
    assert reader.fetches == len(chunks) == 2  # each chunk once, whatever the readers
    assert len(source.reads) == reader.requests == 1  # adjacent: one range request


def test_memory_only_cache_is_bounded() -> None:
    cache = ChunkCache(None, memory_bytes=1000)
    blobs = [os.urandom(400) for _ in range(5)]
    for b in blobs:
        cache.put(hashlib.sha256(b).digest(), b)
    present = [cache.get(hashlib.sha256(b).digest()) is not None for b in blobs]
    assert present == [False, False, False, True, True]


async def test_prefetch_caches_prioritized_files_with_one_read() -> None:
    source = CountingSource(FileSource(FIXTURES / "prioritized.esgz"))
    index = await index_of(source)
    source.reads.clear()
    view = ImageView([LayerView(source, index, "prioritized")])
    stored = await view.prefetch(0)
    # One read, from the first prioritized payload to the landmark.
    assert len(source.reads) == 1 and sum(source.reads[0]) == index.prefetch_end
    prio = set(expected("prioritized")["prefetch_entries"])
    files = [p for p in prio if (e := index.resolve(p)) is not None and e.kind == "reg"]
    assert stored == len(files) > 0
    for path in files:
        node = view.resolve(path)
        await view.read(node, 0, node.entry.size)
    assert len(source.reads) == 1  # every prioritized file was served from the cache


async def test_sequential_reader_gets_read_ahead() -> None:
    reader, source = await reader_for(ChunkCache(None))
    entry = reader.index.resolve(BIG)
    assert entry is not None
    await reader.read(entry, 0, 4096)  # chunk 0, and chunks 1-2 fetched in the background
    for _ in range(50):
        if reader.fetches >= 3:
            break
        await trio.sleep(0.01)
    assert reader.fetches == 3
    # Sequential, inside chunks 0-1 (cached): read-ahead moves on to chunk 3 only.
    await reader.read(entry, 4096, 100000)
    for _ in range(50):
        if reader.fetches >= 4:
            break
        await trio.sleep(0.01)
    assert reader.fetches == 4 and len(source.reads) == 3


def test_disk_cache_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, memory_bytes=0, max_disk_bytes=10_000)
    blobs = [os.urandom(3000) for _ in range(5)]
    digests = [hashlib.sha256(b).digest() for b in blobs]
    for i, (d, b) in enumerate(zip(digests, blobs, strict=True)):
        cache.put(d, b)
        os.utime(cache._path(d), (1000 + i, 1000 + i))  # a clear age order
        if i == 2:
            assert cache.get(digests[0]) == blobs[0]  # used: now the most recent
            os.utime(cache._path(digests[0]), (5000, 5000))
    on_disk = sum(p.stat().st_size for p in (tmp_path / "chunks").rglob("*") if p.is_file())
    assert on_disk <= 10_000
    assert cache.stats.evicted >= 2
    assert cache.get(digests[0]) == blobs[0]  # recently used: kept
    assert cache.get(digests[1]) is None  # oldest unused: evicted
    assert cache.get(digests[4]) == blobs[4]  # newest: kept


class StallingSource:
    """Records each read as it starts; while ``stall`` is set a read waits until released
    (``release(i)``: the i-th read, ``release_all()``)."""

    def __init__(self, inner: ByteSource) -> None:
        self.inner = inner
        self.started: list[tuple[int, int]] = []
        self.stall = False
        self._gates: list[trio.Event] = []

    @property
    def size(self) -> int:
        return self.inner.size

    async def read_at(self, offset: int, length: int) -> bytes:
        self.started.append((offset, length))
        gate = trio.Event()
        self._gates.append(gate)
        if self.stall:
            await gate.wait()
        return await self.inner.read_at(offset, length)

    def forget(self) -> None:
        self.started.clear()
        self._gates.clear()

    def release(self, i: int) -> None:
        self._gates[i].set()

    def release_all(self) -> None:
        self.stall = False
        for gate in self._gates:
            gate.set()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


async def prioritized_view() -> tuple[ImageView, StallingSource, list[str]]:
    source = StallingSource(FileSource(FIXTURES / "prioritized.esgz"))
    index = await index_of(source)
    source.forget()
    prio = expected("prioritized")["prefetch_entries"]
    files = [p for p in prio if (e := index.resolve(p)) is not None and e.kind == "reg"]
    return ImageView([LayerView(source, index, "prioritized")]), source, files


def sha256_of(case: str, path: str) -> str:
    return str(next(e for e in expected(case)["entries"] if e["path"] == path)["sha256"])


async def test_on_demand_read_during_prefetch_shares_its_fetch() -> None:
    view, source, files = await prioritized_view()
    node = view.resolve(files[-1])
    source.stall = True
    got: list[bytes] = []

    async def read() -> None:
        got.append(await view.read(node, 0, node.entry.size))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(view.prefetch, 0)
        await until(lambda: len(source.started) == 1)
        nursery.start_soon(read)
        await trio.sleep(0.1)
        assert len(source.started) == 1  # the reader waits for the prefetch's fetch
        source.release_all()
    assert len(source.started) == 1, source.started  # nothing fetched twice
    assert hashlib.sha256(got[0]).hexdigest() == sha256_of("prioritized", files[-1])
    assert view.prefetch_state["prioritized"] == f"done ({len(files)} chunks)"


async def test_prefetch_after_an_on_demand_read_leaves_its_chunks_out() -> None:
    view, source, files = await prioritized_view()
    index = view.layers[0].index
    node = view.resolve(files[0])
    (chunk,) = index.chunks(node.entry)
    source.stall = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(view.read, node, 0, node.entry.size)
        await until(lambda: len(source.started) == 1)
        nursery.start_soon(view.prefetch, 0)
        await trio.sleep(0.1)
        assert len(source.started) == 1  # background work waits for on-demand fetches
        source.release_all()
    assert source.started[0] == (chunk.comp_offset, chunk.comp_end - chunk.comp_offset)
    # The prefetch fetched the rest of the range only: no compressed byte twice.
    rest = source.started[1:]
    assert rest and all(a >= chunk.comp_end for a, _ in rest), source.started
    assert sum(rest[-1]) == index.prefetch_end
    assert view.prefetch_state["prioritized"] == f"done ({len(files) - 1} chunks)"


async def test_background_fetches_yield_to_on_demand_ones_and_are_capped() -> None:
    source = StallingSource(FileSource(FIXTURES / "chunked.esgz"))
    index = await index_of(source)
    source.forget()
    reader = ChunkReader(source, index, ChunkCache(None), FetchGate(background_slots=2))
    reader.READ_AHEAD = 0
    reader.MAX_GAP = -1  # every chunk its own request, to count them
    big = index.resolve(BIG)
    assert big is not None
    chunks = index.chunks(big)
    source.stall = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.read, big, 0, 10)
        await until(lambda: len(source.started) == 1)
        nursery.start_soon(reader.warm, chunks[2:], "background", True)
        await trio.sleep(0.1)
        assert len(source.started) == 1  # nothing in the background while a read fetches
        source.release(0)
        await until(lambda: len(source.started) == 3)
        await trio.sleep(0.1)
        assert len(source.started) == 3  # at most two background requests at once
        nursery.start_soon(reader.read, big, chunks[1].file_offset, 10)  # never waits
        await until(lambda: len(source.started) == 4)
        assert source.started[3][0] == chunks[1].comp_offset
        source.release_all()
    assert reader.fetches == len(chunks)  # each once


async def test_large_prefetch_is_streamed_in_bounded_pieces() -> None:
    view, source, files = await prioritized_view()
    index = view.layers[0].index
    reader = view.readers[0]
    reader.PIECE = 1024  # the prioritized range (~7 KB) is "large" now
    reader.DECODE_BATCH = 512
    assert await view.prefetch(0) == len(files)
    start = source.started[0][0]
    assert all(length <= 1024 for _, length in source.started)
    # Consecutive pieces of one range, each byte once.
    pos = start
    for offset, length in source.started:
        assert offset == pos
        pos += length
    assert pos == index.prefetch_end
    for path in files:
        node = view.resolve(path)
        data = await view.read(node, 0, node.entry.size)
        assert hashlib.sha256(data).hexdigest() == sha256_of("prioritized", path)
    assert sum(source.started[-1]) == index.prefetch_end  # no read after the prefetch


async def test_stats_show_prefetch_and_background_fetch_state() -> None:
    view, _, files = await prioritized_view()
    layer = view.stats()["layers"][0]  # type: ignore[index]
    assert (layer["prefetch"], layer["background_fetch"]) == ("none", "none")
    await view.prefetch(0)
    fetched = await view.background_fetch(0)
    assert fetched > 0
    layer = view.stats()["layers"][0]  # type: ignore[index]
    assert layer["prefetch"] == f"done ({len(files)} chunks)"
    assert layer["background_fetch"] == f"done ({fetched} chunks)"


def _chunk(n: int, size: int = 3000) -> tuple[bytes, bytes]:
    data = bytes([n]) * size
    return hashlib.sha256(data).digest(), data


def test_opening_the_cache_removes_stale_temp_files(tmp_path: Path) -> None:
    ChunkCache(tmp_path).put(*_chunk(1))
    folder = next((tmp_path / "chunks").iterdir())
    stale, fresh = folder / ".tmp-dead", folder / ".tmp-writing"
    stale.write_bytes(b"half a chunk")
    fresh.write_bytes(b"being written")
    old = time.time() - STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    cache = ChunkCache(tmp_path)
    cache.scan()
    assert not stale.exists() and fresh.exists()  # a live writer's file is left alone
    assert cache.stats.stale_removed == 1
    assert cache.disk_bytes == 3000  # the chunk, not the temporary files


def test_put_of_a_chunk_already_on_disk_refreshes_its_age(tmp_path: Path) -> None:
    chunks = [_chunk(i) for i in range(4)]
    first = ChunkCache(tmp_path, memory_bytes=0)
    for i, (digest, data) in enumerate(chunks[:3]):
        first.put(digest, data)
        os.utime(first._path(digest), (1000 + i, 1000 + i))  # 0 oldest, 2 newest
    # Another mount, later: fetches chunk 0 again (say, another layer holds it too).
    cache = ChunkCache(tmp_path, memory_bytes=0, max_disk_bytes=10_000)
    cache.scan()
    cache.put(*chunks[0])
    assert os.stat(cache._path(chunks[0][0])).st_mtime > time.time() - 60
    cache.put(*chunks[3])  # over the bound: the least recently used goes
    assert cache.get(chunks[0][0]) == chunks[0][1]
    assert cache.get(chunks[1][0]) is None
    assert cache.stats.evicted == 1


def test_eviction_does_not_rescan_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(20):  # a previous run's chunks, oldest first
        digest, data = _chunk(i, 1000)
        ChunkCache(tmp_path).put(digest, data)
        os.utime(ChunkCache(tmp_path)._path(digest), (1000 + i, 1000 + i))
    cache = ChunkCache(tmp_path, memory_bytes=0, max_disk_bytes=10_000)
    scans: list[object] = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: scans.append(path) or real(path))
    cache.scan()
    assert cache.stats.evicted == 11  # opened over the bound: down to 90%
    opened = len(scans)
    for i in range(20, 60):
        cache.put(*_chunk(i, 1000))
    assert cache.stats.evicted > 11 + 30 and len(scans) == opened  # no more directory scans
    assert cache.disk_bytes <= 10_000
    on_disk = [p for p in (tmp_path / "chunks").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in on_disk) == cache.disk_bytes
    assert cache.get(_chunk(59, 1000)[0]) is not None and cache.get(_chunk(19, 1000)[0]) is None
