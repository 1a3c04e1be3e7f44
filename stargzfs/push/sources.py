"""Local images to push: ``docker save`` archives, OCI layouts, and rootfs directories.

Each opens as a :class:`LocalImage`: the manifests (bytes as they will be uploaded), and for
each blob where its bytes are on disk. Nothing is loaded into memory whole:

* ``oci:DIR[:TAG]``: the layout's blobs are used in place; its manifest bytes are pushed
  verbatim (so digests stay the same); an index is pushed with all its manifests.
* ``docker-archive:FILE[:NAME:TAG]`` or a bare ``FILE``: blobs are read in place inside the
  tar (members are stored, not compressed, in the archive). Uncompressed layers are gzipped
  (deterministically: same archive, same digests, so a re-push skips them) into a temporary
  directory, their sha256 checked against the config's ``rootfs.diff_ids`` on the way (a
  mismatch is a :class:`~stargzfs.errors.DigestMismatchError` naming the layer); the config
  is used as is, so the image ID and diff_ids do not change. The manifest is a Docker
  schema 2 manifest, as ``docker push`` makes.
* ``dir-rootfs:DIR``: the directory is packed as one layer (sorted, numeric owners kept) with
  a fresh config for the host platform.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import (
    DigestMismatchError,
    FormatError,
    NotFoundError,
    UnsupportedError,
    UsageError,
)
from ..formats.layer_stream import Decompressor
from ..image import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    INDEX_MEDIA_TYPES,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Index,
    Manifest,
    parse_manifest,
)
from ..reference import Platform, parse_digest
from .upload import ChunkSource

__all__ = ["LocalBlob", "LocalImage", "LocalManifest", "open_source", "parse_source"]

_READ = 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass
class LocalBlob:
    """A blob's bytes on disk: ``length`` bytes of ``path`` from ``offset``."""

    digest: str
    size: int
    media_type: str
    path: str
    offset: int = 0

    def chunks(self) -> ChunkSource:
        import trio

        async def gen(start: int) -> AsyncGenerator[bytes, None]:
            f = await trio.to_thread.run_sync(open, self.path, "rb")
            try:
                pos = start
                await trio.to_thread.run_sync(f.seek, self.offset + pos)
                while pos < self.size:
                    data = await trio.to_thread.run_sync(f.read, min(_READ, self.size - pos))
                    if not data:
                        raise FormatError(f"{self.path}: blob {self.digest} is truncated")
                    pos += len(data)
                    yield data
            finally:
                f.close()

        return gen

    def open(self) -> Any:
        """A binary file positioned at the blob, reading at most its size."""
        f = open(self.path, "rb")  # noqa: SIM115 - returned to the caller
        f.seek(self.offset)
        return _Limited(f, self.size)


class _Limited:
    def __init__(self, f: Any, size: int) -> None:
        self._f = f
        self._left = size

    def read(self, n: int = -1, /) -> bytes:
        if self._left <= 0:
            return b""
        if n < 0 or n > self._left:
            n = self._left
        data: bytes = self._f.read(n)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> _Limited:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class LocalManifest:
    data: bytes
    media_type: str
    digest: str
    doc: Manifest

    @property
    def blob_digests(self) -> list[str]:
        return [d.digest for d in self.doc.layers] + [self.doc.config.digest]


@dataclass
class LocalImage:
    """An image ready to push: ``manifests`` (pushed by digest, first), then ``top`` (the
    index, or the one manifest) under the tag."""

    top_data: bytes
    top_media_type: str
    manifests: list[LocalManifest]
    blobs: dict[str, LocalBlob]
    tag: str | None = None
    _cleanup: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.top_data).hexdigest()

    def close(self) -> None:
        self._cleanup.close()

    def __enter__(self) -> LocalImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _manifest(data: bytes, media_type: str | None = None) -> LocalManifest:
    doc = parse_manifest(data, media_type)
    if not isinstance(doc, Manifest):
        raise FormatError("expected an image manifest, found an index")
    return LocalManifest(data, doc.media_type, _sha256(data), doc)


# --------------------------------------------------------------------------- parsing


def parse_source(text: str) -> tuple[str, str, str | None]:
    """``oci:DIR[:TAG]`` / ``docker-archive:FILE[:REF]`` / ``dir-rootfs:DIR`` / a bare path →
    (kind, path, tag-or-ref)."""
    for kind in ("oci", "docker-archive", "dir-rootfs", "oci-archive"):
        if text.startswith(kind + ":"):
            rest = text[len(kind) + 1 :]
            if kind == "oci-archive":
                raise UsageError("oci-archive: sources are not supported (unpack it: oci:DIR)")
            if kind == "dir-rootfs":
                return kind, rest, None
            path, _sep, extra = rest.partition(":")
            if not path:
                raise UsageError(f"{text!r}: missing path")
            return kind, path, extra or None
    if text.startswith("docker://"):
        raise UsageError(f"{text!r} is a registry reference, not a local source")
    if os.path.isdir(text):
        if os.path.exists(os.path.join(text, "oci-layout")):
            return "oci", text, None
        raise UsageError(f"{text!r} is a directory: say oci:{text} or dir-rootfs:{text}")
    if os.path.isfile(text):
        return "docker-archive", text, None
    raise NotFoundError(f"{text}: no such file or directory")


def open_source(text: str, *, workdir: str | None = None, jobs: int = 3) -> LocalImage:
    """Open a local image for pushing (see the module doc); close it when done."""
    kind, path, extra = parse_source(text)
    if kind == "oci":
        return open_oci_layout(path, extra)
    if kind == "docker-archive":
        return open_docker_archive(path, extra, workdir=workdir, jobs=jobs)
    return open_rootfs_dir(path, workdir=workdir)


# --------------------------------------------------------------------------- OCI layouts


def _oci_blob_path(root: Path, digest: str) -> Path:
    algorithm, hexdigest = parse_digest(digest)
    return root / "blobs" / algorithm / hexdigest


def open_oci_layout(path: str, tag: str | None) -> LocalImage:
    root = Path(path)
    try:
        index_data = (root / "index.json").read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{path}: not an OCI layout (no index.json)") from None
    index = parse_manifest(index_data, "application/vnd.oci.image.index.v1+json")
    if not isinstance(index, Index):
        raise FormatError(f"{path}/index.json is not an index")
    entries = list(index.manifests)
    if tag is not None:
        chosen = [d for d in entries if d.ref_name == tag]
        if not chosen:
            tags = ", ".join(sorted({d.ref_name for d in entries if d.ref_name})) or "none"
            raise NotFoundError(f"oci:{path} has no image tagged {tag!r} (tags: {tags})")
    elif len(entries) == 1:
        chosen = entries
    else:
        tags = ", ".join(sorted({d.ref_name for d in entries if d.ref_name})) or "none"
        raise UsageError(f"oci:{path} holds {len(entries)} images: name one (tags: {tags})")
    top = chosen[0]

    def read(digest: str) -> bytes:
        try:
            data = _oci_blob_path(root, digest).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"oci:{path}: blob {digest} is missing") from None
        if _sha256(data) != digest:
            raise FormatError(f"oci:{path}: blob {digest} does not match its digest")
        return data

    top_data = read(top.digest)
    doc = parse_manifest(top_data, top.media_type)
    manifests: list[LocalManifest] = []
    if isinstance(doc, Index):
        for child in doc.manifests:
            if child.media_type in INDEX_MEDIA_TYPES:
                raise FormatError(f"oci:{path}: nested indexes are not supported")
            manifests.append(_manifest(read(child.digest), child.media_type))
    else:
        manifests.append(LocalManifest(top_data, doc.media_type, top.digest, doc))
    blobs: dict[str, LocalBlob] = {}
    for m in manifests:
        for desc in (*m.doc.layers, m.doc.config):
            p = _oci_blob_path(root, desc.digest)
            if not p.is_file():
                if desc.urls:
                    continue  # foreign layer: lives elsewhere
                raise NotFoundError(f"oci:{path}: blob {desc.digest} is missing")
            if p.stat().st_size != desc.size:
                raise FormatError(
                    f"oci:{path}: blob {desc.digest} is {p.stat().st_size} bytes, "
                    f"its descriptor says {desc.size}"
                )
            blobs[desc.digest] = LocalBlob(desc.digest, desc.size, desc.media_type, str(p))
    return LocalImage(top_data, doc.media_type, manifests, blobs, tag)


# --------------------------------------------------------------------------- docker archives


def _gzip_file(src: Any, dst_path: str) -> tuple[str, int, str]:
    """Gzip ``src`` (a readable) into ``dst_path`` deterministically (no name, mtime 0).
    Returns (compressed digest, compressed size, uncompressed digest)."""
    comp = zlib.compressobj(6, zlib.DEFLATED, 31)
    h_out = hashlib.sha256()
    h_in = hashlib.sha256()
    size = 0
    with open(dst_path, "wb") as out:
        while True:
            data = src.read(_READ)
            if not data:
                break
            h_in.update(data)
            chunk = comp.compress(data)
            if chunk:
                h_out.update(chunk)
                out.write(chunk)
                size += len(chunk)
        chunk = comp.flush()
        h_out.update(chunk)
        out.write(chunk)
        size += len(chunk)
    return "sha256:" + h_out.hexdigest(), size, "sha256:" + h_in.hexdigest()


def _hash_gzip_range(path: str, offset: int, size: int) -> tuple[str, str]:
    """(sha256 of the gzip bytes ``[offset, offset+size)`` of ``path``, sha256 of what they
    decompress to), in one read."""
    compressed = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size

        class Range:
            def read(self, n: int = -1) -> bytes:
                nonlocal left
                data = f.read(left if n < 0 else min(n, left))
                left -= len(data)
                compressed.update(data)
                return data

        rest = Range()
        stream = Decompressor(rest, "gzip", hash_output=True)
        try:
            stream.drain()
        except FormatError as e:
            raise FormatError(f"{path}: layer at offset {offset}: {e}") from None
        while rest.read(_READ):  # what follows the gzip stream is pushed too
            pass
    if left:
        raise FormatError(f"{path}: truncated")
    assert stream.hasher is not None
    return "sha256:" + compressed.hexdigest(), "sha256:" + stream.hasher.hexdigest()


def _member(tar: tarfile.TarFile, name: str, archive: str) -> tarfile.TarInfo:
    seen = 0
    while True:
        try:
            info = tar.getmember(name.removeprefix("./"))
        except KeyError:
            raise FormatError(f"{archive}: member {name!r} is missing") from None
        if info.isfile():
            return info
        if (info.issym() or info.islnk()) and seen < 16:
            seen += 1
            target = info.linkname
            if info.issym():
                target = os.path.normpath(os.path.join(os.path.dirname(name), target))
            name = target
            continue
        raise FormatError(f"{archive}: member {name!r} is not a regular file")


def _archived_manifest(tar: tarfile.TarFile, path: str, config_digest: str) -> LocalImage | None:
    """The image's own manifest when the archive also is an OCI layout (``docker save`` since
    Docker 25, ``stargzfs convert … docker-archive:``) and its layers are compressed: pushed
    verbatim, with its digest and layer annotations (eStargz TOC digests) intact."""
    try:
        info = tar.getmember("index.json")
    except KeyError:
        return None
    f = tar.extractfile(info)
    if f is None:
        return None
    try:
        index = parse_manifest(f.read(), "application/vnd.oci.image.index.v1+json")
    except FormatError:
        return None
    if not isinstance(index, Index):
        return None

    def member(digest: str) -> tarfile.TarInfo | None:
        algorithm, hexdigest = parse_digest(digest)
        try:
            m = _member(tar, f"blobs/{algorithm}/{hexdigest}", path)
        except FormatError:
            return None
        return m

    for desc in index.manifests:
        if desc.media_type in INDEX_MEDIA_TYPES:
            continue
        minfo = member(desc.digest)
        if minfo is None or minfo.size > 4 * 1024 * 1024:
            continue
        mf = tar.extractfile(minfo)
        assert mf is not None
        data = mf.read()
        if _sha256(data) != desc.digest:
            continue
        try:
            lm = _manifest(data, desc.media_type)
        except FormatError:
            continue
        if lm.doc.config.digest != config_digest:
            continue
        if any(d.compression not in ("gzip", "zstd") for d in lm.doc.layers):
            return None  # uncompressed layers: compress them (the manifest.json route)
        blobs: dict[str, LocalBlob] = {}
        for d in (*lm.doc.layers, lm.doc.config):
            binfo = member(d.digest)
            if binfo is None or binfo.size != d.size:
                return None
            blobs[d.digest] = LocalBlob(d.digest, d.size, d.media_type, path, binfo.offset_data)
        return LocalImage(data, lm.media_type, [lm], blobs)
    return None


def _config_diff_ids(data: bytes, name: str, archive: str) -> list[str]:
    """The config's ``rootfs.diff_ids``."""
    try:
        diff_ids = json.loads(data)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise FormatError(f"{archive}: {name} is not an image config with diff_ids") from None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise FormatError(f"{archive}: {name}: rootfs.diff_ids is not a list of digests")
    return diff_ids


def open_docker_archive(
    path: str, ref: str | None, *, workdir: str | None = None, jobs: int = 3
) -> LocalImage:
    try:
        tar = tarfile.open(path, "r:")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file") from None
    except tarfile.TarError as e:
        raise FormatError(f"{path}: not a docker-archive tar ({e})") from None
    with tar:
        try:
            mf = tar.extractfile(_member(tar, "manifest.json", path))
            assert mf is not None
            entries = json.loads(mf.read())
        except (ValueError, FormatError) as e:
            raise FormatError(f"{path}: no valid manifest.json ({e})") from None
        if not isinstance(entries, list) or not entries:
            raise FormatError(f"{path}: manifest.json lists no images")
        entry: dict[str, Any]
        if ref is not None:
            matches = [
                e
                for e in entries
                if isinstance(e, dict)
                and any(t == ref or t.endswith("/" + ref) for t in e.get("RepoTags") or [])
            ]
            if not matches:
                raise NotFoundError(f"{path}: no image tagged {ref!r}")
            entry = matches[0]
        else:
            if len(entries) > 1:
                raise UsageError(f"{path} holds {len(entries)} images: name one (FILE:NAME:TAG)")
            entry = entries[0]
        try:
            config_name = str(entry["Config"])
            layer_names = [str(n) for n in entry["Layers"]]
        except (KeyError, TypeError):
            raise FormatError(f"{path}: manifest.json entry without Config/Layers") from None
        cinfo = _member(tar, config_name, path)
        cf = tar.extractfile(cinfo)
        assert cf is not None
        config_data = cf.read()
        diff_ids = _config_diff_ids(config_data, config_name, path)
        if len(diff_ids) != len(layer_names):
            raise FormatError(
                f"{path}: manifest.json lists {len(layer_names)} layer(s), the config "
                f"{len(diff_ids)} diff_id(s)"
            )
        linfos = [_member(tar, n, path) for n in layer_names]
        verbatim = _archived_manifest(tar, path, _sha256(config_data))
    if verbatim is not None:
        return verbatim
    image = LocalImage(b"", DOCKER_MANIFEST, [], {})
    try:
        tmp = tempfile.mkdtemp(prefix="stargzfs-push-", dir=workdir)
        image._cleanup.callback(shutil.rmtree, tmp, True)
        config_digest = _sha256(config_data)
        config_path = os.path.join(tmp, "config.json")
        Path(config_path).write_bytes(config_data)
        image.blobs[config_digest] = LocalBlob(
            config_digest, len(config_data), DOCKER_CONFIG, config_path
        )

        def prepare(i: int, info: tarfile.TarInfo) -> LocalBlob:
            with open(path, "rb") as f:
                f.seek(info.offset_data)
                head = f.read(4)
            if head[:2] == _GZIP_MAGIC:
                # pushed as it is, but only once its content is what the config says
                digest, diff_id = _hash_gzip_range(path, info.offset_data, info.size)
                if diff_id != diff_ids[i]:
                    raise DigestMismatchError(
                        f"{path}: layer {i} ({layer_names[i]}) against the config's diff_id",
                        diff_ids[i],
                        diff_id,
                    )
                return LocalBlob(digest, info.size, DOCKER_LAYER_GZIP, path, info.offset_data)
            if head == _ZSTD_MAGIC:
                raise UnsupportedError(
                    f"{path}: layer {i} ({layer_names[i]}) is zstd-compressed: a docker-archive "
                    "without index.json holds gzip or uncompressed layers"
                )
            out = os.path.join(tmp, f"layer{i}.tar.gz")
            src = LocalBlob("", info.size, "", path, info.offset_data).open()
            with src:
                digest, size, diff_id = _gzip_file(src, out)
            if diff_id != diff_ids[i]:
                raise DigestMismatchError(
                    f"{path}: layer {i} ({layer_names[i]}) against the config's diff_id",
                    diff_ids[i],
                    diff_id,
                )
            return LocalBlob(digest, size, DOCKER_LAYER_GZIP, out)

        with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
            layers = list(pool.map(prepare, range(len(linfos)), linfos))
        for layer in layers:
            image.blobs[layer.digest] = layer
        manifest = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {
                "mediaType": DOCKER_CONFIG,
                "size": len(config_data),
                "digest": config_digest,
            },
            "layers": [
                {"mediaType": b.media_type, "size": b.size, "digest": b.digest} for b in layers
            ],
        }
        data = json.dumps(manifest, indent=3).encode()
        lm = _manifest(data, DOCKER_MANIFEST)
        image.top_data = data
        image.manifests = [lm]
        return image
    except BaseException:
        image.close()
        raise


# --------------------------------------------------------------------------- rootfs directories


def _pack_dir(root: str, out: Any) -> None:
    def reset(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uname = info.gname = ""
        return info

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            if rel != ".":
                tar.add(dirpath, arcname=rel, recursive=False, filter=reset)
            for name in sorted(
                filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            ):
                full = os.path.join(dirpath, name)
                arc = name if rel == "." else f"{rel}/{name}"
                tar.add(full, arcname=arc, recursive=False, filter=reset)
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]


def open_rootfs_dir(path: str, *, workdir: str | None = None) -> LocalImage:
    if not os.path.isdir(path):
        raise NotFoundError(f"{path}: not a directory")
    image = LocalImage(b"", OCI_MANIFEST, [], {})
    try:
        tmp = tempfile.mkdtemp(prefix="stargzfs-push-", dir=workdir)
        image._cleanup.callback(shutil.rmtree, tmp, True)
        tar_path = os.path.join(tmp, "layer.tar")
        with open(tar_path, "wb") as f:
            _pack_dir(path, f)
        gz_path = os.path.join(tmp, "layer.tar.gz")
        with open(tar_path, "rb") as src:
            digest, size, diff_id = _gzip_file(src, gz_path)
        os.unlink(tar_path)
        host = Platform.host()
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        config: dict[str, Any] = {
            "created": now,
            "architecture": host.architecture,
            "os": host.os,
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": now, "created_by": f"stargzfs push dir-rootfs:{path}"}],
        }
        if host.variant:
            config["variant"] = host.variant
        config_data = json.dumps(config, separators=(",", ":")).encode()
        config_digest = _sha256(config_data)
        config_path = os.path.join(tmp, "config.json")
        Path(config_path).write_bytes(config_data)
        image.blobs[config_digest] = LocalBlob(
            config_digest, len(config_data), OCI_CONFIG, config_path
        )
        image.blobs[digest] = LocalBlob(digest, size, OCI_LAYER_GZIP, gz_path)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_data)},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": size}],
        }
        data = json.dumps(manifest, separators=(",", ":")).encode()
        image.top_data = data
        image.manifests = [_manifest(data, OCI_MANIFEST)]
        return image
    except BaseException:
        image.close()
        raise
