"""Build small OCI image layouts in tests (to push with skopeo), from layer tars."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LayerBlob", "estargz_layer", "gzip_layer", "make_tar", "write_oci_layout"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass
class LayerBlob:
    data: bytes
    diff_id: str
    media_type: str = LAYER_GZIP
    annotations: dict[str, str] | None = None

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()


def make_tar(files: dict[str, bytes], mode: int = 0o644) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def gzip_layer(tar_bytes: bytes) -> LayerBlob:
    return LayerBlob(
        gzip.compress(tar_bytes, mtime=0), "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    )


def estargz_layer(tar_bytes: bytes, **options: object) -> LayerBlob:
    from stargzfs.convert import convert_layer

    out = io.BytesIO()
    result = convert_layer(io.BytesIO(tar_bytes), out, **options)  # type: ignore[arg-type]
    return LayerBlob(out.getvalue(), result.diff_id, LAYER_GZIP, dict(result.annotations))


def write_oci_layout(root: Path, layers: list[LayerBlob], tag: str = "v1") -> Path:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest

    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        }
    ).encode()
    layer_descs = []
    for layer in layers:
        desc: dict[str, object] = {
            "mediaType": layer.media_type,
            "digest": put(layer.data),
            "size": len(layer.data),
        }
        if layer.annotations:
            desc["annotations"] = layer.annotations
        layer_descs.append(desc)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": put(config), "size": len(config)},
            "layers": layer_descs,
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": put(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return root
