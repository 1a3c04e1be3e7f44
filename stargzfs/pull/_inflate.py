"""Child process of :class:`~stargzfs.pull.extract.ProcessDecompressor`: decompresses stdin to
stdout (multi-member gzip, multi-frame zstd, or plain) and, at the end, writes the sha256 of
the output to stderr as ``sha256:<hex>``. Runs in its own process so decompression and
hashing use a core of their own, free of the extractor's GIL."""

from __future__ import annotations

import sys


def main() -> int:
    from ..errors import StargzfsError
    from .extract import Decompressor

    compression = sys.argv[1]
    if compression not in ("none", "gzip", "zstd"):
        print(f"unknown compression {compression!r}", file=sys.stderr)
        return 2
    out = sys.stdout.buffer
    try:
        d = Decompressor(sys.stdin.buffer, compression, hash_output=True)  # type: ignore[arg-type]
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
