"""``stargzfs convert``: whole images to eStargz, registry→registry, oci→registry,
registry→oci, indexes; every converted layer checked with plain ``gzip -d``."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import MountedProcess, Registry
from harness.oci import gzip_layer, make_tar, write_oci_layout

from stargzfs.cli.main import main

RESERVED = {"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"}
TOC = "containerd.io/snapshot/stargz/toc.digest"
USIZE = "io.containers.estargz.uncompressed-size"

_rng = random.Random(11)
LAYER1 = {
    "etc/os-release": b"NAME=test\n",
    "usr/bin/tool": _rng.randbytes(300_000),
    "usr/share/doc/readme": b"read me\n" * 100,
}
LAYER2 = {
    "app/main.py": b"print('hi')\n",
    "app/data.bin": _rng.randbytes(50_000),
    "app/lib/util.py": b"x = 1\n",
}


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _skopeo(reg: Registry, *args: str) -> str:
    pre = "src-" if args[0] == "copy" else ""
    cmd = ["skopeo", "--insecure-policy", args[0], f"--{pre}tls-verify=false", *args[1:]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _layout(root: Path) -> Path:
    return write_oci_layout(root, [gzip_layer(make_tar(LAYER1)), gzip_layer(make_tar(LAYER2))])


def _fetch(reg: Registry, ref: str, dest: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """skopeo copy to dir:, returns (manifest, config)."""
    _skopeo(reg, "copy", "--quiet", f"docker://{ref}", f"dir:{dest}")
    manifest = json.loads((dest / "manifest.json").read_text())
    config = json.loads((dest / manifest["config"]["digest"].split(":")[1]).read_bytes())
    return manifest, config


def _gunzip(path: Path) -> bytes:
    """Plain ``gzip -d``, as a non-lazy client would do."""
    res = subprocess.run(["gzip", "-dc", str(path)], capture_output=True, check=True)
    return res.stdout


def _entries(tar_bytes: bytes) -> list[tuple[str, bytes | None]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for info in tar:
            f = tar.extractfile(info) if info.isfile() else None
            out.append((info.name, f.read() if f is not None else None))
    return out


def _check_layers(
    dest: Path, manifest: dict[str, Any], config: dict[str, Any], sources: list[dict[str, bytes]]
) -> list[list[str]]:
    """Every layer is eStargz with the same files as its source; returns entry names."""
    orders = []
    assert len(manifest["layers"]) == len(sources)
    for i, (desc, files) in enumerate(zip(manifest["layers"], sources, strict=True)):
        blob = dest / desc["digest"].split(":")[1]
        raw = _gunzip(blob)
        entries = _entries(raw)
        names = [n for n, _ in entries]
        contents = {n: d for n, d in entries if n not in RESERVED}
        assert contents == files
        toc = dict(entries)["stargz.index.json"]
        assert toc is not None
        assert desc["annotations"][TOC] == _sha(toc)
        assert desc["annotations"][USIZE] == str(len(raw))
        assert config["rootfs"]["diff_ids"][i] == _sha(raw)
        assert desc["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        orders.append(names)
    return orders


def test_convert_registry_to_registry_prioritized(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = registry.push_oci(_layout(tmp_path / "src"), "v1", "convert/plain:v1")
    prio = tmp_path / "prio.txt"
    prio.write_text("/usr/share/doc/readme\napp/lib/util.py\n/not/there\n")
    dst = registry.ref("convert/esgz:v1")
    assert main(["convert", src, dst, "--prioritize", str(prio), "--chunk-size", "64k"]) == 0
    out = capsys.readouterr()
    digest = out.out.strip()
    assert "not found in any converted layer: /not/there" in out.err
    manifest, config = _fetch(registry, dst, tmp_path / "out")
    assert _sha((tmp_path / "out" / "manifest.json").read_bytes()) == digest
    orders = _check_layers(tmp_path / "out", manifest, config, [LAYER1, LAYER2])
    # Prioritized files come before the landmark, the rest after.
    for order, first in zip(orders, ["usr/share/doc/readme", "app/lib/util.py"], strict=True):
        landmark = order.index(".prefetch.landmark")
        assert order.index(first) < landmark
        regular = [n for n in order[landmark + 1 :] if n not in RESERVED]
        assert first not in regular and regular
    # The lazy reader serves the converted image straight from the registry.
    assert main(["cat", dst, "/app/lib/util.py"]) == 0
    assert capsys.readouterr().out == "x = 1\n"
    # History and the rest of the config are untouched.
    src_config = json.loads(_skopeo(registry, "inspect", "--raw", "--config", f"docker://{src}"))
    assert {k: v for k, v in config.items() if k != "rootfs"} == {
        k: v for k, v in src_config.items() if k != "rootfs"
    }


def test_convert_oci_to_registry_then_keep_and_force(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = _layout(tmp_path / "src")
    dst = registry.ref("convert/from-oci:v1")
    assert main(["convert", f"oci:{layout}:v1", dst]) == 0
    capsys.readouterr()
    manifest, config = _fetch(registry, dst, tmp_path / "out")
    orders = _check_layers(tmp_path / "out", manifest, config, [LAYER1, LAYER2])
    assert all(o[0] == ".no.prefetch.landmark" for o in orders)
    # Converting an eStargz image again keeps every layer (same digests) ...
    again = registry.ref("convert/again:v1")
    assert main(["convert", dst, again]) == 0
    err = capsys.readouterr().err
    assert "0 layer(s) converted, 2 kept" in err
    m2, _ = _fetch(registry, again, tmp_path / "out2")
    assert [d["digest"] for d in m2["layers"]] == [d["digest"] for d in manifest["layers"]]
    assert m2["config"]["digest"] == manifest["config"]["digest"]
    # ... unless --force.
    forced = registry.ref("convert/forced:v1")
    assert main(["convert", dst, forced, "--force"]) == 0
    assert "2 layer(s) converted" in capsys.readouterr().err
    m3, c3 = _fetch(registry, forced, tmp_path / "out3")
    _check_layers(tmp_path / "out3", m3, c3, [LAYER1, LAYER2])


def test_convert_to_oci_layout_and_lazy_listing(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = registry.push_oci(_layout(tmp_path / "src"), "v1", "convert/to-oci:v1")
    out = tmp_path / "layout"
    assert main(["convert", src, f"oci:{out}:esgz"]) == 0
    digest = capsys.readouterr().out.strip()
    raw = json.loads(_skopeo(registry, "inspect", "--raw", f"oci:{out}:esgz"))
    assert _sha(json.dumps(raw, indent=2).encode()) == digest
    for desc in raw["layers"]:
        assert TOC in desc["annotations"]
    # The lazy reader lists the converted image (landmark and TOC hidden).
    assert main(["ls", "-R", f"oci:{out}:esgz"]) == 0
    listing = capsys.readouterr().out
    assert "tool" in listing and "util.py" in listing
    assert "landmark" not in listing and "stargz.index.json" not in listing


def _index_layout(root: Path) -> Path:
    """Two platforms (amd64, arm64) in one index, each with a single gzip layer."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
        return {"digest": _sha(data), "size": len(data)}

    entries = []
    for arch in ("amd64", "arm64"):
        tar = make_tar({f"{arch}.txt": arch.encode() * 100})
        layer = gzip.compress(tar, mtime=0)
        config = json.dumps(
            {
                "architecture": arch,
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [_sha(tar)]},
            }
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(config)},
                "layers": [
                    {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(layer)}
                ],
            }
        ).encode()
        entries.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **put(manifest),
                "platform": {"architecture": arch, "os": "linux"},
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
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return root


def test_convert_index_all_platforms_and_one(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = _index_layout(tmp_path / "idx")
    src = registry.ref("convert/multi:v1")
    assert main(["push", f"oci:{layout}:v1", src]) == 0
    capsys.readouterr()
    dst = registry.ref("convert/multi-esgz:v1")
    assert main(["convert", src, dst, "--all-platforms"]) == 0
    capsys.readouterr()
    index = json.loads(_skopeo(registry, "inspect", "--raw", f"docker://{dst}"))
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64", "arm64"]
    for arch in ("amd64", "arm64"):
        out = tmp_path / f"out-{arch}"
        _skopeo(
            registry, "copy", "--quiet", "--override-arch", arch, f"docker://{dst}", f"dir:{out}"
        )
        manifest = json.loads((out / "manifest.json").read_text())
        config = json.loads((out / manifest["config"]["digest"].split(":")[1]).read_bytes())
        assert config["architecture"] == arch
        _check_layers(out, manifest, config, [{f"{arch}.txt": arch.encode() * 100}])
    one = registry.ref("convert/multi-arm:v1")
    assert main(["convert", src, one, "--platform", "linux/arm64"]) == 0
    capsys.readouterr()
    raw = json.loads(_skopeo(registry, "inspect", "--raw", f"docker://{one}"))
    assert raw["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert TOC in raw["layers"][0]["annotations"]


def test_convert_docker_archive_to_zstdchunked(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import zstandard

    archive = tmp_path / "image.tar"
    layout = _layout(tmp_path / "src")
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            f"oci:{layout}:v1",
            f"docker-archive:{archive}:example/plain:v1",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    dst = registry.ref("convert/zstd:v1")
    assert main(["convert", f"docker-archive:{archive}", dst, "--zstdchunked"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    manifest, config = _fetch(registry, dst, out)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    for desc, files in zip(manifest["layers"], [LAYER1, LAYER2], strict=True):
        assert desc["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
        assert TOC in desc["annotations"]
        blob = (out / desc["digest"].split(":")[1]).read_bytes()
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(blob), read_across_frames=True
        )
        raw = reader.read()
        contents = {n: d for n, d in _entries(raw) if n not in RESERVED}
        assert contents == files
        assert _sha(raw) in config["rootfs"]["diff_ids"]


def test_convert_to_docker_archive_and_push_it(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The archive loads with docker/skopeo (manifest.json) and keeps the eStargz annotations
    for a later push (its OCI index and manifest)."""
    src = registry.push_oci(_layout(tmp_path / "src"), "v1", "convert/to-archive:v1")
    archive = tmp_path / "esgz.tar"
    assert main(["convert", src, f"docker-archive:{archive}:example/esgz:v1"]) == 0
    digest = capsys.readouterr().out.strip()
    info = json.loads(
        subprocess.run(
            ["skopeo", "inspect", f"docker-archive:{archive}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    )
    assert len(info["Layers"]) == 2
    with tarfile.open(archive) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        assert json.loads(member.read())[0]["RepoTags"] == ["example/esgz:v1"]
    dst = registry.ref("convert/from-archive:v1")
    assert main(["push", f"docker-archive:{archive}", dst]) == 0
    assert capsys.readouterr().out.strip() == digest
    manifest, config = _fetch(registry, dst, tmp_path / "out")
    _check_layers(tmp_path / "out", manifest, config, [LAYER1, LAYER2])
    # Converting the archive again keeps its eStargz layers (read in place in the tar).
    again = registry.ref("convert/from-archive-again:v1")
    assert main(["convert", f"docker-archive:{archive}", again]) == 0
    assert "0 layer(s) converted, 2 kept" in capsys.readouterr().err
    assert main(["convert", src, f"docker-archive:{archive}", "--all-platforms"]) == 2


def test_converted_image_mounts_lazily_byte_identical(
    registry: Registry,
    tmp_path: Path,
    mounter: Callable[..., MountedProcess],
    mountpoint: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``convert`` a plain gzip image (64 KiB chunks, so the big files span many), then
    ``stargzfs mount`` the result from the registry: reading one small file fetches a
    fraction of its layer, and every file reads back byte-identical to the source image's."""
    lower = {**LAYER1, "usr/lib/big.bin": random.Random(12).randbytes(2_000_000)}
    layout = write_oci_layout(
        tmp_path / "src", [gzip_layer(make_tar(lower)), gzip_layer(make_tar(LAYER2))]
    )
    src = registry.push_oci(layout, "v1", "convert/mount-src:v1")
    dst = registry.ref("convert/mount-esgz:v1")
    assert main(["convert", src, dst, "--chunk-size", "64k"]) == 0
    capsys.readouterr()
    stargzfs = [sys.executable, "-m", "stargzfs"]
    argv = [*stargzfs, "mount", dst, str(mountpoint), "--foreground", "--no-prefetch"]
    mounter([*argv, "--cache-dir", str(tmp_path / "cache")], mountpoint)
    assert (mountpoint / "etc/os-release").read_bytes() == LAYER1["etc/os-release"]
    stats = subprocess.run(
        [*stargzfs, "stats", str(mountpoint), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    first = json.loads(stats.stdout)["layers"][0]
    assert 0 < first["bytes_fetched"] < first["size"] / 2  # lazily: not the whole layer
    source = {**lower, **LAYER2}
    found = {
        str(p.relative_to(mountpoint)): p.read_bytes()
        for p in sorted(mountpoint.rglob("*"))
        if p.is_file()
    }
    assert sorted(found) == sorted(source)
    for name, data in source.items():
        assert found[name] == data, name
