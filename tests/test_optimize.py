"""optimize: the files a command reads first come first (before the landmark) in DST."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import Registry
from harness.oci import LayerBlob, estargz_layer, make_tar
from test_mount_cmd import _program_files

from stargzfs.formats.toc import LANDMARK_PREFETCH

pytestmark = [pytest.mark.fuse, pytest.mark.registry]


def _layout_with_shell(oci_layout: Path, tmp_path: Path) -> Path:
    """The fixture image plus a top layer holding /bin/dash and its libraries."""
    import shutil

    layout = tmp_path / "layout"
    shutil.copytree(oci_layout, layout)
    index = json.loads((layout / "index.json").read_text())
    mdesc = index["manifests"][0]
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / mdesc["digest"][7:]).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_bytes())
    shell: LayerBlob = estargz_layer(make_tar(_program_files("/bin/dash"), mode=0o755))
    import hashlib

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest

    manifest["layers"].append(
        {
            "mediaType": shell.media_type,
            "digest": put(shell.data),
            "size": len(shell.data),
            "annotations": shell.annotations,
        }
    )
    config["rootfs"]["diff_ids"].append(shell.diff_id)
    cfg = json.dumps(config).encode()
    manifest["config"].update(digest=put(cfg), size=len(cfg))
    mbytes = json.dumps(manifest).encode()
    mdesc.update(digest=put(mbytes), size=len(mbytes))
    (layout / "index.json").write_text(json.dumps(index))
    return layout


def test_optimize_puts_the_files_read_first(
    registry: Registry, oci_layout: Path, tmp_path: Path, fuse_available: None
) -> None:
    src = registry.push_oci(_layout_with_shell(oci_layout, tmp_path), "v1", "opt/src:v1")
    dst = f"{registry.host}/opt/dst:v1"
    script = "read a < /usr/bin/hello; read b < /etc/passwd"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "stargzfs",
            "optimize",
            src,
            dst,
            "--period",
            "20",
            "--",
            "/bin/dash",
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    # In the converted lower layer, exactly those two files (and their parent dirs) come
    # before the landmark, in the order they were read.
    listed = subprocess.run(
        [sys.executable, "-m", "stargzfs", "layers", dst, "--json"], capture_output=True, text=True
    )
    layers = json.loads(listed.stdout)["layers"]
    assert [layer["format"] for layer in layers] == ["estargz"] * 3
    toc = _toc_names(dst, layers[0]["digest"], tmp_path)
    before = toc[: toc.index(LANDMARK_PREFETCH)]
    files = [n for n in before if not n.endswith("/")]
    assert files == ["usr/bin/hello", "etc/passwd"]
    assert os.path.exists(tmp_path)


def _toc_names(ref: str, digest: str, tmp_path: Path) -> list[str]:
    """TOC entry names of one layer, in blob order (via the library)."""
    import trio

    from stargzfs.formats.layer import read_toc
    from stargzfs.image import resolve_image
    from stargzfs.reference import parse_reference
    from stargzfs.registry import RegistryBlobSource, RegistryClient

    async def main() -> list[str]:
        async with RegistryClient() as client:
            image = await resolve_image(client, parse_reference(ref))
            desc = next(d for d in image.manifest.layers if d.digest == digest)
            toc = await read_toc(RegistryBlobSource(client, image.ref.repo, desc.digest, desc.size))
            return [e["name"] for e in json.loads(toc.toc_json)["entries"]]

    return trio.run(main)
