"""``stargzfs pull`` against real registries: rootfs (checked against the shared expected
view), hostile layers, verification, OCI / docker-archive / dir layouts checked with skopeo,
the blob cache, resume, progress."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from harness import Registry
from harness.oci import LayerBlob, make_tar, write_oci_layout
from harness.proxy import RegistryProxy

from stargzfs.errors import DigestMismatchError, FormatError, UnsafePathError, UsageError
from stargzfs.pull.pull import PullOptions, pull
from stargzfs.registry import RegistryClient

REPO = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


# --------------------------------------------------------------------------- helpers


def opts(tmp_path: Path, **kw: Any) -> PullOptions:
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("quiet", True)
    return PullOptions(**kw)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(tar: bytes, compression: str = "gzip") -> LayerBlob:
    if compression == "gzip":
        return LayerBlob(gzip.compress(tar, mtime=0), sha(tar))
    if compression == "zstd":
        return LayerBlob(zstandard.ZstdCompressor().compress(tar), sha(tar), LAYER_ZSTD)
    return LayerBlob(tar, sha(tar), LAYER_TAR)


def build_tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def ti(name: str, kind: bytes = tarfile.REGTYPE, **kw: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = kw.pop("mtime", 1_700_000_000)
    info.mode = kw.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def push(registry: Registry, tmp: Path, name: str, layers: list[LayerBlob]) -> str:
    layout = write_oci_layout(tmp / f"layout-{name.replace('/', '_')}", layers)
    return registry.push_oci(layout, "v1", f"{name}:v1")


def tree(root: Path) -> dict[str, dict[str, Any]]:
    """Everything under root as comparable records."""
    out: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            rec: dict[str, Any] = {
                "mode": stat.S_IMODE(st.st_mode),
                "fmt": stat.S_IFMT(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "mtime": int(st.st_mtime),
                "ino": st.st_ino,
                "nlink": st.st_nlink,
            }
            if stat.S_ISLNK(st.st_mode):
                rec["link"] = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                rec["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
            out[rel] = rec
    return out


# --------------------------------------------------------------------------- rootfs


_TYPES = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "hardlink": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


async def test_rootfs_matches_expected_merged_view(
    fixture_image: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "rootfs"
    result = await pull(fixture_image, dest, opts(tmp_path))
    assert result.layers == 2
    expected = json.loads((fixtures_dir / "whiteout-merged.json").read_text())
    got = tree(dest)
    want = {e["path"]: e for e in expected["entries"]}
    if not IS_ROOT:
        want = {p: e for p, e in want.items() if e["type"] not in ("char", "block")}
    assert sorted(got) == sorted(want)
    for path, e in want.items():
        g = got[path]
        full = dest / path
        assert g["fmt"] == _TYPES[e["type"]], path
        if e["type"] != "symlink":
            assert g["mode"] == e["mode"], path
        if IS_ROOT:
            assert (g["uid"], g["gid"]) == (e["uid"], e["gid"]), path
        if e["mtime"] is not None:
            assert g["mtime"] == e["mtime"], path
        if e["type"] == "symlink":
            assert g["link"] == e["linkname"], path
        if e["sha256"] is not None:
            assert g["sha256"] == e["sha256"].removeprefix("sha256:"), path
        if e["type"] == "dir":
            assert g["nlink"] == e["nlink"], path
        if e["type"] in ("char", "block"):
            rdev = full.lstat().st_rdev
            assert (os.major(rdev), os.minor(rdev)) == (e["devmajor"], e["devminor"]), path
        for key, value in e["xattrs"].items():
            if key.startswith("security.") and not IS_ROOT:
                continue
            assert os.getxattr(full, key, follow_symlinks=False) == base64.b64decode(value)
    assert got["usr/bin/hello"]["ino"] == got["usr/bin/hello-hardlink"]["ino"]
    assert not (dest / "stargz.index.json").exists()
    assert not list(tmp_path.glob(".rootfs.*")), "staging left behind"


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
async def test_rootfs_gzip_zstd_uncompressed(
    registry: Registry, tmp_path: Path, compression: str
) -> None:
    big = os.urandom(3 << 20)
    lower = build_tar(
        [
            (ti("bin", tarfile.DIRTYPE), None),
            (ti("bin/tool", mode=0o4755), b"#!/bin/sh\n"),
            (ti("data"), big),
            (ti("gone"), b"x"),
            (ti("keep", tarfile.DIRTYPE, mode=0o700), None),
            (ti("keep/a"), b"a"),
            (ti("op", tarfile.DIRTYPE), None),
            (ti("op/old"), b"old"),
            (ti("link", tarfile.SYMTYPE, linkname="bin/tool"), None),
            (ti("hard", tarfile.LNKTYPE, linkname="bin/tool"), None),
        ]
    )
    upper = build_tar(
        [
            (ti(".wh.gone"), b""),
            (ti("op", tarfile.DIRTYPE, mode=0o750), None),
            (ti("op/.wh..wh..opq"), b""),
            (ti("op/new"), b"new"),
            (ti("keep/b", mtime=1_710_000_000), b"b"),
        ]
    )
    ref = push(
        registry,
        tmp_path,
        f"pull/comp-{compression}",
        [layer(lower, compression), layer(upper, compression)],
    )
    dest = tmp_path / "out"
    await pull(ref, dest, opts(tmp_path))
    assert (dest / "data").read_bytes() == big
    assert not (dest / "gone").exists()
    assert sorted(os.listdir(dest / "op")) == ["new"]
    assert stat.S_IMODE((dest / "op").stat().st_mode) == 0o750
    assert sorted(os.listdir(dest / "keep")) == ["a", "b"]
    assert stat.S_IMODE((dest / "keep").stat().st_mode) == 0o700
    assert stat.S_IMODE((dest / "bin/tool").stat().st_mode) == 0o4755
    assert os.readlink(dest / "link") == "bin/tool"
    assert (dest / "hard").stat().st_ino == (dest / "bin/tool").stat().st_ino
    assert int((dest / "bin/tool").stat().st_mtime) == 1_700_000_000
