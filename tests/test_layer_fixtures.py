"""The reader agrees exactly with the upstream reference implementation's fixtures."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from layer_helpers import CASES, FIXTURES, CountingSource, as_legacy, expected, index_of

from stargzfs.errors import DigestMismatchError, IntegrityError
from stargzfs.formats.footer import LayerFormat
from stargzfs.formats.layer import ANNOTATION_TOC_DIGEST, read_toc
from stargzfs.index import Entry, LayerIndex, load_index
from stargzfs.reader import iter_file, read_file_range
from stargzfs.source import BytesSource, FileSource

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures is absent")


def view(index: LayerIndex, entry: Entry) -> dict[str, Any]:
    """An entry in the fixtures' own vocabulary."""
    return {
        "type": "hardlink" if entry.hardlink else entry.kind,
        "mode": entry.mode,
        "uid": entry.uid,
        "gid": entry.gid,
        "uname": entry.uname,
        "gname": entry.gname,
        "mtime": None if entry.mtime_ns is None else entry.mtime_ns // 1_000_000_000,
        "linkname": entry.linkname,
        "devmajor": entry.devmajor,
        "devminor": entry.devminor,
        "xattrs": {k: base64.b64encode(v).decode() for k, v in entry.xattrs.items()},
        "nlink": entry.nlink,
    }


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_entries_match_reference(case: str) -> None:
    exp = expected(case)
    source = FileSource(FIXTURES / CASES[case])
    index = await index_of(source, exp["annotations"])
    got = dict(index.walk())
    assert sorted(got) == [e["path"] for e in exp["entries"]]
    for want in exp["entries"]:
        entry = got[want["path"]]
        keys = view(index, entry).keys()
        assert view(index, entry) == {k: want[k] for k in keys}, want["path"]
        if want["type"] in ("reg", "symlink", "hardlink"):
            assert entry.size == want["size"], want["path"]
        if entry.hardlink:
            assert entry.id == got[want["inode_path"]].id
            assert entry.kind == want["target_type"]
    root = index.resolve("")
    assert root is not None and root.kind == "dir" and root.mode == exp["root"]["mode"]
    assert root.nlink == exp["root"]["nlink"]


async def test_contents_and_chunks_match_reference(case: str) -> None:
    exp = expected(case)
    source = FileSource(FIXTURES / CASES[case])
    index = await index_of(source, exp["annotations"])
    chunks_expected = exp.get("expected_chunks", {})
    for want in exp["entries"]:
        if want["sha256"] is None:
            continue
        entry = index.resolve(want["path"])
        assert entry is not None
        digest = hashlib.sha256()
        async for piece in iter_file(source, index, entry):
            digest.update(piece)
        assert digest.hexdigest() == want["sha256"], want["path"]
        if want["path"] in chunks_expected:
            got = [
                {"offset": c.file_offset, "size": c.size, "sha256": (c.digest or b"").hex()}
                for c in index.chunks(entry)
            ]
            assert got == chunks_expected[want["path"]]


async def test_prefetch_landmark_splits_prioritized_files(case: str) -> None:
    exp = expected(case)
    source = FileSource(FIXTURES / CASES[case])
    index = await index_of(source, exp["annotations"])
    assert index.landmark == exp["landmark"]
    if exp["landmark"] == ".no.prefetch.landmark":
        assert index.prefetch_end is None
        return
    assert index.prefetch_end is not None
    prio = set(exp["prefetch_entries"])
    for path, entry in index.walk():
        chunks = index.chunks(entry)
        if chunks:
            assert (chunks[0].comp_offset < index.prefetch_end) == (path in prio), path


async def test_format_and_toc_digest(case: str) -> None:
    exp = expected(case)
    toc = await read_toc(FileSource(FIXTURES / CASES[case]), exp["annotations"])
    assert toc.toc_digest == exp["toc_digest"]
    assert toc.verified
    assert toc.format is (
        LayerFormat.ZSTD_CHUNKED if case == "zstdchunked" else LayerFormat.ESTARGZ
    )
    assert toc.footer.toc_offset == exp["toc_info"]["toc_offset"]


async def test_small_layer_needs_one_read_for_toc() -> None:
    source = CountingSource(FileSource(FIXTURES / "basic.esgz"))
    await read_toc(source)
    assert len(source.reads) == 1
    # With a tail too short for the TOC, exactly one more read fetches the missing prefix.
    source = CountingSource(FileSource(FIXTURES / "basic.esgz"))
    await read_toc(source, tail_size=1000)
    assert len(source.reads) == 2
    assert source.reads[1][0] == expected("basic")["toc_info"]["toc_offset"]


async def test_wrong_toc_digest_annotation_is_rejected() -> None:
    bad = {ANNOTATION_TOC_DIGEST: "sha256:" + "0" * 64}
    with pytest.raises(DigestMismatchError, match="TOC"):
        await read_toc(FileSource(FIXTURES / "basic.esgz"), bad)


async def test_corrupt_chunk_is_an_error_naming_file_and_offset() -> None:
    blob = bytearray((FIXTURES / "chunked.esgz").read_bytes())
    index = await index_of(BytesSource(bytes(blob)))
    entry = index.resolve("data/random-300000.bin")
    assert entry is not None
    chunk = index.chunks(entry)[2]
    # Flip a byte in the middle of the third chunk's compressed data.
    blob[(chunk.comp_offset + chunk.comp_end) // 2] ^= 0xFF
    source = BytesSource(bytes(blob))
    with pytest.raises(IntegrityError, match=r"data/random-300000\.bin \(chunk at offset 131072\)"):
        await read_file_range(source, index, entry, chunk.file_offset, 10)
    # The other chunks still read fine.
    first = await read_file_range(source, index, entry, 0, 100)
    assert len(first) == 100


async def test_read_ranges_across_chunk_boundaries() -> None:
    source = FileSource(FIXTURES / "chunked.esgz")
    index = await index_of(source)
    entry = index.resolve("data/random-300000.bin")
    assert entry is not None
    whole = b"".join([piece async for piece in iter_file(source, index, entry)])
    assert len(whole) == 300000
    for off, length in [(0, 1), (65535, 2), (65536, 65536), (100000, 200000), (299999, 10)]:
        assert await read_file_range(source, index, entry, off, length) == whole[off : off + length]
    assert await read_file_range(source, index, entry, 300000, 10) == b""


async def test_index_persists_and_reopens(tmp_path: Any) -> None:
    exp = expected("basic")
    source = CountingSource(FileSource(FIXTURES / "basic.esgz"))
    first = await load_index(source, exp["annotations"], cache_dir=tmp_path)
    reads = len(source.reads)
    second = await load_index(source, exp["annotations"], cache_dir=tmp_path)
    assert len(source.reads) == reads  # reopened from the cache: no TOC read
    assert [p for p, _ in first.walk()] == [p for p, _ in second.walk()]
    assert view(first, first.resolve("usr/bin/ping")) == view(  # type: ignore[arg-type]
        second,
        second.resolve("usr/bin/ping"),  # type: ignore[arg-type]
    )


async def test_streamed_toc_in_tiny_pieces_gives_the_same_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The TOC decoder's windows and pieces may split anywhere, even inside a UTF-8 name."""
    from stargzfs.formats import toc as toc_module

    toc = await read_toc(FileSource(FIXTURES / "basic.esgz"))
    whole = LayerIndex.build(toc.toc_json, format="estargz", compression="gzip", toc_offset=10**6)
    monkeypatch.setattr(toc_module, "_WINDOW", 7)
    for data in (toc.toc_json, (toc.toc_json[i : i + 1] for i in range(len(toc.toc_json)))):
        split = LayerIndex.build(data, format="estargz", compression="gzip", toc_offset=10**6)
        assert [(p, view(split, e)) for p, e in split.walk()] == [
            (p, view(whole, e)) for p, e in whole.walk()
        ]


async def test_bad_toc_digest_leaves_no_cached_index(tmp_path: Any) -> None:
    bad = {ANNOTATION_TOC_DIGEST: "sha256:" + "1" * 64}
    with pytest.raises(DigestMismatchError, match="TOC"):
        await load_index(FileSource(FIXTURES / "basic.esgz"), bad, cache_dir=tmp_path)
    assert not [p for p in (tmp_path / "index").iterdir()]


@pytest.mark.parametrize("case", ["basic", "chunked", "prioritized"])
async def test_legacy_footer_blob_reads_like_the_estargz_one(case: str) -> None:
    """The same blob behind a legacy 47-byte stargz footer gives the same view and contents."""
    exp = expected(case)
    source = BytesSource(as_legacy((FIXTURES / CASES[case]).read_bytes()))
    toc = await read_toc(source, exp["annotations"])
    assert toc.footer.dialect == "stargz-legacy" and toc.footer.footer_size == 47
    assert toc.toc_digest == exp["toc_digest"] and toc.verified
    index = await index_of(source, exp["annotations"])
    reference = await index_of(FileSource(FIXTURES / CASES[case]), exp["annotations"])
    assert [(p, view(index, e)) for p, e in index.walk()] == [
        (p, view(reference, e)) for p, e in reference.walk()
    ]
    for want in exp["entries"]:
        if want["sha256"] is None:
            continue
        entry = index.resolve(want["path"])
        assert entry is not None
        data = b"".join([piece async for piece in iter_file(source, index, entry)])
        assert hashlib.sha256(data).hexdigest() == want["sha256"], want["path"]
