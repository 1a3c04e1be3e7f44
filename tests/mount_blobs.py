"""Test helper process: mount local layer blobs (bottom first) with the real FUSE daemon.

Usage: python tests/mount_blobs.py [--record-access FILE] MOUNTPOINT BLOB [BLOB...]
"""

from __future__ import annotations

import logging
import sys

import trio

from stargzfs.fuse.daemon import serve
from stargzfs.index import load_index
from stargzfs.source import FileSource
from stargzfs.view import ImageView, LayerView


async def main(mountpoint: str, blobs: list[str], record: str | None) -> None:
    layers = []
    for blob in blobs:
        source = FileSource(blob)
        layers.append(LayerView(source, await load_index(source), blob))
    await serve(ImageView(layers), mountpoint, record_access=record)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    args = sys.argv[1:]
    record = None
    if args[0] == "--record-access":
        record, args = args[1], args[2:]
    trio.run(main, args[0], args[1:], record)
