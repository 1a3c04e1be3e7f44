"""A content-addressed blob cache: ``<root>/blobs/sha256/<hex>`` (verified, complete) and
``<root>/blobs/sha256/<hex>.partial`` (an interrupted download, kept for resuming).

A blob only gets its final name after its sha256 was checked, by an atomic rename; a
``.partial`` file holds a prefix of the blob as it came off the wire. Two processes never
append to the same ``.partial``: the writer holds an exclusive ``flock`` on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from ..errors import UsageError
from ..reference import parse_digest

__all__ = ["BlobCache", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/stargzfs`` or ``~/.cache/stargzfs`` (shared with the mount)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stargzfs"


class BlobCache:
    """Blobs by digest under ``root``. Only ``sha256`` digests are stored."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.dir = self.root / "blobs" / "sha256"

    def _hex(self, digest: str) -> str:
        algorithm, hexpart = parse_digest(digest)
        if algorithm != "sha256":
            raise UsageError(f"blob cache: unsupported digest algorithm in {digest}")
        return hexpart

    def path(self, digest: str) -> Path:
        """Where the complete, verified blob lives (whether or not it is there)."""
        return self.dir / self._hex(digest)

    def partial_path(self, digest: str) -> Path:
        return self.dir / (self._hex(digest) + ".partial")

    def lookup(self, digest: str, size: int | None = None) -> Path | None:
        """The cached blob's path, or ``None``. A file of the wrong size is dropped."""
        path = self.path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if size is not None and st.st_size != size:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        return path

    def open_partial(self, digest: str) -> tuple[int, Path] | None:
        """Open (creating) the blob's ``.partial`` for appending, locked; returns ``(fd,
        path)``, or ``None`` when another process is writing it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.partial_path(digest)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd, path

    def commit(self, digest: str, partial: Path) -> Path:
        """Give a verified ``partial`` its final name (atomic)."""
        final = self.path(digest)
        with contextlib.suppress(OSError):
            os.chmod(partial, 0o444)  # blobs may be hardlinked into layouts: discourage writes
        os.replace(partial, final)
        return final

    def discard(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def usage(self) -> tuple[int, int]:
        """(number of complete blobs, their total size)."""
        count = total = 0
        if self.dir.is_dir():
            for entry in os.scandir(self.dir):
                if entry.is_file(follow_symlinks=False) and "." not in entry.name:
                    count += 1
                    total += entry.stat(follow_symlinks=False).st_size
        return count, total
