"""The lookup trace a mount leaves for the next mount of its image (fuse/lookup_trace.py):
inodes become image paths, the file survives anything, and a replay never leaves the tree."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from layer_helpers import FIXTURES
from test_merged_tree import two_layer_tree

from stargzfs.fuse.lookup_trace import (
    LookupTrace,
    load_trace,
    replay,
    save_trace,
    trace_file,
    usable_entries,
)

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures is absent")


async def test_the_daemons_own_requests_are_saved_after_the_others() -> None:
    """Its warm-up and replay re-ask what it asked before: saved last, they are what the
    next replay's budget runs out on, and what nobody asks any more drifts out."""
    tree, _ = await two_layer_tree()
    trace = LookupTrace()
    trace.lookup(tree.root.ino, b"old", own=True)
    trace.replaying = True
    trace.readdir(tree.root.ino)  # (a listing carries no pid: replaying says whose it is)
    trace.replaying = False
    trace.lookup(tree.root.ino, b"new")
    trace.lookup(tree.root.ino, b"old")  # asked by a program too: in its place among theirs
    assert trace.entries(tree) == [("lookup", "new"), ("lookup", "old"), ("readdir", "")]


async def test_requests_become_image_paths_in_order_each_once() -> None:
    tree, _ = await two_layer_tree()
    doc = tree.resolve("usr/share/doc")
    hi = tree.resolve("usr/bin/hi")
    assert doc is not None and hi is not None
    trace = LookupTrace()
    trace.lookup(tree.root.ino, b"etc")
    trace.lookup(doc.ino, b"missing.txt")
    trace.lookup(doc.ino, "h\u00e9llo".encode("latin-1"))  # not UTF-8: kept as bytes
    trace.readlink(hi.ino)
    trace.readdir(tree.root.ino)
    trace.readdir(doc.ino)
    trace.lookup(doc.ino, b"missing.txt")  # asked again (after a timeout): once
    trace.lookup(999_999, b"x")  # an inode the tree never handed out: left out
    assert trace.entries(tree) == [
        ("lookup", "etc"),
        ("lookup", "usr/share/doc/missing.txt"),
        ("lookup", "usr/share/doc/h\udce9llo"),
        ("readlink", "usr/bin/hi"),
        ("readdir", ""),
        ("readdir", "usr/share/doc"),
    ]
    small = LookupTrace(limit=2)
    for name in (b"a", b"b", b"c"):
        small.lookup(tree.root.ino, name)
    assert [path for _, path in small.entries(tree)] == ["a", "b"]


def test_saving_removes_traces_of_images_not_mounted_for_a_month(tmp_path: Path) -> None:
    old, recent = (
        trace_file(str(tmp_path), ["sha256:old"]),
        trace_file(str(tmp_path), ["sha256:new"]),
    )
    save_trace(old, [("lookup", "a")])
    save_trace(recent, [("lookup", "b")])
    left_behind = old + ".999.tmp"  # a writer that died
    Path(left_behind).write_text("{")
    month_ago = time.time() - 31 * 86400
    for path in (old, left_behind):
        os.utime(path, (month_ago, month_ago))
    save_trace(trace_file(str(tmp_path), ["sha256:third"]), [("lookup", "c")])
    assert sorted(os.listdir(os.path.dirname(old))) == sorted(
        os.path.basename(trace_file(str(tmp_path), [d])) for d in ("sha256:new", "sha256:third")
    )


def test_save_and_load_keep_undecodable_names(tmp_path: Path) -> None:
    file = trace_file(str(tmp_path), ["sha256:aa", "sha256:bb"])
    assert file != trace_file(str(tmp_path), ["sha256:bb", "sha256:aa"])  # the stack, in order
    entries = [("lookup", "usr/h\udce9llo"), ("readdir", ""), ("readlink", "usr/bin/hi")]
    save_trace(file, entries)
    assert load_trace(file) == entries
    assert os.listdir(os.path.dirname(file)) == [os.path.basename(file)]  # no temp file left


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"version": 99, "entries": []}',
        b'{"version": 1}',
        b'{"version": 1, "entries": [["unlink", "etc"]]}',
        b'{"version": 1, "entries": [["lookup", 7]]}',
        b'{"version": 1, "entries": [["lookup"]]}',
        b'{"version": 1, "entries": "abc"}',
    ],
)
def test_a_malformed_trace_is_ignored(tmp_path: Path, content: bytes) -> None:
    file = tmp_path / "t.json"
    file.write_bytes(content)
    assert load_trace(str(file)) == []


def test_a_missing_or_huge_trace_is_ignored(tmp_path: Path) -> None:
    assert load_trace(str(tmp_path / "none.json")) == []
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"version": 1, "entries": [["lookup", "x" * 200]] * 50_000}))
    assert load_trace(str(big)) == []


async def test_only_paths_inside_the_tree_are_replayed() -> None:
    tree, _ = await two_layer_tree()
    good = [
        ("lookup", "etc/passwd"),
        ("lookup", "etc/no-such-file"),  # a missing name: the point of the trace
        ("readlink", "usr/bin/hi"),
        ("readdir", "usr/share/doc/sizes"),
        ("readdir", ""),
    ]
    bad = [
        ("lookup", "etc/localtime/zone"),  # through an absolute symlink: out of the mount
        ("lookup", "usr/lib/libdemo.so/x"),  # through a relative one
        ("lookup", "../etc/passwd"),
        ("lookup", "/etc/passwd"),
        ("lookup", "etc/./passwd"),
        ("lookup", "etc//passwd"),
        ("lookup", "etc/pass\0wd"),
        ("lookup", "etc/hostname/x"),  # whited out in the upper layer
        ("lookup", "srv/www/img/a.png"),  # hidden by an opaque directory
        ("lookup", "nowhere/x"),
        ("readlink", "usr/bin/hello"),  # not a symlink
        ("readlink", "usr/bin/none"),
        ("readdir", "etc/passwd"),  # not a directory
        ("readdir", "etc/localtime"),
    ]
    assert usable_entries(tree, good[:2] + bad + good[2:]) == good


def test_replay_asks_each_entry_and_stops_at_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    (tmp_path / "link").symlink_to("d")
    asked: list[str] = []
    real_lstat, real_readlink = os.lstat, os.readlink
    monkeypatch.setattr(
        os, "lstat", lambda p, **kw: asked.append(f"lstat {p}") or real_lstat(p, **kw)
    )
    monkeypatch.setattr(
        os, "readlink", lambda p, **kw: asked.append(f"readlink {p}") or real_readlink(p, **kw)
    )
    listed: list[int] = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda fd: listed.append(fd) or real_scandir(fd))
    entries = [
        ("lookup", "d/f"),
        ("lookup", "d/missing"),
        ("lookup", "d/\udce9"),  # an undecodable name: asked as its bytes
        ("lookup", "d/\ud800"),  # no file name at all: skipped, no error
        ("readlink", "link"),
        ("readdir", "d"),
        ("readdir", "link"),  # a symlink to a directory is never listed through
        ("readdir", ""),
    ]
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        progress = [0]
        assert replay(root, entries, float("inf"), progress) == len(entries) == progress[0]
        assert asked == [
            "lstat d/f",
            "lstat d/missing",
            "lstat d/\udce9",
            "lstat d/\ud800",
            "readlink link",
        ]
        assert len(listed) == 2  # "d" and the root, not "link"
        asked.clear()
        assert replay(root, entries, deadline=0.0) == 0
        assert asked == []
    finally:
        os.close(root)


def test_only_our_own_mount_root_is_one(tmp_path: Path) -> None:
    """The replay goes through the mount's root descriptor: a plain directory (the mount
    point once unmounted) or another filesystem's root (inode 1 too) is none."""
    from stargzfs.fuse.daemon import open_mount_root

    assert open_mount_root(str(tmp_path)) is None
    assert open_mount_root(str(tmp_path / "missing")) is None
    assert os.stat("/proc").st_ino == 1 and open_mount_root("/proc") is None


async def test_hostile_traces_cost_nothing_but_their_entries(tmp_path: Path) -> None:
    tree, _ = await two_layer_tree()
    started = time.monotonic()
    deep = "/".join(["d"] * 100_000)  # longer than any path: refused before any query
    assert usable_entries(tree, [("lookup", deep + "/x"), ("readdir", deep)]) == []
    within = "/".join(["d"] * 2000)  # 4,000 bytes: walked, stopping at the first miss
    assert usable_entries(tree, [("lookup", within + "/x")] * 64) == []
    assert usable_entries(tree, [("lookup", "etc/" + "n" * 256)]) == []  # NAME_MAX
    assert time.monotonic() - started < 2
    assert usable_entries(tree, [("lookup", "etc/\ud800/x"), ("readlink", "usr/bin/\ud800")]) == []
    undecodable = [("lookup", "etc/\udce9")]  # a probe for a non-UTF-8 name: replayed
    assert usable_entries(tree, undecodable) == undecodable
    nested = tmp_path / "nested.json"
    nested.write_text('{"version": 1, "entries": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert load_trace(str(nested)) == []
