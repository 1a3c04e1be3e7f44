"""Writers for the on-disk image formats ``oci``, ``dir`` and ``docker-archive``.

Each writes into a staging location the caller renames into place. Blobs are copied from
the (verified) blob cache byte for byte, so digests are preserved.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DigestMismatchError
from ..formats.layer_stream import open_decompressed
from ..image import OCI_INDEX, REF_NAME, Descriptor
from ..reference import parse_digest

__all__ = [
    "DIR_VERSION",
    "ImageBlobs",
    "write_dir",
    "write_docker_archive",
    "write_oci_layout",
]

DIR_VERSION = "Directory Transport Version: 1.1\n"
_BLOCK = 1024 * 1024


@dataclass
class ImageBlobs:
    """One platform's image as fetched: exact manifest and config bytes, layer files."""

    manifest_digest: str
    manifest_media_type: str
    manifest_raw: bytes
    config_digest: str
    config_raw: bytes
    layers: Sequence[Descriptor]
    diff_ids: Sequence[str]
    layer_paths: Mapping[str, Path] = field(default_factory=dict)  # digest → cached file


def _hex(digest: str) -> str:
    return parse_digest(digest)[1]


def _copy(src: Path, dst: Path) -> None:
    """A blob from the cache: a hardlink when possible (cache files are read-only and the
    content is addressed by its digest), else a copy."""
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_oci_layout(
    root: Path,
    images: Sequence[ImageBlobs],
    ref_name: str | None,
    *,
    index_raw: bytes | None = None,
    index_digest: str | None = None,
    index_media_type: str | None = None,
) -> None:
    """An OCI image layout at ``root`` (an empty directory). With ``index_raw`` the image
    index (all platforms) is the tagged entry; otherwise the single image's manifest."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for image in images:
        for layer in image.layers:
            _copy(image.layer_paths[layer.digest], blobs / _hex(layer.digest))
        (blobs / _hex(image.config_digest)).write_bytes(image.config_raw)
        (blobs / _hex(image.manifest_digest)).write_bytes(image.manifest_raw)
    if index_raw is not None and index_digest is not None:
        (blobs / _hex(index_digest)).write_bytes(index_raw)
        top: dict[str, object] = {
            "mediaType": index_media_type or OCI_INDEX,
            "digest": index_digest,
            "size": len(index_raw),
        }
    else:
        image = images[0]
        top = {
            "mediaType": image.manifest_media_type,
            "digest": image.manifest_digest,
            "size": len(image.manifest_raw),
        }
    if ref_name:
        top["annotations"] = {REF_NAME: ref_name}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top]}
    (root / "index.json").write_text(json.dumps(index, indent=None))
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))


def write_dir(root: Path, image: ImageBlobs) -> None:
    """skopeo's ``dir:`` layout: ``manifest.json``, one file per blob (named by hex digest),
    and ``version``."""
    root.mkdir(parents=True, exist_ok=True)
    for layer in image.layers:
        _copy(image.layer_paths[layer.digest], root / _hex(layer.digest))
    (root / _hex(image.config_digest)).write_bytes(image.config_raw)
    (root / "manifest.json").write_bytes(image.manifest_raw)
    (root / "version").write_text(DIR_VERSION)


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _pad(f: object, size: int) -> None:
    rem = size % 512
    if rem:
        f.write(b"\0" * (512 - rem))  # type: ignore[attr-defined]


def write_docker_archive(path: Path, image: ImageBlobs, repo_tags: Sequence[str]) -> None:
    """A ``docker load``-able tar (the layout skopeo's ``docker-archive:`` writes): the config
    as ``<hex>.json``, each layer **uncompressed** as ``<diff_id hex>.tar`` (checked against
    the config's diff_id), ``manifest.json``."""
    config_name = _hex(image.config_digest) + ".json"
    layer_names: list[str] = []
    written: set[str] = set()
    with open(path, "wb") as f:
        f.write(_header(config_name, len(image.config_raw)))
        f.write(image.config_raw)
        _pad(f, len(image.config_raw))
        for layer, diff_id in zip(image.layers, image.diff_ids, strict=True):
            name = _hex(diff_id) + ".tar"
            layer_names.append(name)
            if name in written:
                continue
            written.add(name)
            header_at = f.tell()
            f.write(b"\0" * 512)
            size = 0
            with open(image.layer_paths[layer.digest], "rb") as raw:
                comp = layer.compression or "none"
                stream = open_decompressed(raw, comp, hash_output=True)
                while True:
                    data = stream.read(_BLOCK)
                    if not data:
                        break
                    f.write(data)
                    size += len(data)
                assert stream.hasher is not None
                actual = "sha256:" + stream.hasher.hexdigest()
            if actual != diff_id:
                raise DigestMismatchError(
                    f"uncompressed layer {layer.digest} (diff_id)", diff_id, actual
                )
            _pad(f, size)
            end = f.tell()
            f.seek(header_at)
            f.write(_header(name, size))
            f.seek(end)
        manifest = json.dumps(
            [{"Config": config_name, "RepoTags": list(repo_tags), "Layers": layer_names}]
        ).encode()
        f.write(_header("manifest.json", len(manifest)))
        f.write(manifest)
        _pad(f, len(manifest))
        f.write(b"\0" * 1024)
        f.flush()
        os.fsync(f.fileno())
