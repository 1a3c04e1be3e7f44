"""Plain gzip, zstd and uncompressed layers: mounted and read (whole, not lazily)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zstandard
from harness.oci import LayerBlob, gzip_layer, make_tar, write_oci_layout

from stargzfs.errors import DigestMismatchError
from stargzfs.index.plain_layer import open_plain_layer
from stargzfs.source import BytesSource
from stargzfs.view import ImageView, LayerView

FILES = {"a/one.txt": b"one\n" * 1000, "b/two.bin": bytes(range(256)) * 300, "empty": b""}


def layers() -> dict[str, LayerBlob]:
    tar = make_tar(FILES)
    diff = "sha256:" + hashlib.sha256(tar).hexdigest()
    zst = zstandard.ZstdCompressor().compress(tar)
    return {
        "gzip": gzip_layer(tar),
        "zstd": LayerBlob(zst, diff, "application/vnd.oci.image.layer.v1.tar+zstd"),
        "tar": LayerBlob(tar, diff, "application/vnd.oci.image.layer.v1.tar"),
    }


@pytest.mark.parametrize("kind", ["gzip", "zstd", "tar"])
async def test_plain_layer_reads_back(kind: str, tmp_path: Path) -> None:
    blob = layers()[kind]
    source, index = await open_plain_layer(BytesSource(blob.data), blob.digest, tmp_path)
    view = ImageView([LayerView(source, index, kind)])
    for path, data in FILES.items():
        node = view.resolve(path)
        assert await view.read(node, 0, len(data) + 10) == data
        assert await view.read(node, 5, 7) == data[5:12]
    # Reopened from the cache: same tree, nothing downloaded.
    again, index2 = await open_plain_layer(BytesSource(b""), blob.digest, tmp_path)
    assert [p for p, _ in index2.walk()] == [p for p, _ in index.walk()]
    again.close()
    source.close()


async def test_plain_layer_digest_mismatch_keeps_nothing(tmp_path: Path) -> None:
    blob = layers()["gzip"]
    with pytest.raises(DigestMismatchError):
        await open_plain_layer(BytesSource(blob.data), "sha256:" + "0" * 64, tmp_path)
    assert not any(p.is_file() for p in (tmp_path / "tars").iterdir())


def test_mount_plain_gzip_image(
    mounter: Any, mountpoint: Path, tmp_path: Path, registry: Any
) -> None:
    layout = write_oci_layout(tmp_path / "img", [layers()["gzip"], layers()["zstd"]])
    ref = registry.push_oci(layout, "v1", "plain/mixed:v1")
    cmd = [sys.executable, "-m", "stargzfs", "mount", ref, str(mountpoint)]
    mounter([*cmd, "--foreground", "--cache-dir", str(tmp_path / "cache")], mountpoint)
    for path, data in FILES.items():
        assert (mountpoint / path).read_bytes() == data
    layers_out = subprocess.run(
        [sys.executable, "-m", "stargzfs", "layers", ref, "--json"], capture_output=True, text=True
    )
    formats = [layer["format"] for layer in json.loads(layers_out.stdout)["layers"]]
    assert formats == ["gzip", "zstd"]


def test_unverified_lazy_layer_needs_opt_in(
    mounter: Any, mountpoint: Path, tmp_path: Path, registry: Any
) -> None:
    from harness.oci import estargz_layer

    layer = estargz_layer(make_tar(FILES))
    layer.annotations = None  # no TOC digest: chunks cannot be verified
    ref = registry.push_oci(
        write_oci_layout(tmp_path / "img", [layer]), "v1", "plain/unverified:v1"
    )
    base = [sys.executable, "-m", "stargzfs", "mount", ref, str(mountpoint)]
    refused = subprocess.run(
        [*base, "--cache-dir", str(tmp_path / "c")], capture_output=True, text=True
    )
    assert refused.returncode == 6 and "--allow-unverified" in refused.stderr
    mounter(
        [*base, "--foreground", "--allow-unverified", "--cache-dir", str(tmp_path / "c")],
        mountpoint,
    )
    assert (mountpoint / "a/one.txt").read_bytes() == FILES["a/one.txt"]
