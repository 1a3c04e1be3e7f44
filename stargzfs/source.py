"""The "read bytes at offset" protocol that every blob reader in stargzfs goes through.

A :class:`ByteSource` is one immutable blob of known size: a registry blob read with HTTP
ranges, a local file (an OCI layout's blob, a test fixture), bytes in memory, or a cache in
front of any of those. Format code never knows which.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import trio

from .errors import FormatError

__all__ = ["ByteSource", "BytesSource", "FileSource", "TailCachedSource", "check_range"]


@runtime_checkable
class ByteSource(Protocol):
    """An immutable blob of ``size`` bytes that can be read at any offset."""

    @property
    def size(self) -> int: ...

    async def read_at(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``; raise if the range is outside the blob."""
        ...


def check_range(size: int, offset: int, length: int, what: str = "blob") -> None:
    """Raise :class:`FormatError` unless ``[offset, offset+length)`` lies within ``size``."""
    if offset < 0 or length < 0 or offset + length > size:
        raise FormatError(
            f"range {offset}+{length} is outside the {what} ({size} bytes): truncated or corrupt"
        )


class BytesSource:
    """A blob held in memory (tests, small TOCs)."""

    def __init__(self, data: bytes, name: str = "bytes") -> None:
        self._data = data
        self.name = name

    @property
    def size(self) -> int:
        return len(self._data)

    async def read_at(self, offset: int, length: int) -> bytes:
        check_range(len(self._data), offset, length, self.name)
        return self._data[offset : offset + length]


class FileSource:
    """A blob in a local file, read with ``pread`` (no shared file position)."""

    # Small reads are cheaper inline than a thread hop; big ones must not block the loop.
    _INLINE_READ = 256 * 1024

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def read_at_sync(self, offset: int, length: int) -> bytes:
        check_range(self._size, offset, length, self.path)
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise FormatError(f"{self.path}: short read at {offset} (file changed?)")
        return data

    async def read_at(self, offset: int, length: int) -> bytes:
        if length <= self._INLINE_READ:
            return self.read_at_sync(offset, length)
        return await trio.to_thread.run_sync(self.read_at_sync, offset, length)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TailCachedSource:
    """Keeps the blob's tail once it has been read (opening a lazy layer reads its last few
    hundred KiB for the footer and TOC) and serves later reads inside it from memory. For
    small layers that is the whole blob: after the TOC, no chunk read costs a request."""

    def __init__(self, inner: ByteSource, max_tail: int = 1 << 20) -> None:
        self.inner = inner
        self.max_tail = max_tail
        self._tail_start = inner.size
        self._tail = b""

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def stats(self) -> object:
        return getattr(self.inner, "stats", None)

    async def read_at(self, offset: int, length: int) -> bytes:
        # One snapshot: a concurrent tail read may replace the kept tail while we await.
        tail_start, tail = self._tail_start, self._tail
        if offset >= tail_start:
            check_range(self.inner.size, offset, length)
            start = offset - tail_start
            return tail[start : start + length]
        if offset + length > tail_start:
            # Straddles the kept tail: fetch only what lies before it.
            check_range(self.inner.size, offset, length)
            head = await self.inner.read_at(offset, tail_start - offset)
            return head + tail[: offset + length - tail_start]
        data = await self.inner.read_at(offset, length)
        if offset + length == self.inner.size and length <= self.max_tail:
            self._tail_start, self._tail = offset, data
        return data
