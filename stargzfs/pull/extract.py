"""Safe, streaming application of layer tars onto a root directory.

Layers are applied bottom to top with the OCI whiteout rules (``.wh.NAME`` deletes NAME from
lower layers, ``.wh..wh..opq`` hides every lower child of its directory, a non-directory
replaces whatever was below). eStargz's ``stargz.index.json`` and landmark files are dropped.

Safety (a hostile layer must not escape the root): every name is cleaned as upstream cleans
it (:func:`~stargzfs.formats.toc.clean_name`): a leading ``/`` is removed with a warning (as
GNU tar and containerd do: the name is taken relative to the root), and a ``..`` that would
leave the root, or a NUL, is refused; every path is
walked from a directory fd of the root one component at a time with ``O_NOFOLLOW``; a
symlink in a parent position (Debian's merged ``/usr``: ``lib -> usr/lib``) is resolved by
hand as if the root were ``/`` (like containerd), and refused when it leads above the root,
loops, or to no existing directory; the entry itself is never followed: files are created
with ``O_EXCL|O_NOFOLLOW`` relative to their parent's fd; hardlinks must point at an
existing non-directory inside the root. Errors name the entry.

Directory metadata (mode, owner, times) is applied once at the end, deepest first, so
creating children doesn't disturb it and a read-only directory doesn't block its children.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import shutil
import stat
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from ..errors import FormatError, StargzfsError, UnsafePathError
from ..formats.toc import HIDDEN_NAMES, clean_name
from .tarstream import TarFormatError, TarMember, TarReader

__all__ = ["ApplyStats", "LayerApplier"]

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
_SCHILY_XATTR = "SCHILY.xattr."
_LIBARCHIVE_XATTR = "LIBARCHIVE.xattr."
_XATTR_PREFIXES = (_SCHILY_XATTR, _LIBARCHIVE_XATTR)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_LINK_HOPS = 40  # symlinks followed in one parent walk (Linux's limit too)


# --------------------------------------------------------------------------- applying


@dataclass
class _DirMeta:
    mode: int
    uid: int
    gid: int
    mtime_ns: int


@dataclass
class ApplyStats:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    skipped_devices: int = 0
    whiteouts: int = 0
    dir_meta: dict[str, _DirMeta] = field(default_factory=dict)


def _split(name: str) -> tuple[list[str], str]:
    parts = name.split("/")
    return parts[:-1], parts[-1]


class LayerApplier:
    """Applies layer tars, bottom first, onto the directory ``root`` (normally empty)."""

    def __init__(self, root: str, *, as_root: bool | None = None) -> None:
        self.root = root
        self.as_root = os.geteuid() == 0 if as_root is None else as_root
        self.root_fd = os.open(root, _DIR_FLAGS)
        self._dir_fds: dict[str, int] = {}  # real path -> fd (see "directory walking")
        self._aliases: dict[str, str] = {}  # parent path as written -> its real path
        self._retired: list[int] = []
        self.stats = ApplyStats()
        self._layer_paths: set[str] = set()
        self._what = ""
        self.check_interrupt: Callable[[], None] | None = None

    def close(self) -> None:
        self._drop_dir_fds()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def __enter__(self) -> LayerApplier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- directory walking -----------------------------------------------------------------
    #
    # ``_dir_fds`` maps a *real* path (relative to the root, no symlink in it) to an open fd
    # of that directory; ``_aliases`` maps a parent path as written, when it went through a
    # symlink, to its real path. Every prefix of a cached real path is cached too (entries
    # are only ever added by walking and all dropped together). Removing a directory or a
    # symlink invalidates everything (aliases included): the fds are retired, not closed,
    # since the caller may still hold one as its parent fd; they are closed at the next entry.
    def _drop_dir_fds(self) -> None:
        self._invalidate_dir_fds()
        self._close_retired()

    def _invalidate_dir_fds(self) -> None:
        self._retired.extend(self._dir_fds.values())
        self._dir_fds.clear()
        self._aliases.clear()

    def _close_retired(self) -> None:
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()

    def _cached_fd(self, real: str) -> int | None:
        return self.root_fd if real == "" else self._dir_fds.get(real)

    def _real_fd(self, parts: list[str]) -> int:
        """The fd of a real path (one without symlinks, e.g. after a ``..``)."""
        fd = self.root_fd
        for i, part in enumerate(parts):
            here = "/".join(parts[: i + 1])
            cached = self._dir_fds.get(here)
            if cached is None:
                cached = os.open(part, _DIR_FLAGS, dir_fd=fd)
                self._dir_fds[here] = cached
            fd = cached
        return fd

    def _parent_fd(
        self, parents: list[str], entry: str, *, create: bool, label: str = "parent"
    ) -> int:
        return self._parent(parents, entry, create=create, label=label)[0]

    def _parent(
        self, parents: list[str], entry: str, *, create: bool, label: str = "parent"
    ) -> tuple[int, str]:
        """An fd of the directory ``parents`` under the root, and its real path (relative to
        the root, symlinks resolved), creating missing directories (implicit, mode 0755) when
        ``create``.

        A symlink in a parent position is resolved as in a chroot (like containerd's
        ``fs.RootPath``): an absolute target from the root, a relative one from the link's
        directory, at most 40 links per walk. It is refused (:class:`UnsafePathError`) when
        its target climbs above the root, loops, or (when ``create``) does not lead to an
        existing directory: no directory is ever created through a symlink, so a link to a
        host path (``/home/me``) is refused unless the root has that directory. Every open
        is ``O_NOFOLLOW`` relative to a directory fd reached from the root fd; links are read
        with ``readlink`` and walked by hand, so nothing outside the root is ever opened.
        Missing: :class:`FileNotFoundError` when not ``create``."""
        if not parents:
            return self.root_fd, ""
        key = "/".join(parents)
        real = self._aliases.get(key, key)
        fd = self._cached_fd(real)
        if fd is not None:
            return fd, real
        start, fd, real_parts = 0, self.root_fd, []
        for i in range(len(parents) - 1, 0, -1):
            sub = "/".join(parents[:i])
            real = self._aliases.get(sub, sub)
            cached = self._cached_fd(real)
            if cached is not None:
                start, fd, real_parts = i, cached, real.split("/") if real else []
                break
        hops = 0
        for i in range(start, len(parents)):
            sub = "/".join(parents[: i + 1])
            # what is left to walk for this written component, last first: a link's target
            # components are pushed onto it as they are met
            pending = [parents[i]]
            link: tuple[str, str] | None = None  # the last link followed: (path, target)

            while pending:
                part = pending.pop()
                if part in ("", "."):
                    continue
                if part == "..":
                    if not real_parts:
                        raise self._refusal(
                            entry, label, sub, f"{_via(link)} leading outside the root"
                        )
                    real_parts.pop()
                    fd = self._real_fd(real_parts)
                    continue
                here = "/".join([*real_parts, part])
                cached = self._dir_fds.get(here)
                if cached is not None:
                    real_parts.append(part)
                    fd = cached
                    continue
                try:
                    new = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if link is not None and create:
                        raise self._refusal(
                            entry,
                            label,
                            sub,
                            f"{_via(link)} that does not lead to an existing directory in the root",
                        ) from None
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    self._layer_paths.add(here)
                    new = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    target = _readlink(part, fd)
                    if target is None:
                        if here == sub:
                            raise self._refusal(entry, label, sub, "is not a directory") from None
                        raise self._refusal(
                            entry, label, sub, f"leads to {here!r}, which is not a directory"
                        ) from None
                    hops += 1
                    if hops > _MAX_LINK_HOPS:
                        raise self._refusal(
                            entry,
                            label,
                            sub,
                            f"has too many levels of symbolic links (more than "
                            f"{_MAX_LINK_HOPS}: a symlink loop?), the last {here!r} -> "
                            f"{target!r}",
                        ) from None
                    link = (here, target)
                    if target.startswith("/"):
                        real_parts.clear()
                        fd = self.root_fd
                    pending.extend(reversed(target.split("/")))
                    continue
                self._dir_fds[here] = new
                real_parts.append(part)
                fd = new
            real = "/".join(real_parts)
            if real != sub:
                self._aliases[sub] = real
        return fd, "/".join(real_parts)

    def _refusal(self, entry: str, label: str, sub: str, why: str) -> UnsafePathError:
        return UnsafePathError(
            f"{self._what}: entry {entry!r}: {label} {sub!r} {why}; refusing to write through it"
        )

    # -- removal ---------------------------------------------------------------------------
    def _remove(self, pfd: int, base: str, path: str) -> bool:
        """Remove ``base`` under ``pfd`` (a directory recursively, without following links);
        ``path``: its real path. True if something was there."""
        try:
            st = os.lstat(base, dir_fd=pfd)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            self._invalidate_dir_fds()  # cached fds of it or below, under any alias
            shutil.rmtree(base, dir_fd=pfd)
            prefix = path + "/"
            for key in [k for k in self.stats.dir_meta if k == path or k.startswith(prefix)]:
                del self.stats.dir_meta[key]
        else:
            os.unlink(base, dir_fd=pfd)
            if stat.S_ISLNK(st.st_mode):
                self._invalidate_dir_fds()  # paths through it resolve differently now
        return True

    # -- layers ----------------------------------------------------------------------------
    def apply(self, stream: IO[bytes] | Any, what: str) -> None:
        """Apply one layer's (decompressed) tar stream."""
        self._what = what
        self._layer_paths = set()
        reader = TarReader(stream)
        member: TarMember | None = None
        try:
            while True:
                member = reader.next()
                if member is None:
                    break
                if self.check_interrupt is not None:
                    self.check_interrupt()
                try:
                    self._entry(reader, member)
                except OSError as e:
                    raise StargzfsError(
                        f"{what}: entry {member.name!r}: {e.strerror or e}"
                    ) from None
                except OverflowError as e:  # a time or an id the system call cannot take
                    raise FormatError(f"{what}: entry {member.name!r}: {e}") from None
        except TarFormatError as e:
            if member is None and reader.offset <= 512:
                raise FormatError(f"{what}: not a tar stream ({e})") from None
            raise FormatError(f"{what}: malformed tar ({e})") from None
        if reader.offset == 0:
            raise FormatError(f"{what}: not a tar stream (empty file)")

    def _entry(self, tar: TarReader, m: TarMember) -> None:
        raw_name = m.name
        try:
            name = clean_name(raw_name)
        except UnsafePathError as e:
            raise UnsafePathError(f"{self._what}: {e}") from None
        if raw_name.startswith("/") and name:
            log.warning(
                "%s: entry %r: leading '/' removed (extracted as %r)", self._what, raw_name, name
            )
        if name == "":  # the layer root itself ("./"): its metadata applies to the root
            if m.type == "dir":
                self.stats.dir_meta[""] = _DirMeta(
                    m.mode & 0o7777, m.uid, m.gid, _mtime_ns(m.mtime)
                )
            return
        if self._retired:
            self._close_retired()
        if len(self._dir_fds) > 256:
            self._drop_dir_fds()
        self.stats.entries += 1
        parents, base = _split(name)
        if not parents and base in HIDDEN_NAMES:
            return
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parents, base, name)
            return
        pfd, real_parent = self._parent(parents, name, create=True)
        path = f"{real_parent}/{base}" if real_parent else base  # the entry's real path
        kind = m.type
        # a non-directory replaces whatever was there (files and symlinks find out when they
        # cannot be created: one system call fewer for the common case, nothing there)
        if kind == "reg":
            self._file(tar, pfd, base, name, path, m)
        elif kind == "dir":
            self._dir(pfd, base, name, path, m)
        elif kind == "symlink":
            self._symlink(pfd, base, name, path, m)
        else:
            existing = self._exists(pfd, base)
            if existing is not None:
                self._remove(pfd, base, path)
            if kind == "hardlink":
                self._hardlink(pfd, base, name, m)
            elif kind in ("char", "block", "fifo"):
                self._special(pfd, base, name, m)
            else:
                raise FormatError(
                    f"{self._what}: entry {name!r} has unsupported tar type {m.typeflag!r}"
                )
        self._layer_paths.add(path)

    @staticmethod
    def _exists(pfd: int, base: str) -> os.stat_result | None:
        try:
            return os.lstat(base, dir_fd=pfd)
        except FileNotFoundError:
            return None

    def _whiteout(self, parents: list[str], base: str, name: str) -> None:
        self.stats.whiteouts += 1
        try:
            pfd, dir_path = self._parent(parents, name, create=False)
        except FileNotFoundError:
            return  # nothing below to hide
        if base == OPAQUE:
            prefix = dir_path + "/" if dir_path else ""
            for child in os.listdir(pfd):
                if prefix + child not in self._layer_paths:
                    self._remove(pfd, child, prefix + child)
            return
        target = base[len(WHITEOUT_PREFIX) :]
        if not target or target in (".", ".."):
            raise UnsafePathError(f"{self._what}: whiteout entry {name!r} names nothing")
        path = f"{dir_path}/{target}" if dir_path else target
        if path not in self._layer_paths:
            self._remove(pfd, target, path)

    def _dir(self, pfd: int, base: str, name: str, path: str, m: TarMember) -> None:
        st = self._exists(pfd, base)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            self._remove(pfd, base, path)
            st = None
        if st is None:
            os.mkdir(base, 0o700, dir_fd=pfd)
        self.stats.dir_meta[path] = _DirMeta(m.mode & 0o7777, m.uid, m.gid, _mtime_ns(m.mtime))
        # xattrs on directories: apply now (they don't change with children)
        xattrs = _xattrs(m)
        if xattrs:
            fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
            try:
                self._set_xattrs(fd, name, xattrs)
            finally:
                os.close(fd)

    def _file(
        self, tar: TarReader, pfd: int, base: str, name: str, path: str, m: TarMember
    ) -> None:
        try:
            fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, base, path)
            fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=pfd)
        try:
            if m.size:
                self.stats.bytes += tar.copy_to_fd(fd)
            if self.as_root:
                os.fchown(fd, m.uid, m.gid)
            os.fchmod(fd, m.mode & 0o7777)
            xattrs = _xattrs(m)
            if xattrs:
                self._set_xattrs(fd, name, xattrs)
            t = _mtime_ns(m.mtime)
            os.utime(fd, ns=(t, t))
        finally:
            os.close(fd)
        self.stats.files += 1

    def _symlink(self, pfd: int, base: str, name: str, path: str, m: TarMember) -> None:
        if "\x00" in m.linkname:
            raise UnsafePathError(f"{self._what}: symlink {name!r} has a NUL in its target")
        try:
            os.symlink(m.linkname, base, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, base, path)
            os.symlink(m.linkname, base, dir_fd=pfd)
        if self.as_root:
            os.chown(base, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        t = _mtime_ns(m.mtime)
        os.utime(base, ns=(t, t), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, pfd: int, base: str, name: str, m: TarMember) -> None:
        try:
            target = clean_name(m.linkname)
        except UnsafePathError as e:
            raise UnsafePathError(f"{self._what}: hardlink {name!r}: target {e}") from None
        if not target:
            raise UnsafePathError(f"{self._what}: hardlink {name!r} points at the root")
        tparents, tbase = _split(target)
        try:
            tfd = self._parent_fd(tparents, name, create=False, label="target's parent")
            st = os.lstat(tbase, dir_fd=tfd)
        except FileNotFoundError:
            raise FormatError(
                f"{self._what}: hardlink {name!r} points at {target!r}, which does not exist"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"{self._what}: hardlink {name!r} points at directory {target!r}")
        os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)

    def _special(self, pfd: int, base: str, name: str, m: TarMember) -> None:
        perm = m.mode & 0o7777
        if m.type == "fifo":
            os.mkfifo(base, 0o600, dir_fd=pfd)
        else:
            if not self.as_root:
                self.stats.skipped_devices += 1
                log.warning("%s: skipping device node %r (not root)", self._what, name)
                return
            kind = stat.S_IFCHR if m.type == "char" else stat.S_IFBLK
            os.mknod(base, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
        if self.as_root:
            os.chown(base, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        # chmod/utime on a special file by name: it cannot be a symlink (we just made it)
        os.chmod(base, perm, dir_fd=pfd, follow_symlinks=True)
        t = _mtime_ns(m.mtime)
        os.utime(base, ns=(t, t), dir_fd=pfd, follow_symlinks=False)

    def _set_xattrs(self, fd: int, name: str, xattrs: dict[str, bytes]) -> None:
        for key, value in xattrs.items():
            try:
                os.setxattr(fd, key, value)
            except OSError as e:
                if e.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
                    log.warning(
                        "%s: %r: cannot set xattr %s (%s)", self._what, name, key, e.strerror
                    )
                else:
                    raise

    # -- the end ---------------------------------------------------------------------------
    def finish(self) -> None:
        """Apply deferred directory metadata, deepest first."""
        self._drop_dir_fds()
        root_meta = self.stats.dir_meta.pop("", None)
        items = sorted(self.stats.dir_meta.items(), key=lambda kv: kv[0].count("/"), reverse=True)
        for path, meta in items:
            parents, base = _split(path)
            try:
                pfd = self._parent_fd(parents, path, create=False)
                fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
            except (FileNotFoundError, UnsafePathError):
                continue
            try:
                if self.as_root:
                    os.fchown(fd, meta.uid, meta.gid)
                os.fchmod(fd, meta.mode)
                os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))
            finally:
                os.close(fd)
            if len(self._dir_fds) > 256:
                self._drop_dir_fds()
        if root_meta is None:
            os.fchmod(self.root_fd, 0o755)
        else:
            if self.as_root:
                os.fchown(self.root_fd, root_meta.uid, root_meta.gid)
            os.fchmod(self.root_fd, root_meta.mode)
            os.utime(self.root_fd, ns=(root_meta.mtime_ns, root_meta.mtime_ns))


def _readlink(part: str, dir_fd: int) -> str | None:
    """The target of the symlink ``part`` in ``dir_fd``, None if it is not a symlink."""
    try:
        return os.readlink(part, dir_fd=dir_fd)
    except OSError:
        return None


def _via(link: tuple[str, str] | None) -> str:
    assert link is not None  # only a link's target can have ".." or lead somewhere missing
    return f"is a symlink ({link[0]!r} -> {link[1]!r})"


def _mtime_ns(mtime: float | int) -> int:
    if isinstance(mtime, int):
        return mtime * 1_000_000_000
    return round(mtime * 1_000_000_000)


def _xattrs(m: TarMember) -> dict[str, bytes]:
    """The extended attributes of a member: pax ``SCHILY.xattr.NAME=VALUE`` (GNU tar, star,
    Go, Python) and ``LIBARCHIVE.xattr.URL-ENCODED-NAME=BASE64-VALUE`` (bsdtar, which writes
    both; the SCHILY one wins)."""
    out: dict[str, bytes] = {}
    if not m.pax_headers:
        return out
    for key in m.pax_headers:
        if key.startswith(_XATTR_PREFIXES):
            break
    else:
        return out
    for key, value in m.pax_headers.items():
        if key.startswith(_SCHILY_XATTR):
            out[key[len(_SCHILY_XATTR) :]] = value.encode("utf-8", "surrogateescape")
    for key, value in m.pax_headers.items():
        if key.startswith(_LIBARCHIVE_XATTR):
            raw_name = urllib.parse.unquote_to_bytes(key[len(_LIBARCHIVE_XATTR) :])
            xname = raw_name.decode("utf-8", "surrogateescape")
            if xname in out:
                continue
            try:
                out[xname] = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
            except ValueError:
                log.warning("entry %r: xattr %s: value is not base64; skipped", m.name, xname)
    return out
