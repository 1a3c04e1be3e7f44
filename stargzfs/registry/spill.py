"""Where a blob goes when its registry cannot serve byte ranges.

Some registries and proxies answer a ``Range`` GET with ``200`` and the whole blob (ECR,
distribution in proxy mode before its cache is warm). Re-downloading the blob for every small
read would be quadratic, so the client downloads it **once**, verifies its digest while it
streams, and serves every later range of that blob from the local copy.

A :data:`SpillFactory` decides where that copy lives; :class:`TempSpill` (the default) keeps
small blobs in memory and larger ones in an unlinked temporary file (nothing to clean up, the
space is freed when the client closes). A cache layer can pass its own factory to put the blob
into its content-addressed store instead.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from ..source import ByteSource, BytesSource, FileSource

__all__ = ["SpillFactory", "SpillWriter", "TempSpill"]


class SpillWriter(Protocol):
    """Receives one blob's bytes in order; the client verifies the digest before ``finish``."""

    async def write(self, data: bytes) -> None: ...

    async def finish(self) -> ByteSource:
        """All bytes written and verified: the blob, readable at any offset."""
        ...

    async def discard(self) -> None:
        """The download failed or did not verify: drop what was written."""
        ...


# (digest, size if known) -> a writer for that blob
SpillFactory = Callable[[str, int | None], Awaitable[SpillWriter]]


class _TempWriter:
    def __init__(self, owner: TempSpill, digest: str, size: int | None) -> None:
        self._owner = owner
        self._digest = digest
        self._buf = bytearray()
        self._fd = -1
        if size is not None and size > owner.max_memory:
            self._open_file()

    def _open_file(self) -> None:
        fd, path = tempfile.mkstemp(prefix="stargzfs-spill-", dir=self._owner.directory)
        os.unlink(path)  # anonymous: freed on close even if we crash
        self._fd = fd

    async def write(self, data: bytes) -> None:
        if self._fd < 0 and len(self._buf) + len(data) > self._owner.max_memory:
            self._open_file()
            await trio.to_thread.run_sync(os.write, self._fd, bytes(self._buf))
            self._buf = bytearray()
        if self._fd < 0:
            self._buf += data
        else:
            view = memoryview(data)
            while view:
                n = await trio.to_thread.run_sync(os.write, self._fd, view)
                view = view[n:]

    async def finish(self) -> ByteSource:
        if self._fd < 0:
            return BytesSource(bytes(self._buf), self._digest)
        # The file has no name left: reopen it through its descriptor for pread access.
        source = FileSource(f"/proc/self/fd/{self._fd}")
        os.close(self._fd)
        self._fd = -1
        self._owner._open.append(source)
        return source

    async def discard(self) -> None:
        self._buf = bytearray()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class TempSpill:
    """Default spill: memory up to ``max_memory`` bytes per blob, else an unlinked temp file."""

    def __init__(self, *, max_memory: int = 16 * 1024 * 1024, directory: str | None = None):
        self.max_memory = max_memory
        self.directory = directory
        self._open: list[FileSource] = []

    async def __call__(self, digest: str, size: int | None) -> SpillWriter:
        return _TempWriter(self, digest, size)

    def close(self) -> None:
        for source in self._open:
            source.close()
        self._open.clear()
