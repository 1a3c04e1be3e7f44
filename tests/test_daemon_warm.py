"""The daemon's kernel warm-up reads prioritized files through its own mount: it must never
follow a symlink or read anything but a regular file, whatever an image puts at those paths."""

from __future__ import annotations

import os
import time
from pathlib import Path

from stargzfs.fuse.daemon import _read_through


def test_read_through_reads_regular_files_only(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x" * 3_000_000)
    (tmp_path / "zero").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    started = time.monotonic()
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        done = _read_through(root, ["zero", "fifo", "dir", "missing", "file"])
    finally:
        os.close(root)
    assert done == 1
    assert time.monotonic() - started < 5  # /dev/zero or a FIFO would never end
