"""The layer index on hand-written TOCs: hardlinks and nlink, owners, names, chunk lookup."""

from __future__ import annotations

import json
from typing import Any

from stargzfs.index import LayerIndex


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
