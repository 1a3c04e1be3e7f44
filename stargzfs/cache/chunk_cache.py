"""Verified, uncompressed chunks: a memory LRU in front of a content-addressed disk store.

Keys are the chunks' sha256 digests, so identical content is stored once across layers and
images, and concurrent mounts can share one directory: a chunk file is written under a
temporary name and renamed into place (readers see all of it or nothing). A file read back
from disk is verified again before use — the disk is outside our control — and a bad one is
deleted and treated as a miss.
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


class ChunkCache:
    """Blocking API: call it from a worker thread when the disk may be touched."""

    def __init__(self, directory: str | os.PathLike[str] | None, *, memory_bytes: int = 64 << 20):
        self.directory = os.path.join(os.fspath(directory), "chunks") if directory else None
        self._memory: LRUCache[bytes, bytes] = LRUCache(maxsize=memory_bytes, getsizeof=len)
        self._lock = threading.Lock()  # cachetools caches are not thread-safe
        self.stats = CacheStats()

    def _path(self, digest: bytes) -> str:
        assert self.directory is not None
        hexd = digest.hex()
        return os.path.join(self.directory, hexd[:2], hexd)

    def has(self, digest: bytes) -> bool:
        """Whether the chunk is cached (memory, or a file on disk; not re-verified here)."""
        if self.get_memory(digest) is not None:
            return True
        return self.directory is not None and os.path.exists(self._path(digest))

    def get_memory(self, digest: bytes) -> bytes | None:
        """The memory tier only: never blocks, safe on the event loop."""
        with self._lock:
            return self._memory.get(digest)

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

    def _remember(self, digest: bytes, data: bytes) -> None:
        if len(data) <= self._memory.maxsize:
            with self._lock:
                self._memory[digest] = data
