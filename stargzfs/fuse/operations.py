"""pyfuse3 operations over an :class:`~stargzfs.view.ImageView`: a thin, read-only adapter.

Every handler is wrapped so that no exception but ``FUSEError`` reaches pyfuse3 (anything
else kills the daemon and leaves "Transport endpoint is not connected" behind): the
project's errors become their errno, anything unexpected becomes EIO with a log line.

With the patched pyfuse3 that ``make venv`` builds (``scripts/build-pyfuse3.sh``), open and
opendir answer ENOSYS: the kernel then opens files and directories without asking (no open,
release, opendir or releasedir round trips), keeps their pages and caches directory listings
(FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR are its defaults for a filesystem without open), and
caches symlink targets; read and readdir get the inode in place of a file handle. A stock
pyfuse3 gets file handles as before.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3
from cachetools import LRUCache

from .._process import process_state
from ..errors import StargzfsError
from ..index import Node
from ..view import ImageView
from .lookup_trace import LookupTrace

__all__ = ["STATS_XATTR", "ImageOperations"]

log = logging.getLogger(__name__)

# The image never changes under a mount: let the kernel cache names and attributes.
CACHE_TIMEOUT = 24 * 3600.0
BLOCK_SIZE = 128 * 1024  # st_blksize: makes cp & co. read in large pieces
# `stargzfs stats` reads this (it is not listed by listxattr, so the image tree is unchanged).
STATS_XATTR = b"user.stargzfs.stats"
# pyfuse3 built with scripts/build-pyfuse3.sh: see the module docstring.
KERNEL_OPEN = "fh_is_inode" in getattr(pyfuse3, "STARGZFS_EXTENSIONS", ())


# With the pid, names this process and no other (see `stargzfs umount`).
_START_TIME = (process_state(os.getpid()) or ("", 0))[1]

_TYPE_BITS = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}

P = ParamSpec("P")
T = TypeVar("T")


def _guard(func: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    name = func.__name__

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        # Requests per operation, for `stargzfs stats`: what the kernel still asks us.
        ops: ImageOperations = args[0]  # type: ignore[assignment]
        ops.requests[name] += 1
        try:
            return await func(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except StargzfsError as e:
            log.warning("%s: %s", func.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            log.exception("%s failed unexpectedly", func.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class ImageOperations(pyfuse3.Operations):
    """Read-only FUSE view of a merged image."""

    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        view: ImageView,
        record_access: str | None = None,
        kernel_open: bool = True,
        trace: LookupTrace | None = None,
    ) -> None:
        super().__init__()
        # kernel_open: where the patched pyfuse3 is installed (False: file handles anyway).
        # Read by it at FUSE init; a stock one ignores them, so they must stay False there
        # (the kernel would send file handle 0 for every file).
        self.fh_is_inode = self.enable_cache_symlinks = kernel_open and KERNEL_OPEN
        self.requests: Counter[str] = Counter()
        # The name requests, for the next mount of the image to ask before ready.
        self.trace = trace
        self._pid = os.getpid()  # requests from it are the daemon's own (warm-up, replay)
        self.view = view
        # --record-access: each file's path on its first read, in order (for `optimize`).
        self._record = open(record_access, "a", buffering=1) if record_access else None  # noqa: SIM115
        self._recorded: set[int] = set()
        self.tree = view.tree
        self._next_fh = 1
        self._files: dict[int, Node] = {}
        self._dirs: dict[int, list[Node]] = {}
        # fh_is_inode: a listing read in several readdir calls, kept between them (dropped
        # at its end; bounded for listings abandoned midway). The tree caches listings too,
        # but not those too big for its cache: without this, each readdir call of a
        # directory of 500,000+ entries would list it all again.
        self._listings: LRUCache[int, list[Node]] = LRUCache(maxsize=16)

    def init(self) -> None:
        # The patched pyfuse3 has set fh_is_inode to what the kernel supports by now.
        log.debug("kernel opens files and directories itself: %s", self.fh_is_inode)

    # -- attributes ---------------------------------------------------------------------

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        entry = node.entry
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.generation = 0
        attr.entry_timeout = CACHE_TIMEOUT
        attr.attr_timeout = CACHE_TIMEOUT
        attr.st_mode = _TYPE_BITS[entry.kind] | entry.mode
        attr.st_nlink = self.tree.nlink(node)
        attr.st_uid = entry.uid
        attr.st_gid = entry.gid
        attr.st_rdev = os.makedev(entry.devmajor, entry.devminor)
        attr.st_size = entry.size
        attr.st_blksize = BLOCK_SIZE
        attr.st_blocks = (entry.size + 511) // 512
        mtime = entry.mtime_ns or 0
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime
        return attr

    def _is_own(self, ctx: Any) -> bool:
        """Whether a request comes from this daemon (its warm-up or replay threads)."""
        return ctx is not None and ctx.pid == self._pid

    def _node(self, inode: int) -> Node:
        return self.tree.get(inode)

    @_guard
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(self._node(inode))

    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        parent = self._node(parent_inode)
        if name == b".":
            return self._attr(parent)
        if name == b"..":
            raise pyfuse3.FUSEError(errno.ENOENT)  # the kernel resolves ".." itself
        if self.trace is not None:
            self.trace.lookup(parent_inode, name, own=self._is_own(ctx))
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:  # image names are UTF-8 (TOCs are JSON): not there
            node = None
        else:
            node = self.tree.lookup(parent, text)
        if node is None:
            # Inode 0 with a timeout is a negative entry the kernel caches: programs probe
            # many paths that don't exist (Python's imports, the dynamic loader).
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = CACHE_TIMEOUT
            return negative
        return self._attr(node)

    @_guard
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self._node(inode)
        if node.entry.kind != "symlink":
            raise pyfuse3.FUSEError(errno.EINVAL)
        # Only where the kernel keeps targets (it opens files itself only on kernels that
        # do; the patch writes back fh_is_inode, not enable_cache_symlinks).
        if self.trace is not None and self.fh_is_inode:
            self.trace.readlink(inode, own=self._is_own(ctx))
        return os.fsencode(node.entry.linkname)

    # -- directories --------------------------------------------------------------------

    @_guard
    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self._node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if self.fh_is_inode:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel opens it, and later ones, itself
        fh = self._new_fh()
        self._dirs[fh] = self.tree.children(node)
        return fh

    @_guard
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if self.fh_is_inode:
            if self.trace is not None and start_id == 0:  # (listings are kept only here)
                self.trace.readdir(fh)
            children = self._listings.pop(fh, None)
            if children is None:
                children = self.tree.children(self._node(fh))
        else:
            children = self._dirs.get(fh)
            if children is None:
                raise pyfuse3.FUSEError(errno.EBADF)
        for i in range(start_id, len(children)):
            node = children[i]
            if not pyfuse3.readdir_reply(
                token, os.fsencode(node.entry.name), self._attr(node), i + 1
            ):
                if self.fh_is_inode:
                    self._listings[fh] = children
                break

    @_guard
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files --------------------------------------------------------------------------

    @_guard
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self._node(inode)
        if node.entry.kind != "reg":
            raise pyfuse3.FUSEError(errno.EINVAL)
        if self.fh_is_inode:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel opens it, and later ones, itself
        fh = self._new_fh()
        self._files[fh] = node
        # keep_cache: the page cache stays valid across opens (the image is immutable).
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._node(fh) if self.fh_is_inode else self._files.get(fh)
        if node is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if self._record is not None and node.ino not in self._recorded:
            self._recorded.add(node.ino)
            self._record.write(self._path(node) + "\n")
        try:
            return await self.view.read(node, off, size)
        except StargzfsError as e:
            # The generic guard logs too, but without the file's name.
            log.warning("read of /%s at %d failed: %s", self._path(node), off, e)
            raise pyfuse3.FUSEError(e.errno) from None

    def _path(self, node: Node) -> str:
        return self.tree.layer_of(node).path_of(node.entry.name_id)

    @_guard
    async def release(self, fh: int) -> None:
        self._files.pop(fh, None)

    # -- extended attributes, statfs ------------------------------------------------------

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name == STATS_XATTR:
            # Reading the stats is not a request of the workload's: not counted.
            self.requests["getxattr"] -= 1
            if not self.requests["getxattr"]:
                del self.requests["getxattr"]
            stats = self.view.stats() | {
                "fuse_requests": dict(self.requests),
                # `stargzfs umount` waits for this process to exit.
                "pid": os.getpid(),
                "pid_start": _START_TIME,
                "kernel_open": self.fh_is_inode,  # False: a stock pyfuse3 (or an old kernel)
                "lookup_trace": None
                if self.trace is None
                else {"recorded": len(self.trace), "replayed": self.trace.replayed},
            }
            return json.dumps(stats).encode()
        xattrs = self._node(inode).entry.xattrs
        value = xattrs.get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @_guard
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [os.fsencode(k) for k in self._node(inode).entry.xattrs]

    @_guard
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        total = sum(layer.index.entry_count for layer in self.view.layers)
        # Like squashfs/erofs: the image's (compressed) size, rounded up to whole blocks.
        data.f_blocks = -(-sum(layer.source.size for layer in self.view.layers) // 4096)
        data.f_bfree = data.f_bavail = 0
        data.f_files = total
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # -- read-only: every modification is EROFS ----------------------------------------

    async def _erofs(self, *args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _erofs
    create = write = setxattr = removexattr = _erofs

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh
