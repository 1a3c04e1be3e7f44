"""Verified, uncompressed chunks: a memory LRU in front of a content-addressed disk store.

Keys are the chunks' sha256 digests, so identical content is stored once across layers and
images, and concurrent mounts can share one directory: a chunk file is written under a
temporary name and renamed into place (readers see all of it or nothing). A file read back
from disk is verified again before use — the disk is outside our control — and a bad one is
deleted and treated as a miss.

With ``max_disk_bytes`` the disk store is bounded: when a write takes it over the limit, the
least recently used chunk files (by mtime, refreshed on every hit) are deleted until it is
at 90% of it. Several processes may share a directory; each keeps its own running total, so
the bound is approximate, and a file evicted under another reader is just a miss for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass

from cachetools import LRUCache

__all__ = ["CacheStats", "ChunkCache"]


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    stored: int = 0
    corrupt: int = 0
    evicted: int = 0


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
        self._memory: LRUCache[bytes, bytes] = LRUCache(maxsize=memory_bytes, getsizeof=len)
        self._lock = threading.Lock()  # cachetools caches are not thread-safe
        self._disk_lock = threading.Lock()
        self._disk_total: int | None = None  # bytes on disk, scanned on first need
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
                    os.utime(path)  # recency, for size-bounded eviction
                    return data
                self.stats.corrupt += 1
                with contextlib.suppress(OSError):
                    os.unlink(path)
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
        self._account(len(data))

    def _files(self) -> list[tuple[float, int, str]]:
        """(mtime, size, path) of every chunk file."""
        assert self.directory is not None
        out = []
        for folder in os.scandir(self.directory):
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder.path):
                if entry.name.startswith(".tmp-"):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    out.append((st.st_mtime, st.st_size, entry.path))
        return out

    def _account(self, added: int) -> None:
        if self.max_disk_bytes is None:
            return
        with self._disk_lock:
            if self._disk_total is None:
                self._disk_total = sum(size for _, size, _ in self._files())
            else:
                self._disk_total += added
            if self._disk_total <= self.max_disk_bytes:
                return
            files = sorted(self._files())
            total = sum(size for _, size, _ in files)
            target = self.max_disk_bytes * 9 // 10
            for _, size, path in files:
                if total <= target:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    self.stats.evicted += 1
                total -= size
            self._disk_total = total

    def _remember(self, digest: bytes, data: bytes) -> None:
        if len(data) <= self._memory.maxsize:
            with self._lock:
                self._memory[digest] = data
