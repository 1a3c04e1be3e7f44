"""A registry blob as a :class:`stargzfs.source.ByteSource`: every read is a range GET."""

from __future__ import annotations

from collections.abc import Sequence

from ..reference import Repository, validate_digest
from ..source import check_range
from .client import BlobStats, RegistryClient

__all__ = ["RegistryBlobSource"]


class RegistryBlobSource:
    """``read_at`` on a blob in a registry, through a shared :class:`RegistryClient`.

    ``size`` comes from the manifest's descriptor (trusted: the manifest was verified), so
    out-of-range reads fail locally without a request. Reads are not verified here: the chunk
    reader checks every chunk against its TOC digest. ``stats`` counts what went over the
    network for this blob (shared by every source of the same blob).
    """

    def __init__(self, client: RegistryClient, repo: Repository, digest: str, size: int) -> None:
        if size < 0:
            raise ValueError(f"negative blob size {size}")
        self.client = client
        self.repo = repo
        self.digest = validate_digest(digest)
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    @property
    def stats(self) -> BlobStats:
        return self.client.blob_stats(self.repo, self.digest)

    async def read_at(self, offset: int, length: int) -> bytes:
        check_range(self._size, offset, length, f"blob {self.digest}")
        return await self.client.get_blob_range(self.repo, self.digest, offset, length)

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several ``(offset, length)`` reads at once (multi-range when the registry can)."""
        for offset, length in ranges:
            check_range(self._size, offset, length, f"blob {self.digest}")
        return await self.client.get_blob_ranges(self.repo, self.digest, ranges)

    def __repr__(self) -> str:
        return f"RegistryBlobSource({self.repo}@{self.digest}, {self._size} bytes)"
