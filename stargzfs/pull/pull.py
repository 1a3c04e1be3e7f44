"""``stargzfs pull``: materialize a whole image as a rootfs, an OCI layout, a docker-archive
or a ``dir:`` layout.

Data flow: the image is resolved (manifest, config), then every layer blob downloads in
parallel (``jobs`` at a time, bottom layer first) into the content-addressed blob cache,
resuming ``.partial`` files left by an interrupted run and verifying each blob's sha256. For
a rootfs a worker thread applies the layers bottom to top *while they download*: it reads
each blob as it grows on disk, decompresses and untars it into a staging directory next to
DEST, and checks the uncompressed bytes against the config's diff_id. The apply itself runs in
a child process (:mod:`.apply_process`, started before the image is resolved) so it has a
core of its own. Only when everything verified is the staging directory renamed to DEST; on
any failure it is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TextIO

import trio

from .._groups import leaf_errors
from ..errors import DigestMismatchError, StargzfsError, UsageError
from ..image import (
    IMAGE_MEDIA_TYPES,
    Descriptor,
    Manifest,
    ResolvedImage,
    parse_config,
    parse_manifest,
    resolve_image,
)
from ..reference import Platform, Reference, parse_reference
from .apply_process import LayerApplyProcess
from .blob_cache import BlobCache, default_cache_dir
from .fetch import BlobDownload, FetchStats, fetch_blob
from .layouts import ImageBlobs, write_dir, write_docker_archive, write_oci_layout
from .progress import Progress, human_bytes

if TYPE_CHECKING:
    from ..registry.client import RegistryClient

__all__ = ["FORMATS", "PullOptions", "PullResult", "pull"]

log = logging.getLogger(__name__)

Format = Literal["rootfs", "oci", "docker-archive", "dir"]
FORMATS: tuple[str, ...] = ("rootfs", "oci", "docker-archive", "dir")
_MAX_CONFIG = 8 * 1024 * 1024


@dataclass
class PullOptions:
    format: Format = "rootfs"
    platform: Platform | None = None
    all_platforms: bool = False
    jobs: int = 4
    connections: int = 1
    cache_dir: Path | None = None
    no_cache: bool = False
    force: bool = False
    quiet: bool = False
    progress_stream: TextIO | None = None
    progress_interval: float | None = None


@dataclass
class PullResult:
    dest: Path
    manifest_digests: list[str]
    layers: int
    stats: FetchStats
    seconds: float
    files: int = 0
    bytes_written: int = 0
    skipped_devices: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def summary(self) -> str:
        s = self.stats
        text = (
            f"pulled {self.layers} layer(s) to {self.dest} in {self.seconds:.2f}s: "
            f"downloaded {human_bytes(s.bytes_downloaded)}"
        )
        if s.bytes_resumed:
            text += f" (resumed after {human_bytes(s.bytes_resumed)} already on disk)"
        text += f"; cache hits: {s.cache_hits}, bytes saved: {human_bytes(s.bytes_saved)}"
        if self.skipped_devices:
            text += f"; skipped {self.skipped_devices} device node(s) (not root)"
        return text


# --------------------------------------------------------------------------- destination


def _check_dest(dest: Path, fmt: Format, force: bool) -> None:
    if fmt == "docker-archive":
        if dest.is_dir() and not dest.is_symlink():
            raise UsageError(f"{dest} is a directory; docker-archive writes a file")
        if dest.exists() and not force:
            raise UsageError(f"{dest} already exists (use --force to overwrite it)")
        return
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        if not force:
            raise UsageError(f"{dest} exists and is not a directory (use --force to replace it)")
    elif dest.is_dir() and any(os.scandir(dest)) and not force:
        raise UsageError(f"{dest} is not empty (use --force to replace its contents)")
    if not dest.parent.is_dir():
        raise UsageError(f"{dest.parent} does not exist")


def _temp_prefix(dest: Path, kind: str) -> str:
    """Hidden siblings of DEST: ``.NAME.stargzfs-KIND-PID-``."""
    return f".{dest.name}.stargzfs-{kind}-{os.getpid()}-"


def _remove_stale(dest: Path) -> None:
    """Remove what pulls to DEST killed before they could clean up left (their pid is gone)."""
    prefix = f".{dest.name}.stargzfs-"
    with contextlib.suppress(OSError):
        for entry in os.scandir(dest.parent):
            if not entry.name.startswith(prefix):
                continue
            parts = entry.name[len(prefix) :].split("-")
            if len(parts) < 3 or not parts[1].isdigit():
                continue
            try:
                os.kill(int(parts[1]), 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _install(staging: Path, dest: Path) -> None:
    """Rename ``staging`` to ``dest``, replacing what's there (checked by _check_dest)."""
    trash: Path | None = None
    if dest.is_symlink() or dest.exists():
        if dest.is_dir() and not dest.is_symlink() and not any(os.scandir(dest)):
            dest.rmdir()
        else:
            trash = dest.with_name(_temp_prefix(dest, "old") + "x")
            os.rename(dest, trash)
    os.rename(staging, dest)
    if trash is not None:
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink()


# --------------------------------------------------------------------------- resolution


async def _all_platform_images(
    client: RegistryClient, ref: Reference
) -> tuple[list[ResolvedImage], bytes | None, str | None, str | None]:
    """Every image of an index (or the single image), with the index's exact bytes."""
    response = await client.get_manifest(ref)
    doc = parse_manifest(response.data, response.media_type)
    if isinstance(doc, Manifest):
        img = await resolve_image(client, ref.with_digest(response.digest))
        return [img], None, None, None
    images: list[ResolvedImage] = []
    for desc in doc.images():
        if desc.media_type not in IMAGE_MEDIA_TYPES:
            raise StargzfsError(f"{ref}: nested indexes are not supported with --all-platforms")
        m = await client.get_manifest(ref.with_digest(desc.digest))
        manifest = parse_manifest(m.data, m.media_type)
        assert isinstance(manifest, Manifest)
        config_raw = await client.get_blob(ref.repo, manifest.config.digest, max_size=_MAX_CONFIG)
        config = parse_config(config_raw)
        images.append(ResolvedImage(ref, m.digest, manifest, config, doc, response.digest))
    return images, response.data, response.digest, doc.media_type


async def _config_raw(client: RegistryClient, img: ResolvedImage) -> bytes:
    if img.config.raw:
        return img.config.raw
    return await client.get_blob(img.ref.repo, img.manifest.config.digest, max_size=_MAX_CONFIG)


# --------------------------------------------------------------------------- pulling


async def pull(
    ref_text: str,
    dest: Path | str,
    options: PullOptions | None = None,
    *,
    client: RegistryClient | None = None,
) -> PullResult:
    """Pull ``ref_text`` into ``dest``; see the module doc."""
    opts = options or PullOptions()
    dest = Path(dest).absolute()
    if opts.format not in FORMATS:
        raise UsageError(f"unknown format {opts.format!r} (choose from {', '.join(FORMATS)})")
    if opts.all_platforms and opts.format != "oci":
        raise UsageError("--all-platforms needs --format oci")
    if opts.all_platforms and opts.platform is not None:
        raise UsageError("--platform and --all-platforms are mutually exclusive")
    if opts.jobs < 1 or opts.connections < 1:
        raise UsageError("--jobs and --connections must be at least 1")
    ref = parse_reference(ref_text)
    _check_dest(dest, opts.format, opts.force)
    _remove_stale(dest)
    if client is None:
        from ..registry.client import RegistryClient

        async with RegistryClient() as own:
            return await _pull(own, ref, dest, opts)
    return await _pull(client, ref, dest, opts)


async def _pull(
    client: RegistryClient, ref: Reference, dest: Path, opts: PullOptions
) -> PullResult:
    started = time.monotonic()
    # started first: its imports overlap the registry round trips
    applier = LayerApplyProcess() if opts.format == "rootfs" else None
    try:
        return await _pull_with(client, ref, dest, opts, started, applier)
    finally:
        if applier is not None:
            applier.kill()
            applier.close()


async def _pull_with(
    client: RegistryClient,
    ref: Reference,
    dest: Path,
    opts: PullOptions,
    started: float,
    applier: LayerApplyProcess | None,
) -> PullResult:
    progress = Progress(opts.progress_stream, quiet=opts.quiet, interval=opts.progress_interval)
    index_raw = index_digest = index_media_type = None
    if opts.all_platforms:
        images, index_raw, index_digest, index_media_type = await _all_platform_images(client, ref)
    else:
        images = [await resolve_image(client, ref, opts.platform)]
    stats = FetchStats()
    temp_cache: Path | None = None
    if opts.no_cache:
        temp_cache = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_temp_prefix(dest, "blobs")))
        cache = BlobCache(temp_cache)
    else:
        cache = BlobCache(opts.cache_dir or default_cache_dir())
    downloads: dict[str, BlobDownload] = {}
    for img in images:
        for i, layer in enumerate(img.manifest.layers):
            if layer.digest not in downloads:
                downloads[layer.digest] = BlobDownload(
                    layer.digest, layer.size, f"layer {i} ({layer.digest}) of {ref}"
                )
    staging: Path | None = None
    try:
        if opts.format == "docker-archive":
            fd, name = tempfile.mkstemp(dir=dest.parent, prefix=_temp_prefix(dest, "stage"))
            os.close(fd)
            staging = Path(name)
        else:
            staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_temp_prefix(dest, "stage")))
        result = PullResult(dest, [img.digest for img in images], len(downloads), stats, 0.0)
        await _download_and_build(
            client, ref, images, downloads, cache, stats, progress, staging, opts, result, applier
        )
        if opts.format != "rootfs":
            await trio.to_thread.run_sync(
                _write_layout,
                opts.format,
                staging,
                ref,
                [await _image_blobs(client, img, downloads) for img in images],
                index_raw,
                index_digest,
                index_media_type,
            )
        _install(staging, dest)
        staging = None
    finally:
        if staging is not None:
            if staging.is_dir():
                shutil.rmtree(staging, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    staging.unlink()
        if temp_cache is not None:
            shutil.rmtree(temp_cache, ignore_errors=True)
    result.seconds = time.monotonic() - started
    progress.message(result.summary())
    return result


async def _image_blobs(
    client: RegistryClient, img: ResolvedImage, downloads: dict[str, BlobDownload]
) -> ImageBlobs:
    paths = {}
    for layer in img.manifest.layers:
        path = downloads[layer.digest].path
        assert path is not None
        paths[layer.digest] = path
    return ImageBlobs(
        img.digest,
        img.manifest.media_type,
        img.manifest.raw,
        img.manifest.config.digest,
        await _config_raw(client, img),
        img.manifest.layers,
        img.config.diff_ids,
        paths,
    )


def _write_layout(
    fmt: Format,
    staging: Path,
    ref: Reference,
    images: list[ImageBlobs],
    index_raw: bytes | None,
    index_digest: str | None,
    index_media_type: str | None,
) -> None:
    if fmt == "oci":
        write_oci_layout(
            staging,
            images,
            ref.tag,
            index_raw=index_raw,
            index_digest=index_digest,
            index_media_type=index_media_type,
        )
    elif fmt == "dir":
        write_dir(staging, images[0])
    else:
        tags = [ref.familiar()] if ref.tag is not None and ref.digest is None else []
        write_docker_archive(staging, images[0], tags)


async def _download_and_build(
    client: RegistryClient,
    ref: Reference,
    images: list[ResolvedImage],
    downloads: dict[str, BlobDownload],
    cache: BlobCache,
    stats: FetchStats,
    progress: Progress,
    staging: Path,
    opts: PullOptions,
    result: PullResult,
    applier: LayerApplyProcess | None,
) -> None:
    limiter = trio.CapacityLimiter(opts.jobs)
    abort = threading.Event()
    extracted = threading.Event()
    thread_started = threading.Event()

    async def one(dl: BlobDownload) -> None:
        async with limiter:
            await fetch_blob(client, ref.repo, dl, cache, stats, progress, opts.connections)

    async def ticker() -> None:
        while True:
            await trio.sleep(progress.interval)
            progress.tick()

    def extract() -> None:
        thread_started.set()
        try:
            if abort.is_set():
                return
            img = images[0]
            assert applier is not None
            _apply_layers(
                applier,
                staging,
                img.manifest.layers,
                img.config.diff_ids,
                downloads,
                result,
                progress,
            )
        finally:
            extracted.set()

    try:
        async with trio.open_nursery() as nursery:
            if not opts.quiet:
                nursery.start_soon(ticker)
            async with trio.open_nursery() as work:
                for dl in downloads.values():
                    work.start_soon(one, dl)
                if opts.format == "rootfs":
                    progress.stage = "pulling"
                    work.start_soon(
                        lambda: trio.to_thread.run_sync(extract, abandon_on_cancel=True)
                    )
            nursery.cancel_scope.cancel()
    except BaseException as e:
        abort.set()
        if applier is not None:
            applier.kill()  # a blocked apply returns at once
        for dl in downloads.values():
            dl.cancel()
        if opts.format == "rootfs" and thread_started.is_set():
            # the extractor stops at its next entry; wait for it before the staging is removed
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(extracted.wait, 30.0)
        if isinstance(e, BaseExceptionGroup):
            first = _first_error(e)
            if first is not None:
                raise first from None
        raise
    progress.tick(force=True)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The error to report from a nursery's group: a KeyboardInterrupt, else the first of
    ours (a failed download cancels its siblings, whose Cancelled is not the story)."""
    leaves = leaf_errors(group)
    for leaf in leaves:
        if isinstance(leaf, KeyboardInterrupt):
            return leaf
    for leaf in leaves:
        if isinstance(leaf, DigestMismatchError):
            return leaf
    for leaf in leaves:
        if isinstance(leaf, StargzfsError) and "download cancelled" not in str(leaf):
            return leaf
    for leaf in leaves:
        if not isinstance(leaf, trio.Cancelled):
            return leaf
    return None


def _apply_layers(
    applier: LayerApplyProcess,
    staging: Path,
    layers: Sequence[Descriptor],
    diff_ids: Sequence[str],
    downloads: dict[str, BlobDownload],
    result: PullResult,
    progress: Progress | None = None,
) -> None:
    applier.set_root(staging)
    for i, (layer, diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
        dl = downloads[layer.digest]
        what = f"layer {i} ({layer.digest})"
        if progress is not None:
            progress.stage = f"applying layer {i + 1}/{len(layers)}"
        try:
            fd = dl.open_when_started()
            try:
                # if the download fails the child is killed, and apply() raises
                dl.on_failure(applier.kill)
                actual = applier.apply(fd, layer.size, layer.compression or "none", what)
            finally:
                dl.forget_failure_hooks()
                os.close(fd)
        except StargzfsError:
            # Bytes that fail to parse may be bytes that fail their digest (a corrupt
            # resume prefix, a tampered stream, a damaged cache file) or a download that
            # failed: let the check finish and report that (which also discards a bad
            # blob).
            error = dl.wait_verified()
            if error is not None and not dl.cancelled:
                raise error from None
            raise
        # A blob read straight from disk may still be being hashed: wait for the verdict.
        error = dl.wait_verified()
        if error is not None:
            raise error
        if actual != diff_id:
            raise DigestMismatchError(f"{what}: uncompressed content (diff_id)", diff_id, actual)
    stats = applier.finish()
    if progress is not None:
        progress.stage = "done"
    result.files = stats["files"]
    result.bytes_written = stats["bytes"]
    result.skipped_devices = stats["skipped_devices"]
