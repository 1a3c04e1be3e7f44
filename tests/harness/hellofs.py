"""A tiny read-only pyfuse3 filesystem with one file, for testing the mount harness.

    python hellofs.py MOUNTPOINT [--content TEXT] [--auto-unmount]

The root holds ``hello`` (default content ``hello, world\\n``). It follows the rules in
shared/fuse-notes.md: ``pyfuse3.main()`` under trio, SIGTERM/SIGINT call
``pyfuse3.terminate()``, ``pyfuse3.close()`` always runs, long entry/attr timeouts and
``keep_cache``. Without ``--auto-unmount`` a SIGKILL leaves a stale mount on purpose (tests
check that the harness removes it).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

HELLO_NAME = b"hello"
HELLO_INODE = pyfuse3.ROOT_INODE + 1
DEFAULT_CONTENT = b"hello, world\n"


class HelloFS(pyfuse3.Operations):
    def __init__(self, content: bytes) -> None:
        super().__init__()
        self.content = content

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o755
            entry.st_nlink = 2
            entry.st_size = 0
        elif inode == HELLO_INODE:
            entry.st_mode = stat.S_IFREG | 0o644
            entry.st_nlink = 1
            entry.st_size = len(self.content)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry.st_ino = inode
        entry.st_uid = os.getuid()
        entry.st_gid = os.getgid()
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = 1_700_000_000 * 10**9
        entry.entry_timeout = entry.attr_timeout = 300
        return entry

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != HELLO_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(pyfuse3.InodeT(HELLO_INODE))

    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        if start_id == 0:
            attrs = await self.getattr(pyfuse3.InodeT(HELLO_INODE))
            pyfuse3.readdir_reply(token, HELLO_NAME, attrs, 1)

    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if inode != HELLO_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), keep_cache=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        return self.content[off : off + size]


async def _serve() -> None:
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()

        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mountpoint")
    parser.add_argument("--content", default=DEFAULT_CONTENT.decode())
    parser.add_argument("--auto-unmount", action="store_true")
    args = parser.parse_args(argv)
    options = set(pyfuse3.default_options) | {"fsname=hellofs", "ro"}
    if args.auto_unmount:
        options.add("auto_unmount")
    pyfuse3.init(HelloFS(args.content.encode()), args.mountpoint, options)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
