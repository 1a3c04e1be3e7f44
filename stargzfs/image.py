"""The image model: descriptors, manifests, indexes, configs, and resolving a reference.

Parsing is strict where a mistake would mislead (digests, sizes, media types) and says
exactly what is wrong and where (``manifest: layers[1].size: expected a non-negative
integer``); unknown fields are ignored, as the OCI spec requires.

:func:`resolve_image` walks reference → (index → platform) → manifest → config.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from .errors import FormatError, NotFoundError, UnsupportedError, UsageError
from .reference import Platform, Reference, parse_digest
from .registry.client import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST

if TYPE_CHECKING:
    from .registry.client import RegistryClient

__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_FOREIGN_LAYER_GZIP",
    "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "ESTARGZ_UNCOMPRESSED_SIZE",
    "IMAGE_MEDIA_TYPES",
    "INDEX_MEDIA_TYPES",
    "LAYER_MEDIA_TYPES",
    "LEGACY_ZSTD_CHUNKED_MANIFEST_CHECKSUM",
    "LEGACY_ZSTD_CHUNKED_MANIFEST_POSITION",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_TAR",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "REF_NAME",
    "TOC_DIGEST",
    "ZSTD_CHUNKED_MANIFEST_CHECKSUM",
    "ZSTD_CHUNKED_MANIFEST_POSITION",
    "ZSTD_CHUNKED_TARSPLIT_POSITION",
    "Descriptor",
    "HistoryEntry",
    "ImageConfig",
    "Index",
    "Manifest",
    "ResolvedImage",
    "layer_compression",
    "parse_config",
    "parse_manifest",
    "resolve_image",
    "select_platform",
]

log = logging.getLogger(__name__)

# ---- media types (OCI image-spec and Docker's schema 2)
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
IMAGE_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
CONFIG_MEDIA_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
_LAYER_COMPRESSION: dict[str, Literal["none", "gzip", "zstd"]] = {
    OCI_LAYER_TAR: "none",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_FOREIGN_LAYER_GZIP: "gzip",
    # Deprecated by image-spec 1.1 but still found in the wild.
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
}
LAYER_MEDIA_TYPES = frozenset(_LAYER_COMPRESSION)
_SCHEMA1 = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)

# ---- annotations
REF_NAME = "org.opencontainers.image.ref.name"
# sha256 of the uncompressed TOC JSON (eStargz; also set by stargz-snapshotter's zstd:chunked).
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ESTARGZ_UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
# containers/storage's zstd:chunked (podman, skopeo): 64-byte footer, checksum of the
# *compressed* TOC, positions "offset:length:uncompressed_length[:type]".
ZSTD_CHUNKED_MANIFEST_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"
ZSTD_CHUNKED_MANIFEST_POSITION = "io.github.containers.zstd-chunked.manifest-position"
ZSTD_CHUNKED_TARSPLIT_POSITION = "io.github.containers.zstd-chunked.tarsplit-position"
# stargz-snapshotter's (ctr-remote --zstdchunked) older zstd:chunked: 40-byte footer.
LEGACY_ZSTD_CHUNKED_MANIFEST_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
LEGACY_ZSTD_CHUNKED_MANIFEST_POSITION = "io.containers.zstd-chunked.manifest-position"
# buildx attestation manifests in an index: not runnable images.
_REFERENCE_TYPE = "vnd.docker.reference.type"

MAX_CONFIG_SIZE = 8 * 1024 * 1024
_MAX_INDEX_DEPTH = 4


def layer_compression(media_type: str) -> Literal["none", "gzip", "zstd"]:
    """How a layer blob is compressed; :class:`UnsupportedError` for non-layer types."""
    try:
        return _LAYER_COMPRESSION[media_type]
    except KeyError:
        raise UnsupportedError(f"unsupported layer media type {media_type!r}") from None


# --------------------------------------------------------------------------- parsing help


class _Doc:
    """Typed access into a JSON object, with the path in every error message."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        self.data = data
        self.path = path

    def _fail(self, key: str, expected: str, value: object) -> FormatError:
        shown = json.dumps(value)[:60] if value is not None else "nothing"
        return FormatError(f"{self.path}.{key}: expected {expected}, got {shown}")

    def opt_str(self, key: str, *, required: bool = False) -> str | None:
        value = self.data.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or (required and not value):
            raise self._fail(key, "a string", value)
        return value

    def req_str(self, key: str) -> str:
        value = self.opt_str(key, required=True)
        assert value is not None
        return value

    def size(self, key: str) -> int:
        value = self.data.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self._fail(key, "a non-negative integer", value)
        return value

    def obj(self, key: str, *, required: bool = False) -> _Doc | None:
        value = self.data.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, dict):
            raise self._fail(key, "an object", value)
        return _Doc(value, f"{self.path}.{key}")

    def array(self, key: str, *, required: bool = False) -> list[Any]:
        value = self.data.get(key)
        if value is None and not required:
            return []
        if not isinstance(value, list):
            raise self._fail(key, "a list", value)
        return value

    def str_list(self, key: str) -> tuple[str, ...] | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._fail(key, "a list of strings", value)
        return tuple(value)

    def str_map(self, key: str) -> dict[str, str]:
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self._fail(key, "an object of strings", value)
        return dict(value)

    def digest(self, key: str) -> str:
        value = self.req_str(key)
        try:
            parse_digest(value)
        except UsageError:
            raise self._fail(key, "a digest like sha256:<64 hex>", value) from None
        return value


def _load_json(data: bytes, what: str) -> _Doc:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: expected a JSON object, got {type(doc).__name__}")
    return _Doc(doc, what)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Descriptor:
    """A pointer to content: media type, digest, size, and optional metadata."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()
    artifact_type: str | None = None

    @property
    def compression(self) -> Literal["none", "gzip", "zstd"] | None:
        """Layer compression, or ``None`` if this is not a known layer media type."""
        return _LAYER_COMPRESSION.get(self.media_type)

    @property
    def toc_digest(self) -> str | None:
        """The eStargz TOC digest annotation (what makes a layer verifiable lazily)."""
        return self.annotations.get(TOC_DIGEST)

    @property
    def uncompressed_size(self) -> int | None:
        value = self.annotations.get(ESTARGZ_UNCOMPRESSED_SIZE)
        return int(value) if value is not None and value.isdigit() else None

    @property
    def ref_name(self) -> str | None:
        return self.annotations.get(REF_NAME)


@dataclass(frozen=True)
class Manifest:
    """An image manifest: one config and the layers, bottom first."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    subject: Descriptor | None = None
    artifact_type: str | None = None
    raw: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True)
class Index:
    """An image index / manifest list: one manifest per platform (or other artifacts)."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    raw: bytes = field(default=b"", repr=False, compare=False)

    def images(self) -> tuple[Descriptor, ...]:
        """Entries that are runnable images (not attestations or other artifacts)."""
        return tuple(
            d
            for d in self.manifests
            if (d.media_type in IMAGE_MEDIA_TYPES or d.media_type in INDEX_MEDIA_TYPES)
            and _REFERENCE_TYPE not in d.annotations
        )

    def platforms(self) -> list[Platform]:
        return [d.platform for d in self.images() if d.platform is not None]


@dataclass(frozen=True)
class HistoryEntry:
    created: str | None = None
    created_by: str | None = None
    author: str | None = None
    comment: str | None = None
    empty_layer: bool = False


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config stargzfs uses (``raw`` keeps everything)."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    created: str | None = None
    author: str | None = None
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    working_dir: str = ""
    user: str = ""
    labels: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    stop_signal: str | None = None
    diff_ids: tuple[str, ...] = ()
    history: tuple[HistoryEntry, ...] = ()
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def platform(self) -> Platform:
        return Platform(self.os, self.architecture, self.variant, self.os_version)

    @property
    def created_at(self) -> datetime | None:
        if not self.created:
            return None
        try:
            return datetime.fromisoformat(self.created)
        except ValueError:
            return None


@dataclass(frozen=True)
class ResolvedImage:
    """A reference resolved to one platform's manifest and config."""

    ref: Reference
    digest: str  # of the manifest
    manifest: Manifest
    config: ImageConfig
    index: Index | None = None
    index_digest: str | None = None

    @property
    def pinned(self) -> Reference:
        """The reference pinned to the manifest digest (reproducible)."""
        return self.ref.with_digest(self.digest)

    @property
    def platform(self) -> Platform:
        return self.config.platform


# --------------------------------------------------------------------------- parsers


def _parse_platform(doc: _Doc) -> Platform:
    return Platform(
        doc.req_str("os"),
        doc.req_str("architecture"),
        doc.opt_str("variant") or "",
        doc.opt_str("os.version") or "",
    )


def _parse_descriptor(value: object, path: str) -> Descriptor:
    if not isinstance(value, dict):
        raise FormatError(f"{path}: expected an object, got {json.dumps(value)[:60]}")
    doc = _Doc(value, path)
    platform_doc = doc.obj("platform")
    return Descriptor(
        media_type=doc.req_str("mediaType"),
        digest=doc.digest("digest"),
        size=doc.size("size"),
        annotations=doc.str_map("annotations"),
        platform=_parse_platform(platform_doc) if platform_doc is not None else None,
        urls=doc.str_list("urls") or (),
        artifact_type=doc.opt_str("artifactType"),
    )


def _kind(doc: _Doc, media_type: str | None) -> str:
    declared = doc.opt_str("mediaType")
    if declared and media_type and declared != media_type:
        # The body's own field is what its digest vouches for; a header is just a header.
        log.debug("manifest says %s, served as %s", declared, media_type)
    kind = declared or media_type or ""
    if kind in _SCHEMA1 or doc.data.get("schemaVersion") == 1:
        raise UnsupportedError(
            "Docker schema 1 manifests are not supported (deprecated since 2017): re-push the "
            "image with a current tool"
        )
    if kind in INDEX_MEDIA_TYPES or kind in IMAGE_MEDIA_TYPES:
        return kind
    # No usable media type: OCI allows omitting it; decide by shape.
    if "manifests" in doc.data:
        return OCI_INDEX
    if "config" in doc.data or "layers" in doc.data:
        return OCI_MANIFEST
    raise FormatError(f"manifest: unknown media type {kind!r} and no layers or manifests")


def parse_manifest(data: bytes, media_type: str | None = None) -> Manifest | Index:
    """Parse an image manifest or an index; ``media_type`` is the served Content-Type."""
    doc = _load_json(data, "manifest")
    kind = _kind(doc, media_type)
    version = doc.data.get("schemaVersion")
    if version != 2:
        raise FormatError(f"manifest.schemaVersion: expected 2, got {json.dumps(version)}")
    if kind in INDEX_MEDIA_TYPES:
        entries = doc.array("manifests", required=True)
        return Index(
            media_type=kind,
            manifests=tuple(
                _parse_descriptor(e, f"manifest.manifests[{i}]") for i, e in enumerate(entries)
            ),
            annotations=doc.str_map("annotations"),
            raw=data,
        )
    if "config" not in doc.data:
        raise FormatError("manifest.config: missing")
    layers = doc.array("layers")
    subject = doc.data.get("subject")
    return Manifest(
        media_type=kind,
        config=_parse_descriptor(doc.data["config"], "manifest.config"),
        layers=tuple(_parse_descriptor(e, f"manifest.layers[{i}]") for i, e in enumerate(layers)),
        annotations=doc.str_map("annotations"),
        subject=_parse_descriptor(subject, "manifest.subject") if subject is not None else None,
        artifact_type=doc.opt_str("artifactType"),
        raw=data,
    )


def parse_config(data: bytes) -> ImageConfig:
    """Parse an image config (OCI or Docker; the two agree on these fields)."""
    doc = _load_json(data, "config")
    run = doc.obj("config") or _Doc({}, "config.config")
    rootfs = doc.obj("rootfs")
    diff_ids: tuple[str, ...] = ()
    if rootfs is not None:
        ids = rootfs.array("diff_ids")
        for i, value in enumerate(ids):
            if not isinstance(value, str):
                raise FormatError(f"config.rootfs.diff_ids[{i}]: expected a digest string")
            try:
                parse_digest(value)
            except UsageError:
                raise FormatError(
                    f"config.rootfs.diff_ids[{i}]: {value[:80]!r} is not a digest"
                ) from None
        diff_ids = tuple(ids)
    history: list[HistoryEntry] = []
    for i, item in enumerate(doc.array("history")):
        if not isinstance(item, dict):
            raise FormatError(f"config.history[{i}]: expected an object")
        h = _Doc(item, f"config.history[{i}]")
        empty = item.get("empty_layer", False)
        history.append(
            HistoryEntry(
                h.opt_str("created"),
                h.opt_str("created_by"),
                h.opt_str("author"),
                h.opt_str("comment"),
                empty is True,
            )
        )
    return ImageConfig(
        os=doc.req_str("os"),
        architecture=doc.req_str("architecture"),
        variant=doc.opt_str("variant") or "",
        os_version=doc.opt_str("os.version") or "",
        created=doc.opt_str("created"),
        author=doc.opt_str("author"),
        env=run.str_list("Env") or (),
        entrypoint=run.str_list("Entrypoint"),
        cmd=run.str_list("Cmd"),
        working_dir=run.opt_str("WorkingDir") or "",
        user=run.opt_str("User") or "",
        labels=run.str_map("Labels"),
        stop_signal=run.opt_str("StopSignal"),
        diff_ids=diff_ids,
        history=tuple(history),
        raw=data,
    )


# --------------------------------------------------------------------------- resolution


def select_platform(index: Index, platform: Platform, what: str = "image") -> Descriptor:
    """The index entry to run on ``platform`` (containerd's preference order).

    Entries without a platform match only when no entry matches by platform.

    :raises NotFoundError: listing the platforms the index has.
    """
    images = index.images()
    for candidate in platform.compatible():
        for desc in images:
            if desc.platform is not None and desc.platform.matches(candidate):
                return desc
    unplatformed = [d for d in images if d.platform is None]
    if unplatformed:
        return unplatformed[0]
    available = ", ".join(sorted({str(p) for p in index.platforms()})) or "none"
    raise NotFoundError(f"{what} has no manifest for platform {platform} (available: {available})")


async def resolve_image(
    client: RegistryClient, ref: Reference, platform: Platform | None = None
) -> ResolvedImage:
    """Fetch the manifest (through the index, for ``platform``, default the host's) and config.

    :raises NotFoundError: no such image, or no manifest for the platform.
    :raises UnsupportedError: schema 1, or an artifact that is not a container image.
    :raises FormatError, DigestMismatchError: malformed or tampered manifest or config.
    """
    platform = platform or Platform.host()
    response = await client.get_manifest(ref)
    doc = parse_manifest(response.data, response.media_type)
    top_index: Index | None = None
    index_digest: str | None = None
    depth = 0
    while isinstance(doc, Index):
        depth += 1
        if depth > _MAX_INDEX_DEPTH:
            raise FormatError(f"{ref}: indexes nested more than {_MAX_INDEX_DEPTH} deep")
        if top_index is None:
            top_index, index_digest = doc, response.digest
        desc = select_platform(doc, platform, str(ref))
        response = await client.get_manifest(ref.with_digest(desc.digest))
        if len(response.data) != desc.size:
            raise FormatError(
                f"{ref}: manifest {desc.digest} is {len(response.data)} bytes, "
                f"the index says {desc.size}"
            )
        doc = parse_manifest(response.data, response.media_type)
    manifest = doc
    if manifest.config.media_type not in CONFIG_MEDIA_TYPES:
        raise UnsupportedError(
            f"{ref} is not a container image (config media type {manifest.config.media_type})"
        )
    for i, layer in enumerate(manifest.layers):
        if layer.compression is None:
            raise UnsupportedError(
                f"{ref}: layer {i} has unsupported media type {layer.media_type!r}"
            )
    config_bytes = await client.get_blob(ref.repo, manifest.config.digest, max_size=MAX_CONFIG_SIZE)
    config = parse_config(config_bytes)
    if len(config.diff_ids) != len(manifest.layers):
        raise FormatError(
            f"{ref}: config lists {len(config.diff_ids)} diff_ids for {len(manifest.layers)} layers"
        )
    if top_index is None and not config.platform.matches(platform):
        log.warning("%s is for %s, not %s", ref, config.platform, platform)
    return ResolvedImage(ref, response.digest, manifest, config, top_index, index_digest)
