"""Child process of :class:`~stargzfs.pull.extract.ProcessDecompressor`: decompresses stdin to
stdout (multi-member gzip, multi-frame zstd, or plain) and, at the end, writes the sha256 of
the output to stderr as ``sha256:<hex>``. Runs in its own process so decompression and
hashing use a core of their own, free of the extractor's GIL."""

from __future__ import annotations

import os
import sys
import time


class _Follow:
    """Reads a file that is still being written, up to ``size`` bytes, waiting at its end.
    Gives up when the parent process goes away (it kills us when the download fails)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size, self.pos = fd, size, 0
        self.parent = os.getppid()

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.pos
        if left <= 0:
            return b""
        want = left if n < 0 else min(n, left)
        while True:
            data = os.read(self.fd, want)
            if data:
                self.pos += len(data)
                return data
            if os.getppid() != self.parent:
                raise SystemExit(4)
            time.sleep(0.005)


def main() -> int:
    from ..errors import StargzfsError
    from .extract import Decompressor

    compression = sys.argv[1]
    if compression not in ("none", "gzip", "zstd"):
        print(f"unknown compression {compression!r}", file=sys.stderr)
        return 2
    out = sys.stdout.buffer
    try:
        source: object = sys.stdin.buffer
        if len(sys.argv) > 2:  # a growing file of this final size
            source = _Follow(sys.stdin.fileno(), int(sys.argv[2]))
        d = Decompressor(source, compression, hash_output=True)  # type: ignore[arg-type]
        while data := d.read(1 << 20):
            out.write(data)
        out.flush()
    except BrokenPipeError:
        return 3
    except StargzfsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    assert d.hasher is not None
    print("sha256:" + d.hasher.hexdigest(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
