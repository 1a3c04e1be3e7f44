"""Test helper process: mount local layer blobs (bottom first) with the real FUSE daemon.

Usage: python tests/mount_blobs.py [--stock-open] [--record-access FILE] MOUNTPOINT BLOB [BLOB...]

--stock-open: file handles from open/opendir, as with a stock pyfuse3.
"""

from __future__ import annotations

import logging
import sys

import trio

from stargzfs.fuse.daemon import serve
from stargzfs.index import load_index
from stargzfs.source import FileSource
from stargzfs.view import ImageView, LayerView


async def main(mountpoint: str, blobs: list[str], record: str | None, kernel_open: bool) -> None:
    layers = []
    for blob in blobs:
        source = FileSource(blob)
        layers.append(LayerView(source, await load_index(source), blob))
    await serve(ImageView(layers), mountpoint, record_access=record, kernel_open=kernel_open)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    args = sys.argv[1:]
    kernel_open = "--stock-open" not in args
    args = [a for a in args if a != "--stock-open"]
    record = None
    if args[0] == "--record-access":
        record, args = args[1], args[2:]
    trio.run(main, args[0], args[1:], record, kernel_open)
