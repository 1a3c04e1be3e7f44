"""containers/storage's (podman's) zstd:chunked dialect, on blobs built by hand to its layout:
64-byte footer, TOC then tar-split in skippable frames, ``endOffset``, ``chunkType: "zeros"``,
``io.github.containers.zstd-chunked.*`` annotations."""

from __future__ import annotations

import hashlib
import json

import pytest
from layer_helpers import CountingSource, StorageBlob, storage_zstd_blob

from stargzfs.errors import DigestMismatchError, FormatError
from stargzfs.formats.footer import LayerFormat
from stargzfs.formats.layer import DEFAULT_TAIL_SIZE, read_toc
from stargzfs.index import Entry, LayerIndex, load_index
from stargzfs.reader import iter_file, read_chunk, read_file_range
from stargzfs.source import BytesSource

RANDOM = hashlib.shake_256(b"payload").digest(200_000)
FILES: list[tuple[str, list[bytes | int]]] = [
    ("data/small.txt", [b"hello, podman\n"]),
    # data, a 5000-byte hole, data, a trailing hole
    ("data/sparse.bin", [RANDOM[:70_000], 5000, RANDOM[70_000:73_000], 2048]),
    ("data/hole-only.bin", [4096]),
    ("data/chunked.bin", [RANDOM[100_000:140_000], RANDOM[140_000:200_000]]),
]


async def read_all(source: BytesSource, index: LayerIndex, entry: Entry) -> bytes:
    """A file chunk by chunk; holes without bytes in the blob are zeros, never fetched."""
    out = []
    for chunk in index.chunks(entry):
        if chunk.zeros and chunk.comp_offset == chunk.comp_end:
            out.append(bytes(chunk.size))
        else:
            out.append(await read_chunk(source, index, chunk, entry.name))
    return b"".join(out)


def big_tarsplit_blob(**kw: bool) -> StorageBlob:
    # The tar-split frame between TOC and footer is larger than the tail read.
    return storage_zstd_blob(FILES, tarsplit_size=DEFAULT_TAIL_SIZE + 100_000, **kw)


async def test_toc_before_a_large_tar_split_is_read_from_its_own_offset() -> None:
    blob = big_tarsplit_blob()
    source = CountingSource(BytesSource(blob.data))
    toc = await read_toc(source, blob.annotations)
    assert toc.toc_json == blob.toc_json
    assert toc.format is LayerFormat.ZSTD_CHUNKED
    assert toc.footer.dialect == "zstd-chunked-storage"
    assert toc.footer.toc_offset == blob.toc_offset
    # The manifest checksum (of the compressed TOC) vouches for the layer.
    assert toc.verified
    # The tail, then exactly the TOC: never the tar-split in between.
    assert len(source.reads) == 2
    assert source.reads[1] == (blob.toc_offset, blob.toc_size)


@pytest.mark.parametrize("tail_size", [64 * 1024, 700_000, 1 << 22])
async def test_any_tail_size_finds_the_toc(tail_size: int) -> None:
    blob = storage_zstd_blob(FILES, tarsplit_size=300_000)
    toc = await read_toc(BytesSource(blob.data), blob.annotations, tail_size=tail_size)
    assert toc.toc_json == blob.toc_json


async def test_manifest_checksum_mismatch_and_absence() -> None:
    blob = big_tarsplit_blob()
    bad = dict(blob.annotations)
    bad["io.github.containers.zstd-chunked.manifest-checksum"] = "sha256:" + "0" * 64
    with pytest.raises(DigestMismatchError, match="compressed TOC"):
        await read_toc(BytesSource(blob.data), bad)
    with pytest.raises(DigestMismatchError, match="compressed TOC"):
        await load_index(BytesSource(blob.data), bad)
    toc = await read_toc(BytesSource(blob.data))
    assert not toc.verified
    index = await load_index(BytesSource(blob.data))
    assert not index.verified


async def test_index_holes_end_offsets_and_contents() -> None:
    blob = big_tarsplit_blob()
    source = BytesSource(blob.data)
    index = await load_index(source, blob.annotations)
    assert index.verified
    assert sorted(p for p, _ in index.walk()) == [
        "data",
        "data/chunked.bin",
        "data/hole-only.bin",
        "data/link",
        "data/small.txt",
        "data/sparse.bin",
    ]
    for name, content in blob.contents.items():
        entry = index.resolve(name)
        assert entry is not None and entry.size == len(content)
        assert await read_all(source, index, entry) == content, name
        # Nanosecond modtimes are kept.
        assert entry.mtime_ns is not None and entry.mtime_ns % 1_000_000_000 == 123456789
    sparse = index.resolve("data/sparse.bin")
    assert sparse is not None
    chunks = index.chunks(sparse)
    assert [(c.file_offset, c.size, c.zeros) for c in chunks] == [
        (0, 70_000, False),
        (70_000, 5000, True),
        (75_000, 3000, False),
        (78_000, 2048, True),
    ]
    by_name = {e["name"]: e for e in blob.toc["entries"] if e["type"] == "reg"}
    # A hole has an empty range beside its neighbours; the file's data ends at endOffset.
    assert chunks[1].comp_offset == chunks[1].comp_end == chunks[2].comp_offset
    assert chunks[2].comp_end == by_name["data/sparse.bin"]["endOffset"]
    assert chunks[3].comp_offset == chunks[3].comp_end == chunks[2].comp_offset
    small = index.resolve("data/small.txt")
    assert small is not None
    (only,) = index.chunks(small)
    assert only.comp_end == by_name["data/small.txt"]["endOffset"]  # not the next header
    # Data chunks read through the ordinary reader.
    assert await read_file_range(source, index, small, 0, 100) == b"hello, podman\n"
    chunked = index.resolve("data/chunked.bin")
    assert chunked is not None
    whole = b"".join([p async for p in iter_file(source, index, chunked)])
    assert whole == RANDOM[100_000:200_000]


async def test_holes_with_bytes_in_the_blob_read_through_the_reader() -> None:
    """Upstream's writer does compress the zeros of a hole into the stream: those chunks have
    a real range and read (and verify) like any other."""
    blob = storage_zstd_blob(FILES, holes_have_data=True)
    source = BytesSource(blob.data)
    index = await load_index(source, blob.annotations)
    for name, content in blob.contents.items():
        entry = index.resolve(name)
        assert entry is not None
        assert b"".join([p async for p in iter_file(source, index, entry)]) == content
        assert all(c.comp_end > c.comp_offset for c in index.chunks(entry))
    sparse = index.resolve("data/sparse.bin")
    assert sparse is not None
    assert [c.zeros for c in index.chunks(sparse)] == [False, True, False, True]


def build(entries: list[dict[str, object]]) -> LayerIndex:
    doc = json.dumps({"version": 1, "entries": entries})
    return LayerIndex.build(doc, format="zstd:chunked", compression="zstd", toc_offset=1000)


def test_bad_chunk_type_and_end_offset_are_format_errors() -> None:
    f = {"type": "reg", "name": "f", "size": 10, "offset": 100}
    with pytest.raises(FormatError, match="chunkType"):
        build([{**f, "chunkType": "sparkles"}])
    with pytest.raises(FormatError, match="endOffset"):
        build([{**f, "endOffset": 50}])
    with pytest.raises(FormatError, match="endOffset"):
        build([{**f, "endOffset": 5000}])  # past the TOC
    with pytest.raises(FormatError, match="without offset"):
        build([{"type": "reg", "name": "f", "size": 10}])
    # A hole needs no offset.
    index = build([{"type": "reg", "name": "f", "size": 10, "chunkType": "zeros"}])
    entry = index.resolve("f")
    assert entry is not None
    (chunk,) = index.chunks(entry)
    assert chunk.zeros and chunk.size == 10 and chunk.comp_offset == chunk.comp_end


async def test_a_huge_hole_is_read_in_the_part_asked_for() -> None:
    """A hole is zeros the TOC declares: a read makes only the bytes asked for (a sparse
    file's hole may be terabytes), through the library reader, the mount's chunk reader and
    iter_file, and nothing is fetched."""
    import tracemalloc

    from stargzfs.cache import ChunkCache
    from stargzfs.reader import ChunkReader, FetchGate

    size = 1 << 40
    index = build([{"type": "reg", "name": "f", "size": size, "chunkType": "zeros"}])
    entry = index.resolve("f")
    assert entry is not None
    source = CountingSource(BytesSource(b"\0" * 1000))
    tracemalloc.start()
    try:
        assert await read_file_range(source, index, entry, size // 2, 4096) == bytes(4096)
        reader = ChunkReader(source, index, ChunkCache(None), FetchGate())
        assert await reader.read(entry, size - 100, 4096) == bytes(100)
        pieces = iter_file(source, index, entry)
        assert await pieces.__anext__() == bytes(1 << 20)
        await pieces.aclose()
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()
    assert source.reads == []
