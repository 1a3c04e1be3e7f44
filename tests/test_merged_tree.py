"""The merged (overlay) view agrees with the reference fixtures' expected tree."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from layer_helpers import FIXTURES, blob_with_toc, index_of, index_of_bytes

from stargzfs.index import MergedTree
from stargzfs.reader import iter_file
from stargzfs.source import FileSource

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures is absent")


async def two_layer_tree() -> tuple[MergedTree, list[FileSource]]:
    sources = [FileSource(FIXTURES / "basic.esgz"), FileSource(FIXTURES / "whiteout-upper.esgz")]
    layers = [await index_of(s) for s in sources]
    return MergedTree(layers), sources


async def test_merged_view_matches_reference() -> None:
    exp = json.loads((FIXTURES / "whiteout-merged.json").read_text())
    tree, sources = await two_layer_tree()
    got = dict(tree.walk())
    assert sorted(got) == [e["path"] for e in exp["entries"]]
    for want in exp["entries"]:
        node = got[want["path"]]
        entry = node.entry
        assert ("hardlink" if entry.hardlink else entry.kind) == want["type"], want["path"]
        assert entry.mode == want["mode"], want["path"]
        assert (entry.uid, entry.gid) == (want["uid"], want["gid"])
        assert tree.nlink(node) == want["nlink"], want["path"]
        mtime = None if entry.mtime_ns is None else entry.mtime_ns // 1_000_000_000
        assert mtime == want["mtime"], want["path"]
        assert entry.linkname == want["linkname"]
        if want["sha256"] and entry.kind == "reg":
            digest = hashlib.sha256()
            async for piece in iter_file(sources[node.layer], tree.layer_of(node), entry):
                digest.update(piece)
            assert digest.hexdigest() == want["sha256"], want["path"]
    assert tree.nlink(tree.root) == exp["root"]["nlink"]


async def test_whiteouts_hide_and_inodes_are_stable() -> None:
    tree, _ = await two_layer_tree()
    etc = tree.resolve("etc")
    assert etc is not None
    assert tree.lookup(etc, "hostname") is None  # deleted by .wh.hostname
    assert tree.lookup(etc, ".wh.hostname") is None  # whiteouts are never shown
    assert tree.resolve("var/cache/demo/pkgcache.bin") is None  # deleted dir tree
    assert tree.resolve("srv/www/img") is None  # hidden by the opaque marker
    www = tree.resolve("srv/www/index.html")
    assert www is not None and www.layer == 1  # re-added in the upper layer
    motd = tree.resolve("etc/motd")
    assert motd is not None and motd.is_dir  # file replaced by a dir
    app = tree.resolve("opt/app")
    assert app is not None and app.entry.kind == "reg"  # dir replaced by a file
    assert tree.resolve("opt/app/README") is None
    # Same image, fresh tree: the same inode numbers, whatever the visiting order.
    again, _ = await two_layer_tree()
    paths = [p for p, _ in tree.walk()]
    for path in reversed(paths):
        a, b = tree.resolve(path), again.resolve(path)
        assert a is not None and b is not None and a.ino == b.ino
        assert again.get(a.ino).entry.id == a.entry.id
    hello = tree.resolve("usr/bin/hello")
    link = tree.resolve("usr/bin/hello-hardlink")
    assert hello is not None and link is not None and hello.ino == link.ino


def toc(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "entries": list(entries)}


async def test_opaque_root_and_same_layer_whiteout() -> None:
    lower = await index_of_bytes(
        blob_with_toc(toc({"name": "a/", "type": "dir"}, {"name": "b", "type": "fifo"}))
    )
    upper = await index_of_bytes(
        blob_with_toc(
            toc(
                {"name": ".wh..wh..opq", "type": "reg"},
                {"name": "c", "type": "fifo"},
                {"name": ".wh.c", "type": "reg"},  # same layer: c stays
            )
        )
    )
    tree = MergedTree([lower, upper])
    assert [p for p, _ in tree.walk()] == ["c"]


async def test_a_listing_bigger_than_the_children_cache_is_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A directory with more entries than the whole children cache holds (500,000) is listed
    uncached: cachetools raises ValueError for an item bigger than the cache (that was EIO)."""
    from stargzfs.index import merged

    monkeypatch.setattr(merged, "CHILDREN_CACHE_ENTRIES", 2)
    tree, _ = await two_layer_tree()
    root = tree.get(merged.MERGED_ROOT_INO)
    first = [n.entry.name for n in tree.children(root)]
    assert len(first) > 2
    assert [n.entry.name for n in tree.children(root)] == first
