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
    started: float = 0.0
    start_bytes: int = 0
    finished_at: float = 0.0

    def line(self, digest: str, now: float) -> str:
        name = digest.split(":")[-1][:12]
        if self.cached:
            return f"  {name}  {human_bytes(self.size):>10}  cached"
        end = self.finished_at if self.finished else now
        elapsed = max(end - self.started, 1e-6)
        speed = (self.done_bytes - self.start_bytes) / elapsed
        if self.finished:
            state = f"done  {human_bytes(speed)}/s"
        else:
            left = self.size - self.done_bytes
            eta = f"ETA {left / speed:.0f}s" if speed > 0 else "ETA ?"
            state = f"{human_bytes(speed)}/s  {eta}"
        return (
            f"  {name}  {human_bytes(self.done_bytes):>10} / {human_bytes(self.size):<10}  {state}"
        )


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
        self._tty_lines = 0  # lines of the live display on screen (TTY)
        self.stage = "downloading"

    def start(self, digest: str, size: int, have: int = 0) -> None:
        blob = self.blobs.setdefault(digest, _Blob(size))
        blob.done_bytes = blob.start_bytes = have
        blob.started = time.monotonic()

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
            blob.finished_at = time.monotonic()

    def line(self) -> str:
        total = sum(b.size for b in self.blobs.values())
        done = sum(b.done_bytes for b in self.blobs.values())
        fetched = sum(b.done_bytes - b.start_bytes for b in self.blobs.values() if not b.cached)
        finished = sum(1 for b in self.blobs.values() if b.finished)
        elapsed = max(time.monotonic() - self.started, 1e-6)
        speed = fetched / elapsed
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
            # one line per blob and a total, redrawn in place
            lines = [b.line(d, now) for d, b in self.blobs.items()] + [self.line()]
            up = f"\x1b[{self._tty_lines}F" if self._tty_lines else "\r"
            self.stream.write(up + "".join("\x1b[K" + ln + "\n" for ln in lines))
            self._tty_lines = len(lines)
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.quiet:
            return
        self._tty_lines = 0  # the live display stays above; a next frame starts below
        self.stream.write(text + "\n")
        self.stream.flush()
