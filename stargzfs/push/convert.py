"""Convert a whole image to eStargz (or stargz-snapshotter's zstd:chunked).

``SRC`` is a registry reference, ``oci:DIR[:TAG]`` or ``docker-archive:FILE``; ``DST`` a
registry reference, ``oci:DIR[:TAG]`` or ``docker-archive:FILE[:NAME:TAG]`` (one image; the
archive is also an OCI layout, as ``docker save`` writes since Docker 25, so that pushing it
keeps the manifest and its eStargz annotations). For each image manifest (one platform, or every
platform of an index with ``all_platforms``):

* each layer is converted with :func:`stargzfs.convert.convert_layer`; the new descriptor gets
  the gzip layer media type of the manifest's family and the writer's annotations
  (``containerd.io/snapshot/stargz/toc.digest``, ``io.containers.estargz.uncompressed-size``);
  layers that already carry a TOC digest annotation are kept as they are unless ``force``;
* ``prioritized`` paths go first (before the landmark) in every layer that contains them;
* the config's ``rootfs.diff_ids`` follow the new layers (an eStargz blob's uncompressed
  stream has the TOC and landmark entries, so its diff_id differs); history stays as it is;
* an index is rewritten with the converted manifests (non-image entries such as attestations
  are dropped: they refer to the old digests).

Blobs are staged in a temporary directory, one layer at a time per job, never in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio

from ..errors import FormatError, UsageError
from ..image import (
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    INDEX_MEDIA_TYPES,
    MAX_CONFIG_SIZE,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    TOC_DIGEST,
    Descriptor,
    Index,
    Manifest,
    parse_manifest,
    select_platform,
)
from ..reference import Platform, Reference, Repository, parse_digest, parse_reference
from ..registry import RegistryClient
from .sources import LocalImage, open_source
from .upload import ChunkSource, Uploader, file_chunks

__all__ = ["ConvertOptions", "ConvertReport", "convert_image"]

log = logging.getLogger(__name__)

ESTARGZ_ANNOTATIONS = (
    TOC_DIGEST,
    "io.containers.estargz.uncompressed-size",
    "io.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-position",
)


@dataclass
class ConvertOptions:
    chunk_size: int | None = None
    prioritized: Sequence[str] = ()
    platform: Platform | None = None
    all_platforms: bool = False
    force: bool = False
    jobs: int = 3
    layer_format: str = "estargz"
    upload_chunk_size: int | None = None


@dataclass
class ConvertReport:
    converted: int = 0
    kept: int = 0
    manifests: list[str] = field(default_factory=list)
    prioritized_found: set[str] = field(default_factory=set)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- sources


class _Source:
    """Where manifests and blobs are read from."""

    repo: Repository | None = None

    async def top(self) -> tuple[bytes, str]:
        raise NotImplementedError

    async def manifest(self, digest: str) -> bytes:
        raise NotImplementedError

    async def blob_to_file(self, digest: str, path: str) -> None:
        raise NotImplementedError

    def chunks(self, digest: str) -> ChunkSource:
        raise NotImplementedError


class _RegistrySource(_Source):
    def __init__(self, client: RegistryClient, ref: Reference) -> None:
        self.client = client
        self.ref = ref
        self.repo = ref.repo

    async def top(self) -> tuple[bytes, str]:
        resp = await self.client.get_manifest(self.ref)
        return resp.data, resp.media_type

    async def manifest(self, digest: str) -> bytes:
        return (await self.client.get_manifest(self.ref.with_digest(digest))).data

    async def blob_to_file(self, digest: str, path: str) -> None:
        f = await trio.to_thread.run_sync(open, path, "wb")
        try:
            async with aclosing(self.client.stream_blob(self.ref.repo, digest)) as chunks:
                async for chunk in chunks:
                    await trio.to_thread.run_sync(f.write, chunk)
        finally:
            f.close()

    def chunks(self, digest: str) -> ChunkSource:
        client, repo = self.client, self.ref.repo

        async def gen(offset: int) -> Any:
            stream = client.stream_blob(repo, digest, offset=offset, verify=offset == 0)
            async with aclosing(stream) as it:
                async for chunk in it:
                    yield chunk

        return gen


class _LocalSource(_Source):
    def __init__(self, image: LocalImage) -> None:
        self.image = image
        self.by_digest = {m.digest: m.data for m in image.manifests}

    async def top(self) -> tuple[bytes, str]:
        return self.image.top_data, self.image.top_media_type

    async def manifest(self, digest: str) -> bytes:
        return self.by_digest[digest]

    async def blob_to_file(self, digest: str, path: str) -> None:
        blob = self.image.blobs[digest]

        def copy() -> None:
            with blob.open() as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)

        await trio.to_thread.run_sync(copy)

    def chunks(self, digest: str) -> ChunkSource:
        return self.image.blobs[digest].chunks()


# --------------------------------------------------------------------------- destinations


class _Dest:
    async def put_blob(
        self, digest: str, size: int, path: str | None, source: _Source | None
    ) -> None:
        raise NotImplementedError

    async def put_manifest(self, data: bytes, media_type: str, tag: bool) -> str:
        raise NotImplementedError

    async def finish(self) -> None:
        pass


class _RegistryDest(_Dest):
    def __init__(self, uploader: Uploader, ref: Reference) -> None:
        self.uploader = uploader
        self.ref = ref

    async def put_blob(
        self, digest: str, size: int, path: str | None, source: _Source | None
    ) -> None:
        if path is not None:
            await self.uploader.push_blob(self.ref.repo, digest, size, file_chunks(path))
            return
        assert source is not None
        await self.uploader.push_blob(
            self.ref.repo, digest, size, source.chunks(digest), mount_from=source.repo
        )

    async def put_manifest(self, data: bytes, media_type: str, tag: bool) -> str:
        ref = self.ref if tag else self.ref.with_digest(_sha256(data))
        return await self.uploader.put_manifest(ref, data, media_type)


class _OciDest(_Dest):
    """Writes an OCI layout (created if missing); the top manifest is tagged ``tag``."""

    def __init__(self, root: Path, tag: str | None) -> None:
        self.root = root
        self.tag = tag or "latest"
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        layout = root / "oci-layout"
        if not layout.exists():
            layout.write_text('{"imageLayoutVersion":"1.0.0"}')
        self.top: dict[str, Any] | None = None

    def _path(self, digest: str) -> Path:
        algorithm, hexdigest = parse_digest(digest)
        (self.root / "blobs" / algorithm).mkdir(parents=True, exist_ok=True)
        return self.root / "blobs" / algorithm / hexdigest

    async def put_blob(
        self, digest: str, size: int, path: str | None, source: _Source | None
    ) -> None:
        target = self._path(digest)
        if target.exists() and target.stat().st_size == size:
            return
        tmp = str(target) + ".partial"
        if path is not None:
            await trio.to_thread.run_sync(shutil.copyfile, path, tmp)
        else:
            assert source is not None
            await source.blob_to_file(digest, tmp)
        os.replace(tmp, target)

    async def put_manifest(self, data: bytes, media_type: str, tag: bool) -> str:
        digest = _sha256(data)
        self._path(digest).write_bytes(data)
        if tag:
            self.top = {
                "mediaType": media_type,
                "digest": digest,
                "size": len(data),
                "annotations": {"org.opencontainers.image.ref.name": self.tag},
            }
        return digest

    async def finish(self) -> None:
        index_path = self.root / "index.json"
        entries: list[Any] = []
        if index_path.exists():
            try:
                entries = json.loads(index_path.read_text()).get("manifests", [])
            except ValueError:
                raise FormatError(f"{index_path}: not valid JSON") from None
        entries = [
            e
            for e in entries
            if e.get("annotations", {}).get("org.opencontainers.image.ref.name") != self.tag
        ]
        if self.top is not None:
            entries.append(self.top)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        index_path.write_text(json.dumps(index, indent=2))


class _DockerArchiveDest(_Dest):
    """Writes a ``docker load``-able archive that is also an OCI layout (as ``docker save``
    does since Docker 25): ``manifest.json`` for docker and skopeo, ``index.json`` and the
    manifest blob so the layer annotations (the eStargz TOC digests) survive a push."""

    def __init__(self, path: str, name: str | None, workdir: str) -> None:
        self.path = path
        self.name = name
        self.dir = Path(workdir) / "archive"
        (self.dir / "blobs" / "sha256").mkdir(parents=True)
        self.top: tuple[bytes, str] | None = None

    def _blob(self, digest: str) -> Path:
        _, hexdigest = parse_digest(digest)
        return self.dir / "blobs" / "sha256" / hexdigest

    async def put_blob(
        self, digest: str, size: int, path: str | None, source: _Source | None
    ) -> None:
        target = self._blob(digest)
        if target.exists():
            return
        if path is not None:
            await trio.to_thread.run_sync(shutil.copyfile, path, target)
        else:
            assert source is not None
            await source.blob_to_file(digest, str(target))

    async def put_manifest(self, data: bytes, media_type: str, tag: bool) -> str:
        if not tag:
            raise UsageError("a docker-archive holds one image: convert one --platform")
        self._blob(_sha256(data)).write_bytes(data)
        self.top = (data, media_type)
        return _sha256(data)

    async def finish(self) -> None:
        assert self.top is not None
        await trio.to_thread.run_sync(self._write)

    def _write(self) -> None:
        assert self.top is not None
        data, media_type = self.top
        doc = parse_manifest(data, media_type)
        assert isinstance(doc, Manifest)

        def rel(digest: str) -> str:
            return "blobs/sha256/" + parse_digest(digest)[1]

        annotations = {}
        if self.name:
            annotations["io.containerd.image.name"] = self.name
            annotations["org.opencontainers.image.ref.name"] = self.name.rpartition(":")[2]
        top: dict[str, Any] = {
            "mediaType": media_type,
            "digest": _sha256(data),
            "size": len(data),
        }
        if annotations:
            top["annotations"] = annotations
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top]}
        entry = {
            "Config": rel(doc.config.digest),
            "RepoTags": [self.name] if self.name else [],
            "Layers": [rel(d.digest) for d in doc.layers],
        }
        (self.dir / "index.json").write_text(json.dumps(index))
        (self.dir / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        (self.dir / "manifest.json").write_text(json.dumps([entry]))
        tmp = f"{self.path}.partial"
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(self.dir / "oci-layout", "oci-layout")
            for blob in sorted((self.dir / "blobs" / "sha256").iterdir()):
                tar.add(blob, f"blobs/sha256/{blob.name}")
            tar.add(self.dir / "index.json", "index.json")
            tar.add(self.dir / "manifest.json", "manifest.json")
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------- conversion


def _layer_names(path: str) -> set[str]:
    """Clean names of the entries in a layer (tar, tar.gz or tar.zst)."""
    from ..convert import open_layer_stream

    names: set[str] = set()
    with open(path, "rb") as f:
        stream = open_layer_stream(f)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                for info in tar:
                    names.add(posixpath.normpath("/" + info.name).lstrip("/"))
        except tarfile.TarError as e:
            raise FormatError(f"layer is not a valid tar: {e}") from None
    return names


def _clean(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")


class _Converter:
    def __init__(
        self,
        source: _Source,
        dest: _Dest,
        opts: ConvertOptions,
        workdir: str,
        out: TextIO | None,
    ) -> None:
        self.source = source
        self.dest = dest
        self.opts = opts
        self.workdir = workdir
        self.out = out
        self.limiter = trio.CapacityLimiter(max(1, opts.jobs))
        self.report = ConvertReport()
        # digest of a source layer → (descriptor fields, diff_id): convert each blob once.
        self._done: dict[str, tuple[dict[str, Any], str]] = {}
        self._locks: dict[str, trio.Lock] = {}

    def _say(self, text: str) -> None:
        if self.out is not None:
            print(text, file=self.out, flush=True)

    async def layer(self, desc: Descriptor, gzip_type: str) -> tuple[dict[str, Any], str | None]:
        """The new descriptor for a layer, and its new diff_id (``None``: unchanged)."""
        lock = self._locks.setdefault(desc.digest, trio.Lock())
        async with lock:
            done = self._done.get(desc.digest)
            if done is not None:
                return dict(done[0]), done[1]
            async with self.limiter:
                result = await self._layer(desc, gzip_type)
            return result

    async def _layer(self, desc: Descriptor, gzip_type: str) -> tuple[dict[str, Any], str | None]:
        from ..convert import convert_layer
        from ..formats.estargz_writer import DEFAULT_CHUNK_SIZE

        keep = (
            desc.toc_digest is not None
            and desc.compression in ("gzip", "zstd")
            and not self.opts.force
        )
        if keep:
            await self.dest.put_blob(desc.digest, desc.size, None, self.source)
            self.report.kept += 1
            self._say(f"    kept  {desc.digest} (already eStargz)")
            return _descriptor_dict(desc), None
        src_path = os.path.join(self.workdir, desc.digest.replace(":", "-") + ".src")
        dst_path = os.path.join(self.workdir, desc.digest.replace(":", "-") + ".esgz")
        await self.source.blob_to_file(desc.digest, src_path)
        prioritized: list[str] = []
        if self.opts.prioritized:
            names = await trio.to_thread.run_sync(_layer_names, src_path)
            prioritized = [p for p in self.opts.prioritized if _clean(p) in names]
            self.report.prioritized_found.update(_clean(p) for p in prioritized)

        def run() -> Any:
            with open(src_path, "rb") as src, open(dst_path, "wb") as dst:
                return convert_layer(
                    src,
                    dst,
                    chunk_size=self.opts.chunk_size or DEFAULT_CHUNK_SIZE,
                    prioritized=prioritized,
                    layer_format=self.opts.layer_format,
                )

        result = await trio.to_thread.run_sync(run)
        os.unlink(src_path)
        await self.dest.put_blob(result.blob_digest, result.blob_size, dst_path, None)
        os.unlink(dst_path)
        media_type = gzip_type if self.opts.layer_format == "estargz" else result.media_type
        annotations = {k: v for k, v in desc.annotations.items() if k not in ESTARGZ_ANNOTATIONS}
        annotations.update(result.annotations)
        new = {
            "mediaType": media_type,
            "digest": result.blob_digest,
            "size": result.blob_size,
            "annotations": annotations,
        }
        self.report.converted += 1
        self._say(
            f"converted {desc.digest} → {result.blob_digest} "
            f"({len(prioritized)} prioritized file(s))"
        )
        self._done[desc.digest] = (new, result.diff_id)
        return dict(new), result.diff_id

    async def manifest(self, data: bytes, tag: bool) -> tuple[bytes, str]:
        """Convert one image manifest; returns (new manifest bytes, media type)."""
        doc = parse_manifest(data)
        if not isinstance(doc, Manifest):
            raise FormatError("expected an image manifest")
        raw = json.loads(data)
        gzip_type = DOCKER_LAYER_GZIP if doc.media_type == DOCKER_MANIFEST else OCI_LAYER_GZIP
        # The config first: a bad one fails before any layer work.
        cfg_path = os.path.join(self.workdir, doc.config.digest.replace(":", "-") + ".cfg")
        await self.source.blob_to_file(doc.config.digest, cfg_path)
        config_bytes = Path(cfg_path).read_bytes()
        os.unlink(cfg_path)
        if len(config_bytes) > MAX_CONFIG_SIZE or _sha256(config_bytes) != doc.config.digest:
            raise FormatError(f"config {doc.config.digest} does not match its digest")
        config = json.loads(config_bytes)
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        original = list(diff_ids)
        if len(diff_ids) != len(doc.layers):
            raise FormatError(f"config lists {len(diff_ids)} diff_ids for {len(doc.layers)} layers")
        results: list[tuple[dict[str, Any], str | None] | None] = [None] * len(doc.layers)

        async def one(i: int, desc: Descriptor) -> None:
            results[i] = await self.layer(desc, gzip_type)

        async with trio.open_nursery() as nursery:
            for i, desc in enumerate(doc.layers):
                nursery.start_soon(one, i, desc)
        layers: list[dict[str, Any]] = []
        for i, r in enumerate(results):
            assert r is not None
            layers.append(r[0])
            if r[1] is not None:
                diff_ids[i] = r[1]
        if diff_ids == original:
            new_config = config_bytes  # nothing changed: keep the bytes (and the digest)
        else:
            config["rootfs"]["diff_ids"] = diff_ids
            new_config = _dumps(config)
        cfg_tmp = os.path.join(self.workdir, "config.json")
        Path(cfg_tmp).write_bytes(new_config)
        await self.dest.put_blob(_sha256(new_config), len(new_config), cfg_tmp, None)
        raw["config"] = dict(raw["config"], digest=_sha256(new_config), size=len(new_config))
        raw["layers"] = layers
        media_type = doc.media_type
        if self.opts.layer_format != "estargz" and media_type == DOCKER_MANIFEST:
            # zstd layers have no Docker schema 2 media type: the image becomes OCI.
            media_type = raw["mediaType"] = OCI_MANIFEST
            raw["config"]["mediaType"] = OCI_CONFIG
            for layer in layers:
                if layer["mediaType"] == DOCKER_LAYER_GZIP:
                    layer["mediaType"] = OCI_LAYER_GZIP
        new_data = json.dumps(raw, indent=2).encode()
        digest = await self.dest.put_manifest(new_data, media_type, tag)
        self.report.manifests.append(digest)
        return new_data, media_type


def _descriptor_dict(desc: Descriptor) -> dict[str, Any]:
    d: dict[str, Any] = {"mediaType": desc.media_type, "digest": desc.digest, "size": desc.size}
    if desc.annotations:
        d["annotations"] = dict(desc.annotations)
    if desc.urls:
        d["urls"] = list(desc.urls)
    return d


def _is_registry(text: str) -> bool:
    return not any(text.startswith(p) for p in ("oci:", "docker-archive:", "dir-rootfs:")) and (
        not os.path.exists(text)
    )


async def convert_image(
    client: RegistryClient,
    src: str,
    dst: str,
    opts: ConvertOptions,
    *,
    out: TextIO | None = None,
    workdir: str | None = None,
) -> tuple[str, ConvertReport]:
    """Convert ``src`` and write it to ``dst``; returns (digest of the top manifest, report)."""
    tmp = tempfile.mkdtemp(prefix="stargzfs-convert-", dir=workdir)
    try:
        return await _convert_into(client, src, dst, opts, out, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _convert_into(
    client: RegistryClient, src: str, dst: str, opts: ConvertOptions, out: TextIO | None, tmp: str
) -> tuple[str, ConvertReport]:
    from .upload import DEFAULT_CHUNK_SIZE

    dest: _Dest
    if dst.startswith("oci:"):
        path, _, tag = dst[4:].partition(":")
        dest = _OciDest(Path(path), tag or None)
    elif dst.startswith("docker-archive:"):
        if opts.all_platforms:
            raise UsageError("a docker-archive holds one image: convert one --platform")
        path, _, name = dst[len("docker-archive:") :].partition(":")
        if not path:
            raise UsageError(f"{dst!r}: missing path")
        dest = _DockerArchiveDest(path, name or None, tmp)
    elif _is_registry(dst):
        ref = parse_reference(dst)
        if ref.digest is not None:
            raise UsageError(f"convert to a tag, not a digest: {dst}")
        uploader = Uploader(client, chunk_size=opts.upload_chunk_size or DEFAULT_CHUNK_SIZE)
        dest = _RegistryDest(uploader, ref)
    else:
        raise UsageError(
            f"{dst!r}: the destination must be a registry reference, oci:DIR or docker-archive:FILE"
        )
    local: LocalImage | None = None
    source: _Source
    if _is_registry(src):
        source = _RegistrySource(client, parse_reference(src))
    else:
        if src.startswith("dir-rootfs:"):
            raise UsageError("convert reads registry images, oci:DIR or docker-archive:FILE")
        local = await trio.to_thread.run_sync(lambda: open_source(src, jobs=opts.jobs))
        source = _LocalSource(local)
    try:
        conv = _Converter(source, dest, opts, tmp, out)
        top, media_type = await source.top()
        doc = parse_manifest(top, media_type)
        if isinstance(doc, Index):
            digest = await _convert_index(conv, source, doc, top, opts)
        else:
            new, _ = await conv.manifest(top, tag=True)
            digest = _sha256(new)
        await dest.finish()
        missing = [p for p in opts.prioritized if _clean(p) not in conv.report.prioritized_found]
        if missing and conv.report.converted:
            conv._say(f"warning: not found in any converted layer: {', '.join(missing)}")
        return digest, conv.report
    finally:
        if local is not None:
            local.close()


async def _convert_index(
    conv: _Converter, source: _Source, index: Index, raw_bytes: bytes, opts: ConvertOptions
) -> str:
    if not opts.all_platforms:
        desc = select_platform(index, opts.platform or Platform.host())
        if desc.media_type in INDEX_MEDIA_TYPES:
            raise UsageError("nested indexes are not supported")
        new, _ = await conv.manifest(await source.manifest(desc.digest), tag=True)
        return _sha256(new)
    raw = json.loads(raw_bytes)
    entries: list[dict[str, Any]] = []
    images = {d.digest for d in index.images() if d.media_type not in INDEX_MEDIA_TYPES}
    for entry in raw.get("manifests", []):
        if entry.get("digest") not in images:
            continue
        new, media_type = await conv.manifest(await source.manifest(entry["digest"]), tag=False)
        entries.append(dict(entry, digest=_sha256(new), size=len(new), mediaType=media_type))
    if not entries:
        raise UsageError("the index lists no image manifests to convert")
    raw["manifests"] = entries
    data = json.dumps(raw, indent=2).encode()
    return await conv.dest.put_manifest(data, index.media_type, tag=True)
