"""Verified, uncompressed chunks: a memory LRU in front of a content-addressed disk store.

Keys are the chunks' sha256 digests, so identical content is stored once across layers and
images, and concurrent mounts can share one directory: a chunk file is written under a
temporary name and renamed into place (readers see all of it or nothing). A file read back
from disk is verified again before use — the disk is outside our control — and a bad one is
deleted and treated as a miss.

With ``max_disk_bytes`` the disk store is bounded: when a write takes it over the limit, the
least recently used chunk files are deleted until it is at 90% of it. Recency lives in an
in-memory index (digest → size, oldest first) built by one scan of the directory when the
cache is opened (:meth:`ChunkCache.scan`, which the mount runs in a thread right after
mounting; the first write runs it otherwise) and kept up to date by every hit and write, so
an eviction never rescans the directory. The file mtimes carry recency across processes and
remounts: they are refreshed on every hit, and on a write of a chunk already on disk.

The scan also deletes temporary files older than :data:`STALE_TMP_SECONDS`, left by a
writer that died between creating and renaming one.

Several processes may share a directory; each keeps its own index of what it saw, so the
bound is approximate, and a file evicted under another reader is just a miss for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from cachetools import LRUCache

__all__ = ["STALE_TMP_SECONDS", "CacheStats", "ChunkCache"]

log = logging.getLogger(__name__)

STALE_TMP_SECONDS = 600  # a temporary file this old has no live writer


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    stored: int = 0
    corrupt: int = 0
    evicted: int = 0
    stale_removed: int = 0  # temporary files of dead writers deleted by the scan


class ChunkCache:
    """Blocking API: call it from a worker thread when the disk may be touched."""

    def __init__(
        self,
        directory: str | os.PathLike[str] | None,
        *,
        memory_bytes: int = 64 << 20,
        max_disk_bytes: int | None = None,
    ):
        self.directory = os.path.join(os.fspath(directory), "chunks") if directory else None
        self.max_disk_bytes = max_disk_bytes
        self.memory_bytes = memory_bytes
        self._memory: LRUCache[bytes, bytes] = LRUCache(maxsize=memory_bytes, getsizeof=len)
        self._lock = threading.Lock()  # cachetools caches are not thread-safe
        self._disk_lock = threading.Lock()
        # digest -> file size, least recently used first; None until scan() ran.
        self._lru: OrderedDict[bytes, int] | None = None
        self._pending: OrderedDict[bytes, int] = OrderedDict()  # used while scanning
        self._scanning = False
        self._disk_total = 0  # bytes of the files in _lru
        self.scans = 0  # directory scans (one per cache object)
        self.stats = CacheStats()

    def _path(self, digest: bytes) -> str:
        assert self.directory is not None
        hexd = digest.hex()
        return os.path.join(self.directory, hexd[:2], hexd)

    def has(self, digest: bytes) -> bool:
        """Whether the chunk is cached (memory, or a file on disk; not re-verified here)."""
        with self._lock:
            if digest in self._memory:
                return True
        return self.directory is not None and os.path.exists(self._path(digest))

    def peek_memory(self, digest: bytes) -> bytes | None:
        """The memory tier, without counting a hit or a miss (internal bookkeeping)."""
        with self._lock:
            return self._memory.get(digest)

    def get_memory(self, digest: bytes) -> bytes | None:
        """The memory tier only: never blocks, safe on the event loop."""
        with self._lock:
            data = self._memory.get(digest)
        if data is not None:
            self.stats.memory_hits += 1
        elif self.directory is None:
            self.stats.misses += 1  # no other tier to look in
        return data

    def get(self, digest: bytes) -> bytes | None:
        with self._lock:
            data = self._memory.get(digest)
        if data is not None:
            self.stats.memory_hits += 1
            return data
        if self.directory is not None:
            path = self._path(digest)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                data = None
            if data is not None:
                if hashlib.sha256(data).digest() == digest:
                    self.stats.disk_hits += 1
                    self._remember(digest, data)
                    self._touch(digest, path, len(data))
                    return data
                self.stats.corrupt += 1
                with contextlib.suppress(OSError):
                    os.unlink(path)
                self._forget(digest)
        self.stats.misses += 1
        return None

    def put(self, digest: bytes, data: bytes) -> None:
        """Store bytes already verified against ``digest``."""
        self._remember(digest, data)
        self.stats.stored += 1
        if self.directory is None:
            return
        path = self._path(digest)
        if os.path.exists(path):
            self._touch(digest, path, len(data))  # written again: recently used
            return
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._add(digest, len(data))

    # -- the disk index ------------------------------------------------------------------

    def scan(self) -> None:
        """Open the disk tier: delete stale temporary files and build the recency index
        from the chunk files' mtimes. Blocking (run it in a thread); once per object.
        Writes and hits while it runs are kept aside and count as the most recent."""
        if self.directory is None:
            return
        with self._disk_lock:
            if self._lru is not None or self._scanning:
                return
            self._scanning = True
        found: list[tuple[float, bytes, int]] = []
        try:
            found = self._read_dir()
        except OSError as e:  # unreadable: bound only what this process writes
            log.warning("cannot scan the chunk cache %s: %s", self.directory, e)
        finally:
            with self._disk_lock:
                lru = OrderedDict((digest, size) for _, digest, size in sorted(found))
                for digest, size in self._pending.items():
                    lru[digest] = size
                    lru.move_to_end(digest)
                self._pending.clear()
                self._lru, self._disk_total = lru, sum(lru.values())
                self._scanning = False
                self.scans += 1
        self._evict()

    def _read_dir(self) -> list[tuple[float, bytes, int]]:
        assert self.directory is not None
        now = time.time()
        found: list[tuple[float, bytes, int]] = []
        try:
            folders = [f.path for f in os.scandir(self.directory) if f.is_dir()]
        except FileNotFoundError:
            return found
        for folder in folders:
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if entry.name.startswith(".tmp-"):
                    if now - st.st_mtime > STALE_TMP_SECONDS:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                            self.stats.stale_removed += 1
                    continue
                try:
                    digest = bytes.fromhex(entry.name)
                except ValueError:
                    continue
                if len(digest) == 32:
                    found.append((st.st_mtime, digest, st.st_size))
        return found

    def _use(self, digest: bytes, size: int) -> bool:
        """Mark ``digest`` (``size`` bytes on disk) the most recently used; caller holds
        the lock. Returns whether the index must still be built."""
        if self._lru is None:
            self._pending[digest] = size
            self._pending.move_to_end(digest)
            return not self._scanning
        if digest not in self._lru:
            self._disk_total += size
        self._lru[digest] = size
        self._lru.move_to_end(digest)
        return False

    def _touch(self, digest: bytes, path: str, size: int) -> None:
        """A hit (or a rewrite) of a file on disk: now the most recently used."""
        with contextlib.suppress(OSError):
            os.utime(path)  # recency for other processes and the next scan
        with self._disk_lock:
            self._use(digest, size)
        self._evict()

    def _add(self, digest: bytes, size: int) -> None:
        with self._disk_lock:
            must_scan = self._use(digest, size)
        if must_scan:  # nobody opened the index yet: the first write does
            self.scan()
        self._evict()

    def _forget(self, digest: bytes) -> None:
        with self._disk_lock:
            self._pending.pop(digest, None)
            if self._lru is not None:
                self._disk_total -= self._lru.pop(digest, 0)

    @property
    def disk_bytes(self) -> int:
        """Bytes of chunk files this cache knows of (after :meth:`scan`)."""
        return self._disk_total

    def _evict(self) -> None:
        if self.max_disk_bytes is None:
            return
        with self._disk_lock:
            if self._lru is None or self._disk_total <= self.max_disk_bytes:
                return
            target = self.max_disk_bytes * 9 // 10
            while self._lru and self._disk_total > target:
                digest, size = self._lru.popitem(last=False)
                self._disk_total -= size
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(digest))
                    self.stats.evicted += 1

    def _remember(self, digest: bytes, data: bytes) -> None:
        if len(data) <= self._memory.maxsize:
            with self._lock:
                self._memory[digest] = data
