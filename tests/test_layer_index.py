"""The layer index on hand-written TOCs: hardlinks and nlink, owners, names, chunk lookup."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_helpers import blob_with_toc

from stargzfs.errors import FormatError
from stargzfs.formats.layer import ANNOTATION_TOC_DIGEST
from stargzfs.index import LayerIndex, load_index
from stargzfs.source import BytesSource


def toc(*entries: dict[str, Any]) -> str:
    return json.dumps({"version": 1, "entries": list(entries)})


def build(*entries: dict[str, Any], **kw: Any) -> LayerIndex:
    return LayerIndex.build(
        toc(*entries), format="estargz", compression="gzip", toc_offset=1 << 40, **kw
    )


FILE = {"name": "a", "type": "reg", "size": 3, "offset": 0}


def nlink(index: LayerIndex, path: str) -> int:
    entry = index.resolve(path)
    assert entry is not None, path
    return entry.nlink


def test_hardlink_repeated_under_the_same_name_is_one_link() -> None:
    link = {"name": "b", "type": "hardlink", "linkName": "a"}
    index = build(FILE, link, link, {**link, "name": "./b"})
    assert nlink(index, "a") == 2 and nlink(index, "b") == 2
    assert [p for p, _ in index.walk()] == ["a", "b"]


def test_hardlink_replaced_by_a_file_no_longer_counts() -> None:
    link = {"name": "b", "type": "hardlink", "linkName": "a"}
    other = {"name": "b", "type": "reg", "size": 5, "offset": 10}
    index = build(FILE, link, other)
    assert nlink(index, "a") == 1 and nlink(index, "b") == 1
    b = index.resolve("b")
    assert b is not None and not b.hardlink and b.size == 5


def test_hardlinks_and_chains_count_every_name() -> None:
    index = build(
        FILE,
        {"name": "b", "type": "hardlink", "linkName": "a"},
        {"name": "c", "type": "hardlink", "linkName": "b"},  # a chain: c -> b -> a
        {"name": "d", "type": "hardlink", "linkName": "./a"},
    )
    assert {p: e.nlink for p, e in index.walk()} == {"a": 4, "b": 4, "c": 4, "d": 4}
    ids = {e.id for _, e in index.walk()}
    assert len(ids) == 1


def test_replaced_chunked_file_leaves_no_chunks_behind() -> None:
    big = {"name": "f", "type": "reg", "size": 20, "offset": 0, "chunkSize": 10}
    rest = {"name": "f", "type": "chunk", "offset": 5, "chunkOffset": 10, "chunkSize": 10}
    small = {"name": "f", "type": "reg", "size": 4, "offset": 50}
    index = build(big, rest, small)
    f = index.resolve("f")
    assert f is not None and f.size == 4
    assert [(c.file_offset, c.size, c.comp_offset) for c in index.chunks(f)] == [(0, 4, 50)]
    assert index._db.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0


D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
BIG = {"name": "f", "type": "reg", "size": 20, "offset": 0, "chunkSize": 10, "chunkDigest": D1}
REST = {"name": "f", "type": "chunk", "offset": 5, "chunkOffset": 10, "chunkSize": 10}


def test_verified_toc_needs_a_digest_for_every_chunk() -> None:
    with pytest.raises(FormatError, match=r"'f'.* chunk at offset 10 has no chunkDigest"):
        build(BIG, REST, verified=True)
    first_missing = {k: v for k, v in BIG.items() if k != "chunkDigest"}
    with pytest.raises(FormatError, match="chunk at offset 0 has no chunkDigest"):
        build(first_missing, {**REST, "chunkDigest": D2}, verified=True)
    with pytest.raises(FormatError, match="no chunkDigest"):
        build(FILE, verified=True)  # one chunk, no digest of any kind
    # Unverified: accepted, and read unchecked.
    index = build(BIG, REST)
    f = index.resolve("f")
    assert f is not None and not index.verified
    assert [c.digest for c in index.chunks(f)] == [bytes.fromhex("1" * 64), None]


def test_verified_toc_accepts_what_can_be_checked() -> None:
    index = build(BIG, {**REST, "chunkDigest": D2}, verified=True)
    assert index.verified
    # One chunk with only the file digest (containers/storage writes no chunkDigest there).
    index = build({**FILE, "digest": D1}, verified=True)
    a = index.resolve("a")
    assert a is not None and [c.digest for c in index.chunks(a)] == [bytes.fromhex("1" * 64)]
    # A hole's content is the TOC's word: no digest needed.
    hole = {"name": "h", "type": "reg", "size": 8, "chunkType": "zeros"}
    build(hole, verified=True)


def test_one_chunk_whose_two_digests_disagree_is_corrupt() -> None:
    with pytest.raises(FormatError, match="differ"):
        build({**FILE, "digest": D1, "chunkDigest": D2})
    index = build({**FILE, "digest": D1, "chunkDigest": D1}, verified=True)
    a = index.resolve("a")
    assert a is not None and index.chunks(a)[0].digest == bytes.fromhex("1" * 64)


async def test_load_index_refuses_unverifiable_chunks_of_a_verified_layer() -> None:
    doc = toc(BIG, REST)
    blob = blob_with_toc(doc, payload=b"x" * 100)
    annotations = {ANNOTATION_TOC_DIGEST: "sha256:" + hashlib.sha256(doc.encode()).hexdigest()}
    with pytest.raises(FormatError, match="no chunkDigest"):
        await load_index(BytesSource(blob), annotations)
    index = await load_index(BytesSource(blob))  # no annotation: an unverified layer
    assert not index.verified and index.resolve("f") is not None


def test_owner_names_carry_forward_per_id_and_the_latest_wins() -> None:
    index = build(
        {"name": "./", "type": "dir", "userName": "root", "groupName": "wheel"},
        {"name": "a", "type": "dir", "uid": 1000, "gid": 1000, "userName": "alice"},
        {"name": "a/1", "type": "fifo", "uid": 1000, "gid": 1000},
        {"name": "a/2", "type": "fifo", "uid": 1000, "gid": 50, "userName": "bob"},
        {"name": "a/3", "type": "fifo", "uid": 1000, "gid": 50, "groupName": "staff"},
        {"name": "a/4", "type": "fifo", "uid": 0, "gid": 1000},
        {"name": "x/y", "type": "fifo", "uid": 7},  # x: an implicit dir
        {**FILE, "name": "f", "uid": 1000, "gid": 50},
        {"name": "l", "type": "hardlink", "linkName": "f", "uid": 0, "userName": "carol"},
        {"name": "a/5", "type": "fifo", "uid": 1000, "gid": 1000},
    )
    got = {p: (e.uname, e.gname) for p, e in index.walk()}
    assert got == {
        "a": ("alice", ""),  # gname by gid, never by the uid's user name
        "a/1": ("alice", ""),
        "a/2": ("bob", ""),
        "a/3": ("bob", "staff"),
        "a/4": ("root", ""),
        "a/5": ("bob", ""),
        "f": ("bob", "staff"),
        "l": ("bob", "staff"),  # a hardlink reports its target's owner
        "x": ("", ""),
        "x/y": ("", "wheel"),
    }
    root = index.resolve("")
    assert root is not None and (root.uname, root.gname) == ("root", "wheel")
    # Per id: the first name given.
    assert (index.uname(1000), index.uname(0), index.gname(50)) == ("alice", "root", "staff")


async def test_owner_names_survive_a_persisted_index(tmp_path: Any) -> None:
    doc = toc(
        {"name": "a", "type": "fifo", "uid": 5, "userName": "u1"},
        {"name": "b", "type": "fifo", "uid": 5, "userName": "u2"},
    )
    built = LayerIndex.build(
        doc, format="estargz", compression="gzip", toc_offset=1, path=tmp_path / "i.sqlite"
    )
    reopened = LayerIndex.open(tmp_path / "i.sqlite")
    for index in (built, reopened):
        assert [(p, e.uname) for p, e in index.walk()] == [("a", "u1"), ("b", "u2")]


def many_chunks(n: int, size: int = 100) -> LayerIndex:
    entries: list[dict[str, Any]] = [
        {"name": "big", "type": "reg", "size": n * size, "offset": 0, "chunkSize": size}
    ]
    entries += [
        {"name": "big", "type": "chunk", "offset": 10 * i, "chunkOffset": size * i}
        | ({"chunkSize": size} if i < n - 1 else {})
        for i in range(1, n)
    ]
    entries.append({"name": "small", "type": "reg", "size": 7, "offset": 10 * n})
    return build(*entries)


def test_a_read_in_the_middle_of_a_big_file_gets_just_its_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    index = many_chunks(5000)
    big = index.resolve("big")
    assert big is not None
    every = index.chunks(big)
    assert len(every) == 5000
    monkeypatch.setattr(index, "chunks", None)  # no loading of the file's whole chunk list
    got = index.chunks_for(big, 250_050, 300)  # inside chunk 2500 to inside chunk 2503
    assert got == every[2500:2504]
    assert [c.file_offset for c in got] == [250_000, 250_100, 250_200, 250_300]
    assert got[0].comp_offset == 25_000 and got[0].comp_end == 25_010
    # The cost is that of the chunks returned: count SQLite VM steps.
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    index._db.set_progress_handler(step, 1)
    index.chunks_for(big, 250_050, 250)
    mid = steps
    steps = 0
    index._db.execute("SELECT count(*) FROM chunks WHERE entry=?", (big.id,)).fetchone()
    assert mid * 20 < steps, (mid, steps)
    index._db.set_progress_handler(None, 1)


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(-5, 1100), length=st.integers(0, 1100))
def test_chunks_for_is_the_overlapping_chunks(offset: int, length: int) -> None:
    index = INDEX_37
    for name in ("big", "small"):
        entry = index.resolve(name)
        assert entry is not None
        end = min(offset + length, entry.size)
        want = [
            c
            for c in index.chunks(entry)
            if offset < end and c.file_offset < end and c.file_offset + c.size > max(offset, 0)
        ]
        assert index.chunks_for(entry, offset, length) == want


INDEX_37 = many_chunks(37, size=27)  # 999 bytes in 37 chunks


@pytest.mark.parametrize("persisted", [False, True])
def test_compressed_ranges_follow_blob_order_whatever_the_toc_order(
    tmp_path: Any, persisted: bool
) -> None:
    """Payload offsets in TOC order are usually sorted; out of order (and repeated, as
    endOffset repeats the next start) they end each range at the next larger offset all the
    same, in memory and reopened from a file."""
    entries = [
        {"name": "c", "type": "reg", "size": 5, "offset": 300, "endOffset": 400},
        {"name": "a", "type": "reg", "size": 5, "offset": 100, "endOffset": 200},
        {"name": "b", "type": "reg", "size": 5, "offset": 200, "endOffset": 300},
        {"name": "d", "type": "reg", "size": 5, "offset": 400},
    ]
    path = tmp_path / "i.sqlite" if persisted else None
    index = LayerIndex.build(
        toc(*entries), format="estargz", compression="gzip", toc_offset=900, path=path
    )
    ends = {}
    for name in "abcd":
        entry = index.resolve(name)
        assert entry is not None
        (chunk,) = index.chunks(entry)
        ends[name] = (chunk.comp_offset, chunk.comp_end)
    assert ends == {"a": (100, 200), "b": (200, 300), "c": (300, 400), "d": (400, 900)}
    assert list(index._offsets) == [100, 200, 300, 400]


def test_an_index_file_without_its_offsets_is_unreadable(tmp_path: Any) -> None:
    import sqlite3

    path = tmp_path / "i.sqlite"
    build(FILE, path=path).close()
    db = sqlite3.connect(path)
    db.execute("DELETE FROM meta WHERE key = 'offsets'")
    db.commit()
    db.close()
    with pytest.raises(FormatError, match="unreadable"):
        LayerIndex.open(path)


@pytest.mark.parametrize("count", [0, 1, 31, 32, 33, 97])
def test_rows_inserted_in_groups_keep_every_field_in_place(count: int) -> None:
    files = [
        {"name": f"d/f{i:03d}", "type": "reg", "size": i + 1, "offset": 10 * i, "mode": i}
        for i in range(count)
    ]
    links = [{"name": f"d/s{i:03d}", "type": "symlink", "linkName": f"t{i}"} for i in range(3)]
    index = build(*files, *links)
    got = [(p, e.size, e.mode, e.linkname) for p, e in index.walk()]
    want = [("d", 0, 0o755, "")]
    want += [(f"d/f{i:03d}", i + 1, i, "") for i in range(count)]
    want += [(f"d/s{i:03d}", 2, 0, f"t{i}") for i in range(3)]
    assert got == want
    for i in range(count):
        entry = index.resolve(f"d/f{i:03d}")
        assert entry is not None
        assert index.chunks(entry)[0].comp_offset == 10 * i


def test_names_are_cleaned_whatever_the_previous_row() -> None:
    """A name under the same parent as the last row skips the full clean-up only when it is
    clean already: a leading "/", a trailing "/", dots and NUL are still seen."""
    names = ["a", "/b", "d/a", "d/b/", "d/.c", "d/..x", "./d/e", "d/f//", "d/g"]
    index = build(*({"name": n, "type": "reg", "size": 0} for n in names))
    assert [p for p, _ in index.walk()] == [
        "a",
        "b",
        "d",
        "d/..x",
        "d/.c",
        "d/a",
        "d/b",
        "d/e",
        "d/f",
        "d/g",
    ]
    for bad in ("d/b\x00", "d/.."):
        with pytest.raises(FormatError):
            build({"name": "d/a", "type": "reg", "size": 0}, {"name": bad, "type": "reg"})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="ab/.", min_size=1, max_size=7), min_size=1, max_size=8))
def test_any_names_land_where_clean_name_puts_them(names: list[str]) -> None:
    from stargzfs.errors import UnsafePathError
    from stargzfs.formats.toc import clean_name

    try:
        cleaned = [clean_name(n) for n in names]
    except UnsafePathError:
        with pytest.raises(UnsafePathError):
            build(*({"name": n, "type": "dir"} for n in names))
        return
    index = build(*({"name": n, "type": "dir"} for n in names))
    want = {"/".join(c.split("/")[: i + 1]) for c in cleaned if c for i in range(c.count("/") + 1)}
    assert {p for p, _ in index.walk()} == want


def test_a_killed_builders_temp_file_is_removed_by_the_next_build(tmp_path: Any) -> None:
    """A live builder holds an flock on its temporary file (a pid says nothing across PID
    namespaces sharing a cache): only unlocked ones are removed."""
    import fcntl

    target = tmp_path / "i.sqlite"
    stale = tmp_path / "i.sqlite.1234.tmp"  # its builder was killed: nobody holds it
    stale.write_bytes(b"half an index")
    alive = tmp_path / "i.sqlite.1.tmp"  # a builder in another container, still running
    alive.write_bytes(b"in progress")
    other = tmp_path / "j.sqlite.1.tmp"  # another index's
    other.write_bytes(b"x")
    with open(alive, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        LayerIndex.build(
            toc({"name": "a", "type": "fifo"}),
            format="estargz",
            compression="gzip",
            toc_offset=1,
            path=target,
        )
    assert target.exists() and not stale.exists()
    assert alive.exists() and other.exists()
    assert not list(tmp_path.glob(f"i.sqlite.{os.getpid()}.tmp"))
