"""Progress reporting for pulls: one line rewritten in place on a terminal, periodic plain
lines otherwise, nothing when quiet."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

__all__ = ["Progress", "human_bytes"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


@dataclass
class _Blob:
    size: int
    done_bytes: int = 0
    finished: bool = False
    cached: bool = False


class Progress:
    """Counts bytes per blob; :meth:`tick` prints a status line when one is due."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        quiet: bool = False,
        interval: float | None = None,
        tty: bool | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval if interval is not None else (0.2 if self.tty else 2.0)
        self.blobs: dict[str, _Blob] = {}
        self.started = time.monotonic()
        self._last = 0.0
        self._wrote_tty_line = False
        self.stage = "downloading"

    def start(self, digest: str, size: int, have: int = 0) -> None:
        blob = self.blobs.setdefault(digest, _Blob(size))
        blob.done_bytes = have

    def cached(self, digest: str, size: int) -> None:
        self.blobs[digest] = _Blob(size, size, True, True)

    def advance(self, digest: str, n: int) -> None:
        blob = self.blobs.get(digest)
        if blob is not None:
            blob.done_bytes += n

    def finish(self, digest: str) -> None:
        blob = self.blobs.get(digest)
        if blob is not None:
            blob.finished = True
            blob.done_bytes = blob.size

    def line(self) -> str:
        total = sum(b.size for b in self.blobs.values())
        done = sum(b.done_bytes for b in self.blobs.values())
        finished = sum(1 for b in self.blobs.values() if b.finished)
        elapsed = max(time.monotonic() - self.started, 1e-6)
        speed = done / elapsed
        eta = (total - done) / speed if speed > 0 and total > done else 0.0
        return (
            f"{self.stage}: {finished}/{len(self.blobs)} blobs, {human_bytes(done)} of "
            f"{human_bytes(total)}, {human_bytes(speed)}/s, ETA {eta:.0f}s"
        )

    def tick(self, *, force: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line())
            self._wrote_tty_line = True
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self._wrote_tty_line:
            self.stream.write("\r\x1b[K")
            self._wrote_tty_line = False
        self.stream.write(text + "\n")
        self.stream.flush()
