"""Push a :class:`~stargzfs.push.sources.LocalImage` to a registry.

Layers go up first, several at a time (``jobs``), then configs, then the manifests of an
index (by digest), then the top manifest under the tag. A blob already in the repository is
skipped after a ``HEAD``; re-running an interrupted push therefore re-sends only what did not
finish.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TextIO

import trio

from .._groups import first_error
from ..reference import Reference, Repository
from ..registry import RegistryClient
from .sources import LocalImage
from .upload import DEFAULT_CHUNK_SIZE, BlobResult, ChunkSource, Uploader

__all__ = ["BlobJob", "ProgressLine", "PushReport", "push_image", "run_blob_jobs"]

log = logging.getLogger(__name__)


class BlobJob:
    """One blob to make present in a repository."""

    def __init__(
        self,
        digest: str,
        size: int,
        source: ChunkSource,
        mount_from: Repository | None = None,
    ) -> None:
        self.digest = digest
        self.size = size
        self.source = source
        self.mount_from = mount_from


class PushReport:
    def __init__(self) -> None:
        self.results: list[BlobResult] = []

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def bytes_sent(self) -> int:
        return sum(r.bytes_sent for r in self.results)

    def summary(self) -> str:
        return (
            f"{self.count('uploaded')} blob(s) uploaded ({self.bytes_sent} bytes), "
            f"{self.count('mounted')} mounted, {self.count('exists')} already present"
        )


class ProgressLine:
    """Bytes accepted so far across blobs, rewritten in place on a terminal (2 per second)."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.total = total
        self.done: dict[str, int] = {}
        self._last = 0.0

    def __call__(self, digest: str, offset: int) -> None:
        import time

        self.done[digest] = offset
        now = time.monotonic()
        if now - self._last < 0.5:
            return
        self._last = now
        sent = sum(self.done.values())
        print(
            f"\r  uploading {sent / 1048576:.1f} / {self.total / 1048576:.1f} MiB",
            end="",
            file=self.out,
            flush=True,
        )

    def finish(self) -> None:
        if self._last:
            print("\r\033[K", end="", file=self.out, flush=True)


async def run_blob_jobs(
    uploader: Uploader,
    repo: Repository,
    jobs: Sequence[BlobJob],
    *,
    parallel: int = 3,
    report: PushReport | None = None,
    out: TextIO | None = None,
) -> PushReport:
    """Run ``jobs`` with at most ``parallel`` in flight; the first failure cancels the rest."""
    report = report or PushReport()
    todo: list[BlobJob] = []
    seen: set[str] = set()
    for job in jobs:
        if job.digest not in seen:
            seen.add(job.digest)
            todo.append(job)
    queue = iter(todo)  # workers take jobs in order: the first ones start first

    async def worker() -> None:
        for job in queue:
            result = await uploader.push_blob(
                repo, job.digest, job.size, job.source, mount_from=job.mount_from
            )
            report.results.append(result)
            if out is not None:
                clear = "\r\033[K" if out.isatty() else ""  # over a progress line
                line = f"{clear}{result.outcome:>8}  {job.digest}  ({job.size} bytes)"
                print(line, file=out, flush=True)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(min(max(1, parallel), len(todo))):
                nursery.start_soon(worker)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return report


async def push_image(
    client: RegistryClient,
    image: LocalImage,
    dest: Reference,
    *,
    jobs: int = 3,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    out: TextIO | None = None,
    mount_from: Repository | None = None,
    uploader_hook: Callable[[Uploader], Awaitable[None]] | None = None,
    state_dir: str | None = None,
) -> tuple[str, PushReport]:
    """Push ``image`` to ``dest``; returns (digest of the top manifest, report).

    With ``state_dir``, chunked upload sessions are remembered there, and a later push of the
    same blobs resumes them (see :class:`Uploader`).
    """
    uploader = Uploader(client, chunk_size=chunk_size, state_dir=state_dir)
    line: ProgressLine | None = None
    if out is not None and out.isatty():
        line = ProgressLine(out, sum(b.size for b in image.blobs.values()))
        uploader.progress = line
    if uploader_hook is not None:
        await uploader_hook(uploader)
    layers: list[BlobJob] = []
    configs: list[BlobJob] = []
    for m in image.manifests:
        for desc in m.doc.layers:
            blob = image.blobs.get(desc.digest)
            if blob is not None:
                layers.append(BlobJob(blob.digest, blob.size, blob.chunks(), mount_from))
        cfg = image.blobs[m.doc.config.digest]
        configs.append(BlobJob(cfg.digest, cfg.size, cfg.chunks(), mount_from))
    try:
        report = await run_blob_jobs(uploader, dest.repo, layers, parallel=jobs, out=out)
        await run_blob_jobs(uploader, dest.repo, configs, parallel=jobs, report=report, out=out)
    finally:
        if line is not None:
            line.finish()
    if len(image.manifests) > 1 or image.manifests[0].data != image.top_data:
        for m in image.manifests:
            await uploader.put_manifest(dest.with_digest(m.digest), m.data, m.media_type)
    digest = await uploader.put_manifest(dest, image.top_data, image.top_media_type)
    log.info("pushed %s@%s: %s", dest, digest, report.summary())
    return digest, report


def default_state_dir() -> str:
    """``$XDG_CACHE_HOME/stargzfs/uploads`` (default ``~/.cache/stargzfs/uploads``)."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "stargzfs", "uploads")
