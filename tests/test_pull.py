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
import re
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import zstandard
from gated_proxy import GatedProxy
from harness import Registry
from harness.oci import LayerBlob, make_tar, write_oci_layout
from harness.proxy import RegistryProxy

from stargzfs.cli.main import main
from stargzfs.errors import (
    DigestMismatchError,
    FormatError,
    NotFoundError,
    RegistryError,
    UnsafePathError,
    UsageError,
)
from stargzfs.pull.progress import human_bytes
from stargzfs.pull.pull import PullOptions, pull
from stargzfs.reference import Platform
from stargzfs.registry import RegistryClient, RetryPolicy

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


def check_view(dest: Path, expected: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``dest`` holds exactly the expected view of a fixture ``*.json`` (modes, owners when
    root, mtimes, link targets, contents, dir nlink, devices, xattrs)."""
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
    return got


async def test_rootfs_matches_expected_merged_view(
    fixture_image: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "rootfs"
    result = await pull(fixture_image, dest, opts(tmp_path))
    assert result.layers == 2
    got = check_view(dest, json.loads((fixtures_dir / "whiteout-merged.json").read_text()))
    assert got["usr/bin/hello"]["ino"] == got["usr/bin/hello-hardlink"]["ino"]
    assert not (dest / "stargz.index.json").exists()
    assert not list(tmp_path.glob(".rootfs.*")), "staging left behind"


async def test_rootfs_of_zstd_chunked_fixture(
    registry: Registry, fixtures_dir: Path, tmp_path: Path
) -> None:
    meta = json.loads((fixtures_dir / "zstdchunked.json").read_text())
    blob = LayerBlob(
        (fixtures_dir / "zstdchunked.zstdchunked").read_bytes(),
        meta["diff_id"],
        meta["media_type"],
        meta["annotations"],
    )
    ref = push(registry, tmp_path, "pull/zstdchunked", [blob])
    dest = tmp_path / "rootfs"
    await pull(ref, dest, opts(tmp_path))
    check_view(dest, meta)


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


# --------------------------------------------------------------------------- safety


def _nothing_outside(tmp_path: Path, outside: Path, dest: Path) -> None:
    assert list(outside.iterdir()) == [] or sorted(p.name for p in outside.iterdir()) == ["victim"]
    if (outside / "victim").exists():
        assert (outside / "victim").read_bytes() == b"original"
    assert not dest.exists()
    assert not list(tmp_path.glob(".out.*")), "staging left behind"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "victim").write_bytes(b"original")
    return d


def _hostile_cases(
    outside: Path,
) -> dict[str, tuple[list[list[tuple[tarfile.TarInfo, bytes | None]]], str]]:
    nul = ti("a")
    nul.pax_headers = {"path": "evil\x00name"}
    return {
        "dotdot": ([[(ti("../evil"), b"x")]], "../evil"),
        "inner-dotdot": ([[(ti("a/../../evil"), b"x")]], "a/../../evil"),
        "nul": ([[(nul, b"x")]], "evil\\x00name"),
        "symlink-then-write-earlier-layer": (
            [
                [(ti("esc", tarfile.SYMTYPE, linkname=str(outside)), None)],
                [(ti("esc/victim"), b"pwned")],
            ],
            "esc/victim",
        ),
        "relative-symlink-same-layer": (
            [
                [
                    (ti("d", tarfile.DIRTYPE), None),
                    (ti("d/esc", tarfile.SYMTYPE, linkname="../../outside"), None),
                    (ti("d/esc/victim"), b"pwned"),
                ]
            ],
            "d/esc/victim",
        ),
        "hardlink-outside": (
            [[(ti("h", tarfile.LNKTYPE, linkname="../outside/victim"), None)]],
            "../outside/victim",
        ),
        "hardlink-absolute": (
            [[(ti("h", tarfile.LNKTYPE, linkname=str(outside / "victim")), None)]],
            "h",
        ),
        "hardlink-missing": (
            [[(ti("h", tarfile.LNKTYPE, linkname="not/there"), None)]],
            "not/there",
        ),
        "whiteout-dotdot": ([[(ti("x", tarfile.DIRTYPE), None), (ti("x/.wh.."), b"")]], "x/.wh.."),
    }


@pytest.mark.parametrize(
    "case",
    [
        "dotdot",
        "inner-dotdot",
        "nul",
        "symlink-then-write-earlier-layer",
        "relative-symlink-same-layer",
        "hardlink-outside",
        "hardlink-absolute",
        "hardlink-missing",
        "whiteout-dotdot",
    ],
)
async def test_hostile_layers_are_refused(
    registry: Registry, tmp_path: Path, outside: Path, case: str
) -> None:
    layers, named = _hostile_cases(outside)[case]
    ref = push(registry, tmp_path, f"pull/hostile-{case}", [layer(build_tar(x)) for x in layers])
    dest = tmp_path / "out"
    with pytest.raises((UnsafePathError, FormatError)) as info:
        await pull(ref, dest, opts(tmp_path))
    assert named in str(info.value)
    _nothing_outside(tmp_path, outside, dest)


async def test_absolute_names_are_taken_relative_to_dest(
    registry: Registry, tmp_path: Path, outside: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Like GNU tar and containerd: a leading '/' is removed (with a warning naming the
    entry), so the file lands inside DEST, never at the absolute path."""
    evil = str(outside / "victim")
    ref = push(registry, tmp_path, "pull/absolute", [layer(build_tar([(ti(evil), b"x")]))])
    dest = tmp_path / "out"
    with caplog.at_level("WARNING"):
        await pull(ref, dest, opts(tmp_path))
    assert (dest / evil.lstrip("/")).read_bytes() == b"x"
    assert (outside / "victim").read_bytes() == b"original"
    assert any(evil in r.getMessage() and "leading '/'" in r.getMessage() for r in caplog.records)


async def test_symlink_replaced_by_file_is_not_followed(
    registry: Registry, tmp_path: Path, outside: Path
) -> None:
    """A later layer's regular file over an earlier layer's symlink replaces the link."""
    lower = build_tar([(ti("f", tarfile.SYMTYPE, linkname=str(outside / "victim")), None)])
    upper = build_tar([(ti("f"), b"new"), (ti("g", tarfile.SYMTYPE, linkname="/"), None)])
    ref = push(registry, tmp_path, "pull/replace-link", [layer(lower), layer(upper)])
    dest = tmp_path / "out"
    await pull(ref, dest, opts(tmp_path))
    assert (dest / "f").read_bytes() == b"new" and not (dest / "f").is_symlink()
    assert (outside / "victim").read_bytes() == b"original"


def test_cli_hostile_layer_exit_code(registry: Registry, tmp_path: Path, outside: Path) -> None:
    ref = push(registry, tmp_path, "pull/hostile-cli", [layer(build_tar([(ti("../x"), b"x")]))])
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "stargzfs",
            "pull",
            ref,
            str(tmp_path / "out"),
            "-q",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert res.returncode == 6, res.stderr
    assert "../x" in res.stderr
    _nothing_outside(tmp_path, outside, tmp_path / "out")


# --------------------------------------------------------------------------- verification


async def test_corrupt_blob_is_exit_6_and_discarded(
    registry: Registry, registry_proxy: RegistryProxy, tmp_path: Path
) -> None:
    data = os.urandom(200_000)
    blob = layer(make_tar({"f": data}))
    ref = push(registry, tmp_path, "pull/corrupt", [blob])
    registry_proxy.corrupt_blob(blob.digest, 5000)
    proxied = ref.replace(registry.host, registry_proxy.host)
    dest = tmp_path / "out"
    with pytest.raises(DigestMismatchError) as info:
        await pull(proxied, dest, opts(tmp_path))
    assert info.value.exit_code == 6
    assert not dest.exists()
    hexd = blob.digest.split(":")[1]
    assert not (tmp_path / "cache/blobs/sha256" / hexd).exists()
    assert not (tmp_path / "cache/blobs/sha256" / f"{hexd}.partial").exists()
    assert not list(tmp_path.glob(".out.*"))


async def test_dest_conflicts(fixture_image: str, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("keep")
    with pytest.raises(UsageError, match="not empty"):
        await pull(fixture_image, dest, opts(tmp_path))
    assert (dest / "old").read_text() == "keep"
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UsageError):
        await pull(fixture_image, afile, opts(tmp_path))
    await pull(fixture_image, dest, opts(tmp_path, force=True))
    assert not (dest / "old").exists() and (dest / "usr/bin/hello").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    await pull(fixture_image, empty, opts(tmp_path))
    assert (empty / "usr/bin/hello").is_file()


def test_cli_force_over_files_and_docker_archive_conflicts(
    fixture_image: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file or a symlink at DEST is refused (exit 2, left alone) unless --force, which
    replaces it (a symlink is replaced, never followed). docker-archive refuses an existing
    file unless --force and a directory even with it."""
    base = ["pull", fixture_image, "-q", "--cache-dir", str(tmp_path / "cache")]
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main([*base, str(afile)]) == 2
    assert "--force" in capsys.readouterr().err and afile.read_text() == "x"
    assert main([*base, str(afile), "--force"]) == 0
    assert afile.is_dir() and (afile / "usr/bin/hello").is_file()
    target = tmp_path / "target"
    target.mkdir()
    (target / "mine").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert main([*base, str(link)]) == 2
    assert main([*base, str(link), "--force"]) == 0
    assert not link.is_symlink() and (link / "usr/bin/hello").is_file()
    assert sorted(os.listdir(target)) == ["mine"]
    # docker-archive
    archive = tmp_path / "image.tar"
    archive.write_bytes(b"old")
    assert main([*base, str(archive), "--format", "docker-archive"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert archive.read_bytes() == b"old"
    assert main([*base, str(archive), "--format", "docker-archive", "--force"]) == 0
    with tarfile.open(archive) as tar:
        listing = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert listing[0]["RepoTags"] == [fixture_image]
    adir = tmp_path / "adir"
    adir.mkdir()
    assert main([*base, str(adir), "--format", "docker-archive", "--force"]) == 2
    assert "is a directory" in capsys.readouterr().err and list(adir.iterdir()) == []
    assert not [p.name for p in tmp_path.iterdir() if ".stargzfs-" in p.name]


# --------------------------------------------------------------------------- layouts


def skopeo(*args: str) -> str:
    res = subprocess.run(
        ["skopeo", "--insecure-policy", *args], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


async def test_oci_layout_skopeo_accepts_it(
    fixture_image: str, oci_layout: Path, registry: Registry, tmp_path: Path
) -> None:
    dest = tmp_path / "oci"
    await pull(fixture_image, dest, opts(tmp_path, format="oci"))
    index = json.loads((dest / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    assert json.loads((dest / "oci-layout").read_text())["imageLayoutVersion"] == "1.0.0"
    # every blob byte-identical to the source layout's (digests preserved)
    for blob in (dest / "blobs/sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
        assert blob.read_bytes() == (oci_layout / "blobs/sha256" / blob.name).read_bytes()
    ours = json.loads(skopeo("inspect", f"oci:{dest}:v1"))
    theirs = json.loads(skopeo("inspect", f"oci:{oci_layout}:v1"))
    assert ours["Layers"] == theirs["Layers"] and ours["Digest"] == theirs["Digest"]
    target = registry.ref("pull/oci-roundtrip:v1")
    skopeo(
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        f"oci:{dest}:v1",
        f"docker://{target}",
    )
    again = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{target}"))
    assert again["Digest"] == theirs["Digest"]


async def test_docker_archive_skopeo_reads_it(fixture_image: str, tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    await pull(fixture_image, archive, opts(tmp_path, format="docker-archive"))
    src_config = json.loads(
        skopeo("inspect", "--config", "--tls-verify=false", f"docker://{fixture_image}")
    )
    out = tmp_path / "from-archive"
    skopeo("copy", "--quiet", f"docker-archive:{archive}", f"oci:{out}:t")
    manifest_desc = json.loads((out / "index.json").read_text())["manifests"][0]
    manifest = json.loads(
        (out / "blobs/sha256" / manifest_desc["digest"].split(":")[1]).read_text()
    )
    config = json.loads(
        (out / "blobs/sha256" / manifest["config"]["digest"].split(":")[1]).read_text()
    )
    assert config["rootfs"]["diff_ids"] == src_config["rootfs"]["diff_ids"]
    assert config == src_config
    with tarfile.open(archive) as tar:
        listing = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert listing[0]["RepoTags"] == [fixture_image]
    # layers stored uncompressed, named by diff_id
    assert [f"sha256:{name[:-4]}" for name in listing[0]["Layers"]] == config["rootfs"]["diff_ids"]


async def test_dir_layout_matches_skopeo(fixture_image: str, tmp_path: Path) -> None:
    dest = tmp_path / "dir"
    await pull(fixture_image, dest, opts(tmp_path, format="dir"))
    theirs = tmp_path / "skopeo-dir"
    skopeo(
        "copy", "--quiet", "--src-tls-verify=false", f"docker://{fixture_image}", f"dir:{theirs}"
    )
    assert sorted(os.listdir(dest)) == sorted(os.listdir(theirs))
    for name in os.listdir(theirs):
        assert (dest / name).read_bytes() == (theirs / name).read_bytes(), name
    skopeo("copy", "--quiet", f"dir:{dest}", f"oci:{tmp_path / 'o'}:t")


def _index_layout(root: Path) -> Path:
    """An OCI layout whose tag ``v1`` is an index of linux/amd64 and linux/arm64 images."""
    blobs = root / "blobs/sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
        return {"digest": sha(data), "size": len(data)}

    entries = []
    for arch in ("amd64", "arm64"):
        tar = make_tar({"arch": arch.encode()})
        lay = layer(tar)
        config = json.dumps(
            {
                "architecture": arch,
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [lay.diff_id]},
            }
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(config)},
                "layers": [{"mediaType": lay.media_type, **put(lay.data)}],
            }
        ).encode()
        entries.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **put(manifest),
                "platform": {"os": "linux", "architecture": arch},
            }
        )
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        }
    ).encode()
    top = {
        "mediaType": "application/vnd.oci.image.index.v1+json",
        **put(index),
        "annotations": {"org.opencontainers.image.ref.name": "v1"},
    }
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return root


async def test_platforms(registry: Registry, tmp_path: Path) -> None:
    layout = _index_layout(tmp_path / "multi")
    ref = registry.ref("pull/multi:v1")
    skopeo(
        "copy",
        "--quiet",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        f"oci:{layout}:v1",
        f"docker://{ref}",
    )
    arm = tmp_path / "arm"
    await pull(ref, arm, opts(tmp_path, platform=Platform.parse("linux/arm64")))
    assert (arm / "arch").read_bytes() == b"arm64"
    with pytest.raises(NotFoundError, match="linux/amd64, linux/arm64"):
        await pull(ref, tmp_path / "s390", opts(tmp_path, platform=Platform.parse("linux/s390x")))
    dest = tmp_path / "all"
    await pull(ref, dest, opts(tmp_path, format="oci", all_platforms=True))
    raw = json.loads(skopeo("inspect", "--raw", f"oci:{dest}:v1"))
    assert len(raw["manifests"]) == 2
    skopeo("copy", "--quiet", "--all", f"oci:{dest}:v1", f"oci:{tmp_path / 'copy'}:v1")
    for blob in (layout / "blobs/sha256").iterdir():
        assert (dest / "blobs/sha256" / blob.name).read_bytes() == blob.read_bytes()
    with pytest.raises(UsageError):
        await pull(ref, tmp_path / "x", opts(tmp_path, all_platforms=True))


# --------------------------------------------------------------------------- cache and resume

BIG = os.urandom(6 << 20)


@pytest.fixture(scope="module")
def big_ref(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, LayerBlob]:
    blob = layer(make_tar({"big.bin": BIG, "small": b"s"}))
    ref = push(registry, tmp_path_factory.mktemp("big"), "pull/big", [blob])
    return ref, blob


async def test_second_pull_hits_the_cache(
    big_ref: tuple[str, LayerBlob],
    registry: Registry,
    registry_proxy: RegistryProxy,
    tmp_path: Path,
) -> None:
    ref = big_ref[0].replace(registry.host, registry_proxy.host)
    first = await pull(ref, tmp_path / "a", opts(tmp_path))
    assert first.stats.cache_hits == 0 and first.stats.bytes_downloaded == big_ref[1].data.__len__()
    registry_proxy.reset_counters()
    out = io.StringIO()
    second = await pull(ref, tmp_path / "b", opts(tmp_path, quiet=False, progress_stream=out))
    assert second.stats.cache_hits == 1 and second.stats.bytes_downloaded == 0
    assert second.stats.bytes_saved == len(big_ref[1].data)
    assert registry_proxy.bytes_sent < 10_000  # manifest and config only
    assert "cache hits: 1" in out.getvalue() and "bytes saved: 6.0 MiB" in out.getvalue()
    assert (tmp_path / "b/big.bin").read_bytes() == BIG
    # --no-cache keeps nothing
    registry_proxy.reset_counters()
    await pull(ref, tmp_path / "c", opts(tmp_path, cache_dir=tmp_path / "c2", no_cache=True))
    assert registry_proxy.bytes_sent >= len(big_ref[1].data)
    assert not (tmp_path / "c2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_other_image_sharing_a_layer_reuses_the_cached_blob(
    registry: Registry, gated: GatedProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two images in different repositories share their base layer: pulling the second
    one after the first takes the base from the cache (not from the registry) and says so."""
    base = layer(make_tar({"base.bin": os.urandom(700_000)}))
    top_a, top_b = layer(make_tar({"who": b"a"})), layer(make_tar({"who": b"b"}))
    ref_a = push(registry, tmp_path, "pull/share-a", [base, top_a])
    ref_b = push(registry, tmp_path, "pull/share-b", [base, top_b])
    cache = str(tmp_path / "cache")
    a = ref_a.replace(registry.host, gated.host)
    assert main(["pull", a, str(tmp_path / "a"), "--cache-dir", cache]) == 0
    assert "cache hits: 0, bytes saved: 0 B" in capsys.readouterr().err
    assert gated.bytes_sent[base.digest] == len(base.data)
    gated.reset()
    b = ref_b.replace(registry.host, gated.host)
    assert main(["pull", b, str(tmp_path / "b"), "--cache-dir", cache]) == 0
    err = capsys.readouterr().err
    summary = err.splitlines()[-1]
    assert summary.startswith("pulled 2 layer(s)"), err
    assert f"cache hits: 1, bytes saved: {human_bytes(len(base.data))}" in summary
    assert f"downloaded {human_bytes(len(top_b.data))}" in summary
    assert gated.bytes_sent[base.digest] == 0
    assert gated.bytes_sent[top_b.digest] == len(top_b.data)
    assert (tmp_path / "b/who").read_bytes() == b"b"
    assert (tmp_path / "b/base.bin").read_bytes() == (tmp_path / "a/base.bin").read_bytes()


async def test_resume_from_partial(
    big_ref: tuple[str, LayerBlob],
    registry: Registry,
    registry_proxy: RegistryProxy,
    tmp_path: Path,
) -> None:
    ref = big_ref[0].replace(registry.host, registry_proxy.host)
    blob = big_ref[1]
    blobs = tmp_path / "cache/blobs/sha256"
    blobs.mkdir(parents=True)
    partial = blobs / (blob.digest.split(":")[1] + ".partial")
    have = len(blob.data) * 2 // 3
    partial.write_bytes(blob.data[:have])
    registry_proxy.reset_counters()
    result = await pull(ref, tmp_path / "out", opts(tmp_path))
    assert result.stats.bytes_resumed == have
    assert result.stats.bytes_downloaded == len(blob.data) - have
    assert registry_proxy.bytes_sent < len(blob.data) - have + 10_000
    assert any(r for r in registry_proxy.requests if r[2] == f"bytes={have}-")
    assert (tmp_path / "out/big.bin").read_bytes() == BIG
    assert not partial.exists() and (blobs / blob.digest.split(":")[1]).exists()


async def test_corrupt_partial_is_discarded_then_retried(
    big_ref: tuple[str, LayerBlob], tmp_path: Path
) -> None:
    blob = big_ref[1]
    blobs = tmp_path / "cache/blobs/sha256"
    blobs.mkdir(parents=True)
    partial = blobs / (blob.digest.split(":")[1] + ".partial")
    partial.write_bytes(b"garbage" * 1000)
    with pytest.raises(DigestMismatchError):
        await pull(big_ref[0], tmp_path / "out", opts(tmp_path))
    assert not partial.exists() and not (tmp_path / "out").exists()
    await pull(big_ref[0], tmp_path / "out", opts(tmp_path))
    assert (tmp_path / "out/big.bin").read_bytes() == BIG


def test_progress_lines_and_quiet(big_ref: tuple[str, LayerBlob], tmp_path: Path) -> None:
    base = [sys.executable, "-m", "stargzfs", "pull", big_ref[0], "--no-cache"]
    res = subprocess.run(
        [*base, str(tmp_path / "a")], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert any(line.startswith("done: 1/1 blobs, 6.0 MiB of 6.0 MiB") for line in lines), lines
    assert "\r" not in res.stderr and "\x1b" not in res.stderr
    assert lines[-1].startswith("pulled 1 layer(s)")
    res = subprocess.run(
        [*base, "-q", str(tmp_path / "b")], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert res.returncode == 0 and res.stderr == "" and res.stdout == ""


async def test_segmented_download(
    registry: Registry, registry_proxy: RegistryProxy, tmp_path: Path
) -> None:
    data = os.urandom(18 << 20)
    blob = layer(make_tar({"seg.bin": data}), "none")
    ref = push(registry, tmp_path, "pull/segmented", [blob]).replace(
        registry.host, registry_proxy.host
    )
    registry_proxy.reset_counters()
    await pull(ref, tmp_path / "out", opts(tmp_path, connections=4))
    assert (tmp_path / "out/seg.bin").read_bytes() == data
    ranges = [r[2] for r in registry_proxy.requests if r[2] and blob.digest in r[1]]
    assert len(ranges) >= 4 and len(set(ranges)) == len(ranges)
    assert registry_proxy.bytes_sent < len(blob.data) + 10_000


def _apply_children() -> list[int]:
    """Live ``stargzfs.pull.apply_process`` processes (whoever their parent is now)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"stargzfs.pull.apply_process" in cmd and state != "Z":
            found.append(int(pid))
    return found


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_pull_resumes(
    registry: Registry, registry_proxy: RegistryProxy, tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGKILL or Ctrl-C mid-download (connections cut every 1 MiB make it slow), then run
    again: the second run asks only for the rest."""
    data = os.urandom(8 << 20)
    blob = layer(make_tar({"k.bin": data, "sig": sig.name.encode()}), "none")
    ref = push(registry, tmp_path, f"pull/killed-{sig.name.lower()}", [blob]).replace(
        registry.host, registry_proxy.host
    )
    partial = tmp_path / "cache/blobs/sha256" / (blob.digest.split(":")[1] + ".partial")
    cmd = [
        sys.executable,
        "-m",
        "stargzfs",
        "pull",
        ref,
        "-q",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    registry_proxy.drop_next(count=1000, after=1 << 20)
    proc = subprocess.Popen([*cmd, str(tmp_path / "a")], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if partial.exists() and partial.stat().st_size >= 1 << 20:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the download never started")
    finally:
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
    have = partial.stat().st_size
    assert 0 < have < len(blob.data)
    assert not (tmp_path / "a").exists()
    # the layer-applying child goes too (killed by its parent, or on its own when orphaned)
    deadline = time.monotonic() + 10
    while _apply_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _apply_children() == []
    if sig == signal.SIGINT:
        assert rc == 130
        assert not list(tmp_path.glob(".a.stargzfs-*"))  # cleaned up on the way out
    else:
        assert list(tmp_path.glob(".a.stargzfs-stage-*"))  # left behind by the killed run
    registry_proxy.drop_next(count=0)
    registry_proxy.reset_counters()
    res = subprocess.run([*cmd, str(tmp_path / "b")], cwd=REPO, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "b/k.bin").read_bytes() == data
    # a later pull to the killed run's DEST removes its stale staging
    subprocess.run([*cmd, str(tmp_path / "a")], cwd=REPO, check=True, timeout=60)
    assert not list(tmp_path.glob(".a.stargzfs-*"))
    assert registry_proxy.bytes_sent <= len(blob.data) - have + 10_000
    assert any(r[2] == f"bytes={have}-" for r in registry_proxy.requests)


@pytest.mark.parametrize("kind", ["basic", "token"])
async def test_pull_with_credentials(
    registry_basic: Registry,
    registry_token: Registry,
    oci_layout: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    reg = registry_basic if kind == "basic" else registry_token
    assert reg.authfile is not None
    ref = reg.push_oci(oci_layout, "v1", f"pull/auth-{kind}:v1")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(reg.authfile))
    dest = tmp_path / "oci"
    await pull(ref, dest, opts(tmp_path, format="oci"))
    skopeo("inspect", f"oci:{dest}:v1")


@pytest.mark.parametrize("fmt", ["rootfs", "oci"])
async def test_damaged_cache_blob_is_caught_and_removed(
    big_ref: tuple[str, LayerBlob], tmp_path: Path, fmt: str
) -> None:
    ref, blob = big_ref
    await pull(ref, tmp_path / "first", opts(tmp_path, format=fmt))
    cached = tmp_path / "cache/blobs/sha256" / blob.digest.split(":")[1]
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0x55
    cached.chmod(0o644)
    cached.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError, match="cached copy"):
        await pull(ref, tmp_path / "second", opts(tmp_path, format=fmt))
    assert not cached.exists() and not (tmp_path / "second").exists()
    again = await pull(ref, tmp_path / "third", opts(tmp_path, format=fmt))
    assert again.stats.cache_hits == 0 and cached.read_bytes() == blob.data


def test_cli_missing_parent_is_a_usage_error(fixture_image: str, tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "stargzfs", "pull", fixture_image, str(parent / "missing/x"), "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert res.returncode == 2 and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr


async def test_resume_when_registry_ignores_ranges(
    big_ref: tuple[str, LayerBlob],
    registry: Registry,
    registry_proxy: RegistryProxy,
    tmp_path: Path,
) -> None:
    """A 200 to the resume's Range request: the prefix is skipped, the result still right."""
    ref = big_ref[0].replace(registry.host, registry_proxy.host)
    blob = big_ref[1]
    blobs = tmp_path / "cache/blobs/sha256"
    blobs.mkdir(parents=True)
    (blobs / (blob.digest.split(":")[1] + ".partial")).write_bytes(blob.data[:100_000])
    registry_proxy.ranges = "ignore"
    result = await pull(ref, tmp_path / "out", opts(tmp_path))
    assert result.stats.bytes_resumed == 100_000
    assert (tmp_path / "out/big.bin").read_bytes() == BIG


async def test_registry_outage_is_exit_5_and_leaves_nothing(
    registry_factory: Callable[..., Registry], oci_layout: Path, tmp_path: Path
) -> None:
    reg = registry_factory()
    ref = reg.push_oci(oci_layout, "v1", "pull/outage:v1")
    reg.stop()
    fast = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02)
    async with RegistryClient(retry=fast) as client:
        with pytest.raises(RegistryError) as info:
            await pull(ref, tmp_path / "out", opts(tmp_path), client=client)
    assert info.value.exit_code == 5
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


async def test_corrupt_big_layer_followed_by_child_is_exit_6(
    big_ref: tuple[str, LayerBlob],
    registry: Registry,
    registry_proxy: RegistryProxy,
    tmp_path: Path,
) -> None:
    """A big gzip layer is decompressed by a child following the download; the tampered
    byte breaks the gzip stream first, yet the digest mismatch is what gets reported."""
    ref, blob = big_ref
    registry_proxy.corrupt_blob(blob.digest, 3 << 20)
    with trio.fail_after(60):
        with pytest.raises(DigestMismatchError):
            await pull(
                ref.replace(registry.host, registry_proxy.host), tmp_path / "out", opts(tmp_path)
            )
    hexd = blob.digest.split(":")[1]
    assert not list((tmp_path / "cache/blobs/sha256").glob(hexd + "*"))
    assert not (tmp_path / "out").exists()


async def test_missing_layer_blob_fails_fast(
    registry_factory: Callable[..., Registry], tmp_path: Path
) -> None:
    reg = registry_factory()
    blobs = [layer(make_tar({"a": b"a" * 100})), layer(make_tar({"b": b"b" * 100}))]
    ref = push(reg, tmp_path, "pull/missing", blobs)
    for data in reg.data_dir.rglob("data"):
        if data.parent.name == blobs[1].digest.split(":")[1]:
            data.unlink()
    fast = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02)
    async with RegistryClient(retry=fast) as client:
        with trio.fail_after(10):
            with pytest.raises((NotFoundError, RegistryError)) as info:
                await pull(ref, tmp_path / "out", opts(tmp_path), client=client)
    assert blobs[1].digest in str(info.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


# --------------------------------------------------------------------------- parallelism


@pytest.fixture
def gated(registry: Registry) -> Iterator[GatedProxy]:
    """A proxy that counts requests in flight and can hold a blob's bytes back."""
    with GatedProxy(registry.host) as proxy:
        yield proxy


@pytest.mark.parametrize("size", [1_500_000, 3 << 20], ids=["in-thread", "child-process"])
async def test_extraction_overlaps_the_download(
    registry: Registry, gated: GatedProxy, tmp_path: Path, size: int
) -> None:
    """The proxy holds back the last 200 kB of the first layer: its first file must already
    be in the staging tree (decompressed and untarred from what has arrived) while the
    download is still unfinished. Small layers are inflated in a thread, big ones by a
    child process following the file."""
    rest = os.urandom(size)
    lower = layer(build_tar([(ti("early"), b"first entry"), (ti("rest.bin"), rest)]))
    upper = layer(make_tar({"early": b"replaced"}))
    ref = push(registry, tmp_path, f"pull/overlap-{size}", [lower, upper])
    gated.hold[lower.digest] = len(lower.data) - 200_000
    seen: list[int] = []

    async def watch() -> None:
        try:
            with trio.fail_after(10):
                while not list(tmp_path.glob(".out.stargzfs-stage-*/early")):
                    await trio.sleep(0.005)
            with gated.lock:
                seen.append(gated.bytes_sent[lower.digest])
                assert gated.held == 1  # the tail is still waiting at the proxy
        finally:
            gated.release.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await pull(ref.replace(registry.host, gated.host), tmp_path / "out", opts(tmp_path))
    assert seen and seen[0] <= len(lower.data) - 200_000
    assert gated.bytes_sent[lower.digest] == len(lower.data)
    assert (tmp_path / "out/early").read_bytes() == b"replaced"  # still applied in order
    assert (tmp_path / "out/rest.bin").read_bytes() == rest


@pytest.mark.parametrize("jobs", [1, 3])
def test_layers_download_in_parallel_with_jobs(
    registry: Registry, gated: GatedProxy, tmp_path: Path, jobs: int
) -> None:
    """Each blob GET takes 0.3 s at the proxy: with --jobs 3 the three layers' downloads
    overlap there, with --jobs 1 they never do."""
    blobs = [layer(make_tar({f"l{i}": os.urandom(300_000)})) for i in range(3)]
    ref = push(registry, tmp_path, f"pull/jobs-{jobs}", blobs)
    gated.delay["blob"] = 0.3
    argv = ["pull", ref.replace(registry.host, gated.host), str(tmp_path / "out"), "-q"]
    assert main([*argv, "--jobs", str(jobs), "--cache-dir", str(tmp_path / "cache")]) == 0
    gets = [r for r in gated.requests if r[0] == "GET" and "/blobs/" in r[1]]
    assert len(gets) == 4  # the config, then the layers
    if jobs == 1:
        assert gated.max_in_flight["blob"] == 1
    else:
        assert gated.max_in_flight["blob"] >= 2
    for i in range(3):
        assert (tmp_path / f"out/l{i}").stat().st_size == 300_000


def test_cli_segmented_download_concurrent_and_resumed_after_kill(
    registry: Registry, gated: GatedProxy, tmp_path: Path
) -> None:
    """``--connections 4``: the proxy passes the blob's first two 4 MiB pieces and holds
    everything after them, so several range requests wait there at once; the process is
    SIGKILLed with exactly those two pieces in the partial file. The re-run (segmented
    again: 18 MiB are left) asks only for the rest, from 8 MiB on."""
    seg = 4 << 20
    data = os.urandom((26 << 20) - 4096)
    blob = layer(make_tar({"seg.bin": data}), "none")
    ref = push(registry, tmp_path, "pull/segmented-killed", [blob])
    ref = ref.replace(registry.host, gated.host)
    partial = tmp_path / "cache/blobs/sha256" / (blob.digest.split(":")[1] + ".partial")
    cmd = [sys.executable, "-m", "stargzfs", "pull", ref, "-q", "--connections", "4"]
    cmd += ["--cache-dir", str(tmp_path / "cache")]
    gated.hold[blob.digest] = 2 * seg
    proc = subprocess.Popen([*cmd, str(tmp_path / "a")], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not (gated.held >= 2 and partial.exists() and partial.stat().st_size == 2 * seg):
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"no segmented download held at 8 MiB (held: {gated.held})")
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert gated.max_in_flight["range"] >= 2
    first = [r[2] for r in gated.requests if r[0] == "GET" and blob.digest in r[1]]
    assert all(first) and len(first) >= 4  # every request a range, at least one per connection
    assert partial.stat().st_size == 2 * seg
    assert not (tmp_path / "a").exists()
    gated.reset()
    gated.delay["range"] = 0.2  # make the re-run's requests overlap visibly too
    res = subprocess.run([*cmd, str(tmp_path / "b")], cwd=REPO, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "b/seg.bin").read_bytes() == data
    assert gated.bytes_sent[blob.digest] == len(blob.data) - 2 * seg
    ranges = [r[2] for r in gated.requests if r[0] == "GET" and blob.digest in r[1]]
    starts = []
    for r in ranges:
        m = re.fullmatch(r"bytes=(\d+)-\d*", r or "")
        assert m is not None, r
        starts.append(int(m.group(1)))
    assert min(starts) == 2 * seg and len(starts) == len(set(starts)) >= 4
    assert gated.max_in_flight["range"] >= 2
    assert not partial.exists()
