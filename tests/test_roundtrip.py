"""tar → our eStargz writer → our reader reproduces every file and attribute."""

from __future__ import annotations

import hashlib
import io
import tarfile
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layer_helpers import CASES, FIXTURES, expected, index_of
from test_layer_fixtures import view

from stargzfs.convert import convert_layer
from stargzfs.formats.layer import ANNOTATION_TOC_DIGEST
from stargzfs.index import LayerIndex
from stargzfs.reader import iter_file, read_file_range
from stargzfs.source import BytesSource


async def convert(tar_bytes: bytes, **options: Any) -> tuple[BytesSource, LayerIndex, Any]:
    out = io.BytesIO()
    result = convert_layer(io.BytesIO(tar_bytes), out, **options)
    source = BytesSource(out.getvalue())
    index = await index_of(source, {ANNOTATION_TOC_DIGEST: result.toc_digest})
    return source, index, result


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures is absent")
@pytest.mark.parametrize("case", sorted(c for c in CASES if c != "zstdchunked"))
@pytest.mark.parametrize("min_chunk_size", [0, 20000])
async def test_fixture_inputs_round_trip(case: str, min_chunk_size: int) -> None:
    exp = expected(case)
    tar_bytes = (FIXTURES / f"{case}.tar").read_bytes()
    source, index, _ = await convert(
        tar_bytes,
        chunk_size=exp["build_options"]["chunk_size"],
        prioritized=exp["build_options"]["prioritized_files"],
        min_chunk_size=min_chunk_size,
    )
    got = dict(index.walk())
    assert sorted(got) == [e["path"] for e in exp["entries"]]
    for want in exp["entries"]:
        entry = got[want["path"]]
        keys = view(index, entry).keys()
        assert view(index, entry) == {k: want[k] for k in keys}, want["path"]
        if want["sha256"] and entry.kind == "reg":
            digest = hashlib.sha256()
            async for piece in iter_file(source, index, entry):
                digest.update(piece)
            assert digest.hexdigest() == want["sha256"], want["path"]
    assert index.landmark == exp["landmark"]


names = st.text(
    alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=12,
).filter(lambda n: n not in (".", "..") and not n.startswith(".wh.") and n != "stargz.index.json")
CHUNK = 4096
sizes = st.sampled_from(
    [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 7]
) | st.integers(0, 5 * CHUNK)


# Names per id, "" included: a name may change for an id, or be absent from a tar header.
UNAMES = {0: ["root", ""], 1000: ["user", "alice", ""], 65534: ["nobody"]}
GNAMES = {0: ["root"], 100: ["users", ""], 1000: ["staff", "user"]}
devminor = st.sampled_from([0, 3, 255, 256, (1 << 20) - 1])


def owner(draw: st.DrawFn) -> dict[str, Any]:
    uid = draw(st.sampled_from(sorted(UNAMES)))
    gid = draw(st.sampled_from(sorted(GNAMES)))
    uname, gname = draw(st.sampled_from(UNAMES[uid])), draw(st.sampled_from(GNAMES[gid]))
    return {"uid": uid, "gid": gid, "uname": uname, "gname": gname}


def expected_names(items: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """Each entry's (uname, gname) as upstream's reader gives them: its own, else the latest
    one seen for its uid (gname: gid) in tar order."""
    users: dict[int, str] = {}
    groups: dict[int, str] = {}
    out = {}
    for item in items:
        if item["uname"]:
            users[item["uid"]] = item["uname"]
        if item["gname"]:
            groups[item["gid"]] = item["gname"]
        out[item["name"]] = (users.get(item["uid"], ""), groups.get(item["gid"], ""))
    return out


def expected_nlink(items: list[dict[str, Any]], item: dict[str, Any]) -> int:
    """Directories: 2 + subdirectories; anything else: the names sharing its inode."""
    if item["type"] == "dir":
        subdirs = [
            i for i in items if i["type"] == "dir" and i["name"].rpartition("/")[0] == item["name"]
        ]
        return 2 + len(subdirs)
    target = item["link"] if item["type"] == "hardlink" else item["name"]
    if item["type"] not in ("reg", "hardlink"):
        return 1
    return 1 + sum(1 for i in items if i["type"] == "hardlink" and i["link"] == target)


@st.composite
def trees(draw: st.DrawFn) -> list[dict[str, Any]]:
    dirs = ["d1", "d1/d2", "e"]
    items: list[dict[str, Any]] = [
        {"name": d, "type": "dir", "mode": 0o755, **owner(draw)} for d in dirs
    ]
    used = set(dirs)
    for _ in range(draw(st.integers(1, 12))):
        name = f"{draw(st.sampled_from(['', *[d + '/' for d in dirs]]))}{draw(names)}"
        if name in used:
            continue
        used.add(name)
        kind = draw(
            st.sampled_from(["reg", "reg", "reg", "symlink", "hardlink", "fifo", "char", "block"])
        )
        item: dict[str, Any] = {
            "name": name,
            "type": kind,
            "mode": draw(st.sampled_from([0o644, 0o755, 0o4755, 0o600, 0o1777])),
            "mtime": draw(st.integers(0, 2**33)),
            **owner(draw),
        }
        if kind == "reg":
            size = draw(sizes)
            item["data"] = draw(st.sampled_from([b"\x00", b"ab", bytes(range(256))])) * size
            item["data"] = item["data"][:size]
            if draw(st.booleans()):
                item["xattrs"] = {"user.k": draw(st.binary(min_size=1, max_size=10)).hex()}
        elif kind == "symlink":
            item["link"] = draw(st.sampled_from(["../x", "/abs/target", "a" * 150]))
        elif kind in ("char", "block"):
            item["dev"] = (draw(st.sampled_from([0, 1, 7, 259, 4095])), draw(devminor))
        elif kind == "hardlink":
            regs = [i["name"] for i in items if i["type"] == "reg"]
            if not regs:
                continue
            item["link"] = draw(st.sampled_from(regs))
        items.append(item)
    return items


def make_tar(items: list[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item in items:
            info = tarfile.TarInfo(item["name"])
            info.mode = item["mode"]
            info.uid, info.gid = item.get("uid", 0), item.get("gid", 0)
            info.uname, info.gname = item.get("uname", ""), item.get("gname", "")
            info.mtime = item.get("mtime", 0)
            data = None
            if item["type"] == "dir":
                info.type = tarfile.DIRTYPE
            elif item["type"] == "reg":
                info.size = len(item["data"])
                data = io.BytesIO(item["data"])
                if "xattrs" in item:
                    info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in item["xattrs"].items()}
            elif item["type"] == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, item["link"]
            elif item["type"] == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, item["link"]
            elif item["type"] == "fifo":
                info.type = tarfile.FIFOTYPE
            elif item["type"] in ("char", "block"):
                info.type = tarfile.CHRTYPE if item["type"] == "char" else tarfile.BLKTYPE
                info.devmajor, info.devminor = item["dev"]
            tar.addfile(info, data)
    return buf.getvalue()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=trees(), min_chunk=st.sampled_from([0, 0, 3000]))
async def test_generated_trees_round_trip(items: list[dict[str, Any]], min_chunk: int) -> None:
    source, index, _ = await convert(make_tar(items), chunk_size=CHUNK, min_chunk_size=min_chunk)
    names = expected_names(items)
    for item in items:
        entry = index.resolve(item["name"])
        assert entry is not None, item["name"]
        # A hardlink reports its target's attributes, as stat() on a real one does.
        attrs = item
        if item["type"] == "hardlink":
            attrs = next(i for i in items if i["name"] == item["link"])
        assert entry.mode == attrs["mode"], item["name"]
        if item["type"] == "reg" or item["type"] == "hardlink":
            target = (
                item
                if item["type"] == "reg"
                else next(i for i in items if i["name"] == item["link"])
            )
            data = target["data"]
            assert entry.size == len(data)
            whole = b"".join([p async for p in iter_file(source, index, entry)])
            assert whole == data, item["name"]
            if len(data) > 2:
                mid = len(data) // 2
                assert (
                    await read_file_range(source, index, entry, mid - 1, 3)
                    == data[mid - 1 : mid + 2]
                )
            if "xattrs" in target:
                assert {k: v.encode() for k, v in target["xattrs"].items()} == entry.xattrs
        elif item["type"] == "symlink":
            assert entry.kind == "symlink" and entry.linkname == item["link"]
        elif item["type"] == "fifo":
            assert entry.kind == "fifo"
        elif item["type"] in ("char", "block"):
            assert entry.kind == item["type"]
            assert (entry.devmajor, entry.devminor) == item["dev"], item["name"]
        assert entry.hardlink == (item["type"] == "hardlink")
        assert entry.nlink == expected_nlink(items, item), item["name"]
        assert (entry.uid, entry.gid) == (attrs["uid"], attrs["gid"]), item["name"]
        assert (entry.uname, entry.gname) == names[attrs["name"]], item["name"]
        if item["type"] != "dir":
            # Like upstream, the epoch itself is written as "no modtime".
            assert (entry.mtime_ns or 0) == attrs["mtime"] * 1_000_000_000
