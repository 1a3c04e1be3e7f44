"""Open an image for reading: a registry reference or a local OCI layout (``oci:DIR[:TAG]``).

:func:`open_image` resolves the manifest and config (through an index, for the platform) and
returns an :class:`OpenedImage`, which knows each layer's bytes (a registry blob read with
ranges, or a file in the layout) and builds the merged :class:`~stargzfs.view.ImageView`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import FormatError, IntegrityError, NotFoundError, NotLazyError, UsageError
from .image import (
    MAX_CONFIG_SIZE,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    parse_config,
    parse_manifest,
    select_platform,
)
from .reference import Platform, parse_digest
from .source import ByteSource, FileSource, TailCachedSource

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .cache import ChunkCache
    from .registry import Credentials, RegistryClient
    from .view import ImageView, LayerView

__all__ = ["LayerInfo", "OpenedImage", "open_image", "parse_oci_ref"]

OCI_PREFIX = "oci:"
_MAX_MANIFEST_SIZE = 4 * 1024 * 1024
_MAX_INDEX_DEPTH = 4


@dataclass(frozen=True)
class LayerInfo:
    """What ``stargzfs layers`` shows for one layer."""

    descriptor: Descriptor
    format: str  # LayerFormat value: estargz, zstd:chunked, gzip, zstd, tar
    lazy: bool
    verified: bool  # a TOC digest annotation vouches for the layer's TOC
    entries: int | None  # TOC entries (None when the layer is not lazy)


@dataclass
class OpenedImage:
    """A resolved image and the means to read its layers. Close with :meth:`aclose`."""

    ref: str
    digest: str  # of the manifest
    manifest: Manifest
    config: ImageConfig
    index_digest: str | None = None
    index: Index | None = None  # the index the manifest was chosen from, if any
    client: RegistryClient | None = None
    layout_dir: str | None = None
    repo: Any = None  # registry Repository, when from a registry
    _sources: list[FileSource] = field(default_factory=list, repr=False)
    allow_unverified: bool = True
    _scratch: str | None = field(default=None, repr=False)

    @property
    def layers(self) -> tuple[Descriptor, ...]:
        return self.manifest.layers

    def layer_source(self, desc: Descriptor) -> ByteSource:
        """The layer's bytes: ranges of the registry blob, or the layout's blob file."""
        if self.client is not None:
            from .registry import RegistryBlobSource

            return TailCachedSource(
                RegistryBlobSource(self.client, self.repo, desc.digest, desc.size)
            )
        assert self.layout_dir is not None
        src = FileSource(_blob_path(self.layout_dir, desc.digest))
        self._sources.append(src)
        if src.size != desc.size:
            raise FormatError(
                f"{self.ref}: blob {desc.digest} is {src.size} bytes, the manifest says {desc.size}"
            )
        return src

    async def layer_info(self, position: int) -> LayerInfo:
        """Format detection for one layer (reads only its footer, or first bytes)."""
        from .formats.layer import detect_format

        desc = self.layers[position]
        source = self.layer_source(desc)
        fmt, _footer = await detect_format(source)
        entries = None
        verified = desc.toc_digest is not None
        if fmt.lazy:
            from .index import load_index

            index = await load_index(
                source, desc.annotations, blob_digest=desc.digest, what=_layer_name(position, desc)
            )
            entries = index.entry_count
            # A TOC digest annotation, or (podman's zstd:chunked) a matching manifest checksum.
            verified = index.verified
            index.close()
        return LayerInfo(desc, fmt.value, fmt.lazy, verified, entries)

    async def view(
        self, cache_dir: str | os.PathLike[str] | None = None, *, cache: ChunkCache | None = None
    ) -> ImageView:
        """The merged filesystem. Plain gzip/zstd/tar layers (no TOC) are fetched whole,
        verified and kept as a local tar in ``cache_dir`` (a temporary directory without one),
        with a warning: they work, but not lazily."""
        import trio

        from .view import ImageView

        # Concurrently: each layer's TOC is a round trip (or a whole plain blob) away.
        found: list[LayerView | None] = [None] * len(self.layers)

        async def load(position: int) -> None:
            found[position] = await self.layer_view(position, cache_dir)

        from ._groups import first_error

        try:
            async with trio.open_nursery() as nursery:
                for position in range(len(self.layers)):
                    nursery.start_soon(load, position)
        except BaseException as e:
            for lv in found:
                if lv is not None:
                    lv.index.close()
            if isinstance(e, BaseExceptionGroup):
                raise first_error(e) from None
            raise
        return ImageView([lv for lv in found if lv is not None], cache=cache)

    async def layer_view(
        self, position: int, cache_dir: str | os.PathLike[str] | None = None
    ) -> LayerView:
        """One layer's bytes and index, unmerged (what :meth:`view` stacks; ``ls --layer``)."""
        from .index import load_index
        from .index.plain_layer import open_plain_layer
        from .view import LayerView

        desc = self.layers[position]
        name = _layer_name(position, desc)
        source = self.layer_source(desc)
        try:
            index = await load_index(
                source,
                desc.annotations,
                cache_dir=cache_dir,
                blob_digest=desc.digest,
                what=name,
            )
            if not index.verified and not self.allow_unverified:
                index.close()
                raise IntegrityError(
                    f"{self.ref}: {name} has no TOC digest annotation, so its chunks "
                    "cannot be verified (use --allow-unverified to mount it anyway)"
                )
        except NotLazyError as e:
            # The blob digest vouches for a plain layer: it is verified as it downloads.
            log.warning("%s: %s; fetching it whole", self.ref, e)
            tar_dir = cache_dir if cache_dir is not None else self._scratch_dir()
            source, index = await open_plain_layer(source, desc.digest, tar_dir, name)
            self._sources.append(source)
        return LayerView(source, index, name)

    def find_layer(self, spec: str) -> int:
        """The position of the layer whose digest is ``spec`` or starts with it (the
        ``sha256:`` may be left out). Unknown → :class:`NotFoundError` listing the digests;
        a prefix of several → :class:`UsageError`."""
        want = spec.strip().lower()
        digests = [d.digest for d in self.layers]
        matches = [
            i
            for i, d in enumerate(digests)
            if want and (d.startswith(want) or d.partition(":")[2].startswith(want))
        ]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFoundError(
                f"{self.ref}: no layer {spec!r}; its layers are: {', '.join(digests)}"
            )
        raise UsageError(
            f"{self.ref}: {spec!r} matches several layers: "
            + ", ".join(digests[i] for i in matches)
        )

    def _scratch_dir(self) -> str:
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix="stargzfs-")
        return self._scratch

    async def aclose(self) -> None:
        for src in self._sources:
            src.close()
        self._sources.clear()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        if self.client is not None:
            await self.client.aclose()

    async def __aenter__(self) -> OpenedImage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _layer_name(position: int, desc: Descriptor) -> str:
    return f"layer {position} ({desc.digest[:19]})"


def parse_oci_ref(text: str) -> tuple[str, str | None]:
    """``oci:DIR[:TAG]`` → (DIR, TAG or None)."""
    rest = text[len(OCI_PREFIX) :]
    tag: str | None = None
    head, sep, tail = rest.rpartition(":")
    if sep and tail and "/" not in tail:
        rest, tag = head, tail
    if not rest:
        raise UsageError(f"invalid OCI layout reference {text!r}: expected oci:DIR[:TAG]")
    return rest, tag


def _blob_path(layout: str, digest: str) -> str:
    algo, hexpart = parse_digest(digest)
    return os.path.join(layout, "blobs", algo, hexpart)


def _read_blob(layout: str, desc: Descriptor, limit: int) -> bytes:
    path = _blob_path(layout, desc.digest)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise NotFoundError(f"OCI layout {layout}: blob {desc.digest} is missing") from None
    if len(data) > limit:
        raise FormatError(f"OCI layout {layout}: blob {desc.digest} is too large")
    algo, hexpart = parse_digest(desc.digest)
    actual = hashlib.new(algo, data).hexdigest()
    if actual != hexpart:
        from .errors import DigestMismatchError

        raise DigestMismatchError(f"blob {desc.digest}", desc.digest, f"{algo}:{actual}")
    return data


def _open_layout(text: str, platform: Platform | None) -> OpenedImage:
    layout, tag = parse_oci_ref(text)
    index_path = os.path.join(layout, "index.json")
    try:
        with open(index_path, "rb") as f:
            raw = f.read(_MAX_MANIFEST_SIZE)
    except FileNotFoundError:
        raise NotFoundError(f"{layout}: not an OCI image layout (no index.json)") from None
    except NotADirectoryError:
        raise NotFoundError(f"{layout}: not an OCI image layout") from None
    try:
        json.loads(raw)
    except ValueError as e:
        raise FormatError(f"{index_path}: not JSON ({e})") from None
    top = parse_manifest(raw, None)
    if not isinstance(top, Index):
        raise FormatError(f"{index_path}: expected an image index")
    candidates: Sequence[Descriptor] = top.manifests
    if tag is not None:
        candidates = [d for d in top.manifests if d.ref_name == tag]
        if not candidates:
            names = sorted({d.ref_name for d in top.manifests if d.ref_name}) or ["none"]
            raise NotFoundError(f"{layout}: no image tagged {tag!r} (tags: {', '.join(names)})")
    index: Index | None = None
    if len(candidates) != 1:
        # Several entries (no tag given, or a tag on several): choose by platform.
        index = Index(top.media_type, tuple(candidates), top.annotations)
        desc = select_platform(index, platform or Platform.host(), text)
    else:
        desc = candidates[0]
    index_digest: str | None = None
    depth = 0
    while True:
        doc = parse_manifest(_read_blob(layout, desc, _MAX_MANIFEST_SIZE), desc.media_type)
        if isinstance(doc, Manifest):
            break
        depth += 1
        if depth > _MAX_INDEX_DEPTH:
            raise FormatError(f"{text}: indexes nested more than {_MAX_INDEX_DEPTH} deep")
        if index_digest is None:  # the first real index (rather than index.json's entries)
            index, index_digest = doc, desc.digest
        desc = select_platform(doc, platform or Platform.host(), text)
    config = parse_config(_read_blob(layout, doc.config, MAX_CONFIG_SIZE))
    return OpenedImage(
        ref=text,
        digest=desc.digest,
        manifest=doc,
        config=config,
        index_digest=index_digest,
        index=index,
        layout_dir=layout,
    )


async def open_image(
    ref: str,
    *,
    platform: Platform | str | None = None,
    creds: Credentials | None = None,
    insecure: bool = False,
    mirrors: Sequence[str] = (),
    cache_dir: str | os.PathLike[str] | None = None,
    allow_unverified: bool = True,
) -> OpenedImage:
    """Resolve ``ref`` (``registry/repo[:tag][@digest]`` or ``oci:DIR[:TAG]``).

    ``creds`` are used for the reference's registry before any credential file. With
    ``allow_unverified=False``, layers without a TOC digest annotation are refused.
    ``cache_dir`` is accepted for symmetry with :meth:`OpenedImage.view` (pass it there).
    """
    del cache_dir  # the index cache is chosen when the view is built
    if isinstance(platform, str):
        platform = Platform.parse(platform)
    if ref.startswith(OCI_PREFIX):
        opened = _open_layout(ref, platform)
    else:
        from .image import resolve_image
        from .reference import parse_reference
        from .registry import RegistryClient, parse_mirror_option

        parsed = parse_reference(ref)
        explicit = {parsed.registry: creds} if creds is not None else None
        client = RegistryClient(
            credentials=explicit,
            insecure=[parsed.registry] if insecure else (),
            mirrors=parse_mirror_option(mirrors) if mirrors else None,
        )
        try:
            resolved = await resolve_image(client, parsed, platform)
        except BaseException:
            await client.aclose()
            raise
        opened = OpenedImage(
            ref=str(parsed),
            digest=resolved.digest,
            manifest=resolved.manifest,
            config=resolved.config,
            index_digest=resolved.index_digest,
            index=resolved.index,
            client=client,
            repo=parsed.repo,
        )
    opened.allow_unverified = allow_unverified
    return opened
