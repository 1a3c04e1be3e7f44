"""Downloading one blob into the cache, resumably, verified, and readable while it arrives.

:class:`BlobDownload` is shared between the trio task that downloads a blob and a worker
thread that consumes it (the rootfs extractor): :meth:`BlobDownload.reader` returns a
file-like object that reads the blob from the start and, at the end of what has arrived
so far, waits for more. The blob is verified against its digest when the last byte has
arrived; a mismatch deletes the bytes and fails the reader too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..errors import DigestMismatchError, StargzfsError
from .blob_cache import BlobCache

if TYPE_CHECKING:
    from ..reference import Repository
    from ..registry.client import RegistryClient
    from .progress import Progress

__all__ = ["BlobDownload", "FetchStats", "fetch_blob"]

_HASH_BLOCK = 4 * 1024 * 1024
_WRITE_BATCH = 1024 * 1024
# Segmented downloads (--connections): blobs with at least this much left, in pieces of
# _SEGMENT bytes, at most _WINDOW pieces per connection ahead of the last one written.
_SEGMENTED_MIN = 16 * 1024 * 1024
_SEGMENT = 4 * 1024 * 1024
_WINDOW = 2


@dataclass
class FetchStats:
    cache_hits: int = 0
    bytes_saved: int = 0
    bytes_downloaded: int = 0
    bytes_resumed: int = 0


class BlobDownload:
    """One blob's download state, safe to observe from another thread."""

    def __init__(self, digest: str, size: int, what: str) -> None:
        self.digest = digest
        self.size = size
        self.what = what
        self.path: Path | None = None  # where the bytes are (partial, then final)
        self.written = 0
        self.done = False
        self.error: BaseException | None = None
        self.cancelled = False
        self._cond = threading.Condition()
        self._fail_hooks: list[Callable[[], None]] = []

    # -- producer side --------------------------------------------------------------------
    def started(self, path: Path, written: int) -> None:
        with self._cond:
            self.path, self.written = path, written
            self._cond.notify_all()

    def advance(self, written: int) -> None:
        with self._cond:
            self.written = written
            self._cond.notify_all()

    def finish(self, path: Path, commit: Callable[[], Path] | None = None) -> None:
        """Mark complete; ``commit`` (renaming the file) runs under the lock so a reader never
        sees a path that no longer exists."""
        with self._cond:
            if commit is not None:
                path = commit()
            self.path, self.done = path, True
            self.written = self.size
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            if self.error is None:
                self.error = error
            self._cond.notify_all()
            hooks, self._fail_hooks = self._fail_hooks, []
        for hook in hooks:
            hook()

    def cancel(self) -> None:
        """Wake and stop readers (the pull is being torn down)."""
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()
            hooks, self._fail_hooks = self._fail_hooks, []
        for hook in hooks:
            hook()

    def on_failure(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (once) if the download fails or is cancelled (now, if it has)."""
        with self._cond:
            if self.error is None and not self.cancelled:
                self._fail_hooks.append(hook)
                return
        hook()

    def forget_failure_hooks(self) -> None:
        with self._cond:
            self._fail_hooks = []

    # -- consumer side --------------------------------------------------------------------
    def _wait(self, pos: int, fd: int | None) -> tuple[int, int]:
        """Wait for bytes past ``pos``; returns (an open fd of the file, bytes written)."""
        with self._cond:
            while True:
                if self.error is not None:
                    raise self.error
                if self.cancelled:
                    raise StargzfsError(f"{self.what}: download cancelled")
                if self.path is not None and (self.written > pos or self.done):
                    if fd is None:
                        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                    return fd, self.written
                self._cond.wait(1.0)

    def wait_verified(self, timeout: float | None = None) -> BaseException | None:
        """Block until the download is verified or failed; returns its error, if any."""
        with self._cond:
            self._cond.wait_for(
                lambda: self.done or self.error is not None or self.cancelled, timeout
            )
            return self.error

    def open_when_started(self) -> int:
        """A read-only fd of the blob's file as soon as it exists (it may still be growing:
        read at most ``size`` bytes, and see :meth:`wait_verified`)."""
        fd, _ = self._wait(-1, None)
        return fd

    def open_if_complete(self) -> int | None:
        """A read-only fd of the blob if every byte is on disk (maybe not verified yet: see
        :meth:`wait_verified`), else ``None``."""
        with self._cond:
            if self.path is None or self.error is not None or self.written < self.size:
                return None
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def reader(self) -> _FollowReader:
        return _FollowReader(self)


class _FollowReader:
    """A read-only file object over a blob that may still be downloading."""

    def __init__(self, dl: BlobDownload) -> None:
        self._dl = dl
        self._fd: int | None = None
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        if n < 0:
            n = 1 << 62
        self._fd, written = self._dl._wait(self._pos, self._fd)
        avail = written - self._pos
        if avail <= 0:
            return b""  # done and at the end
        data = os.pread(self._fd, min(n, avail, 1 << 24), self._pos)
        self._pos += len(data)
        return data

    def readinto(self, b: bytearray | memoryview) -> int:  # pragma: no cover - convenience
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> _FollowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def _hash_file_prefix(fd: int, length: int) -> hashlib._Hash:
    h = hashlib.sha256()
    pos = 0
    while pos < length:
        data = os.pread(fd, min(_HASH_BLOCK, length - pos), pos)
        if not data:
            break
        h.update(data)
        pos += len(data)
    return h


async def fetch_blob(
    client: RegistryClient,
    repo: Repository,
    dl: BlobDownload,
    cache: BlobCache,
    stats: FetchStats,
    progress: Progress | None = None,
    connections: int = 1,
) -> Path:
    """Make the blob ``dl`` describes complete and verified in ``cache``; returns its path.

    Resumes from a ``.partial`` left by an earlier run. On a digest mismatch the bytes are
    discarded and :class:`DigestMismatchError` raised (and handed to readers).
    """
    try:
        return await _fetch(client, repo, dl, cache, stats, progress, connections)
    except BaseException as e:
        dl.fail(e if isinstance(e, StargzfsError) else StargzfsError(f"{dl.what}: {e!r}"))
        raise


async def _fetch(
    client: RegistryClient,
    repo: Repository,
    dl: BlobDownload,
    cache: BlobCache,
    stats: FetchStats,
    progress: Progress | None,
    connections: int,
) -> Path:
    cached = cache.lookup(dl.digest, dl.size)
    if cached is not None:
        # Readers may start on it now; it counts as verified only once re-hashed.
        dl.started(cached, dl.size)
        if progress is not None:
            progress.cached(dl.digest, dl.size)
        actual = await trio.to_thread.run_sync(_file_digest, cached)
        if actual != dl.digest:
            cache.discard(cached)
            raise DigestMismatchError(
                f"{dl.what}: the cached copy (now removed; run again)", dl.digest, actual
            )
        stats.cache_hits += 1
        stats.bytes_saved += dl.size
        dl.finish(cached)
        return cached
    opened = await trio.to_thread.run_sync(cache.open_partial, dl.digest)
    private = opened is None
    if opened is None:  # another process is writing this partial: download privately
        cache.dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=cache.dir, prefix=".tmp-", suffix=".partial")
        opened = fd, Path(name)
    fd, partial = opened
    try:
        have = os.fstat(fd).st_size
        if have > dl.size:
            os.ftruncate(fd, 0)
            have = 0
        hasher = await trio.to_thread.run_sync(_hash_file_prefix, fd, have)
        if have:
            stats.bytes_resumed += have
        dl.started(partial, have)
        if progress is not None:
            progress.start(dl.digest, dl.size, have)
        pos = have
        if connections > 1 and dl.size - pos >= _SEGMENTED_MIN:
            pos = await _fetch_segments(
                client, repo, dl, fd, hasher, pos, connections, stats, progress
            )
        if pos < dl.size:
            pending: list[bytes] = []
            pending_len = 0

            def flush_sync(chunks: list[bytes], at: int) -> None:
                data = b"".join(chunks)
                hasher.update(data)
                os.pwrite(fd, data, at)

            async with aclosing(
                client.stream_blob(repo, dl.digest, offset=pos, verify=False)
            ) as chunks:
                async for chunk in chunks:
                    if pos + pending_len + len(chunk) > dl.size:
                        raise DigestMismatchError(
                            dl.what, dl.digest, f"more than the declared {dl.size} bytes"
                        )
                    pending.append(chunk)
                    pending_len += len(chunk)
                    stats.bytes_downloaded += len(chunk)
                    if progress is not None:
                        progress.advance(dl.digest, len(chunk))
                    if pending_len >= _WRITE_BATCH:
                        await trio.to_thread.run_sync(flush_sync, pending, pos)
                        pos += pending_len
                        pending, pending_len = [], 0
                        dl.advance(pos)
            if pending:
                await trio.to_thread.run_sync(flush_sync, pending, pos)
                pos += pending_len
                dl.advance(pos)
        actual = "sha256:" + hasher.hexdigest()
        if pos != dl.size or actual != dl.digest:
            cache.discard(partial)
            got = actual if pos == dl.size else f"{pos} of {dl.size} bytes"
            raise DigestMismatchError(dl.what, dl.digest, got)
        final = cache.path(dl.digest)
        dl.finish(final, lambda: cache.commit(dl.digest, partial))
        if progress is not None:
            progress.finish(dl.digest)
        return final
    except BaseException:
        if private:
            cache.discard(partial)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


async def _fetch_segments(
    client: RegistryClient,
    repo: Repository,
    dl: BlobDownload,
    fd: int,
    hasher: hashlib._Hash,
    start: int,
    connections: int,
    stats: FetchStats,
    progress: Progress | None,
) -> int:
    """Fetch ``[start, size)`` as parallel range requests of ``_SEGMENT`` bytes, written to
    the partial file **in order** (so it is always a valid prefix to resume from, whatever
    kills the process); returns the new end of the prefix."""
    offsets = list(range(start, dl.size, _SEGMENT))
    done: dict[int, bytes] = {}
    next_write = 0  # index into offsets
    next_take = 0
    changed = trio.Condition()
    pos = start

    async def worker() -> None:
        nonlocal next_take
        while True:
            async with changed:
                while next_take < len(offsets) and next_take >= next_write + _WINDOW * connections:
                    await changed.wait()
                if next_take >= len(offsets):
                    return
                i = next_take
                next_take += 1
            offset = offsets[i]
            length = min(_SEGMENT, dl.size - offset)
            data = await client.get_blob_range(repo, dl.digest, offset, length)
            stats.bytes_downloaded += len(data)
            if progress is not None:
                progress.advance(dl.digest, len(data))
            async with changed:
                done[i] = data
                changed.notify_all()

    async def writer() -> None:
        nonlocal next_write, pos
        while next_write < len(offsets):
            async with changed:
                while next_write not in done:
                    await changed.wait()
                data = done.pop(next_write)

            def write(data: bytes = data, at: int = pos) -> None:
                hasher.update(data)
                os.pwrite(fd, data, at)

            await trio.to_thread.run_sync(write)
            pos += len(data)
            dl.advance(pos)
            async with changed:
                next_write += 1
                changed.notify_all()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        for _ in range(min(connections, len(offsets))):
            nursery.start_soon(worker)
    return pos
