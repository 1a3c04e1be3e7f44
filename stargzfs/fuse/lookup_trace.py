"""What the kernel asked a mount by name, kept in the cache dir for the next mount of the
same image.

Once the kernel has a name, its attributes, a symlink target or a listing, it asks the daemon
no more (long timeouts, negative entries included). What a program's first run still asks is
mostly names that do not exist: the import system's and the dynamic loader's probes, `$PATH`
searches, locale files. No TOC can say which missing names a program probes; the previous
mount of the image saw them. On a warm remount the daemon asks the same again by path before
it reports ready (``replay``, through the mount, from a worker thread), so the workload's
first run finds them all in the kernel's caches.

The file is a hint, never trusted: unreadable or malformed means empty, and only paths whose
every parent is a directory of the merged tree are replayed, so a replay never follows a
symlink (an absolute one would lead out of the mount).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import stat
import time
from collections.abc import Iterable, Sequence

from ..errors import StargzfsError
from ..index import MergedTree, Node

__all__ = [
    "LookupTrace",
    "list_directory",
    "load_trace",
    "replay",
    "save_trace",
    "trace_file",
    "usable_entries",
]

log = logging.getLogger(__name__)

LIMIT = 20_000  # requests recorded per mount (a `find` over a big image would be all of it)
MAX_FILE_BYTES = 8 << 20  # a trace file larger than this is not one of ours
KEEP_DAYS = 30  # the trace of an image not mounted for this long is removed
PATH_MAX, NAME_MAX = 4096, 255  # Linux's: longer paths or names are no replayable entry
# What the traces directory holds: our files, and nothing else is pruned from it.
_TRACE_NAME = re.compile(r"[0-9a-f]{64}\.json")
_TEMP_NAME = re.compile(r"[0-9a-f]{64}\.json\.\d+\.tmp")
VERSION = 1
KINDS = ("lookup", "readlink", "readdir")
_LOOKUP, _READLINK, _READDIR = range(3)


class LookupTrace:
    """The name requests of one mount, in order, each once: (kind, inode, name). Recording
    is a dict insert on the handler's path; paths are made only when saved.

    The daemon's own requests (its warm-up and replay: ``own``) are kept apart and saved
    after everyone else's: what the programs in the mount asked comes first, so it is what
    the next replay asks first, and names nobody asks any more drift to the end, past the
    replay's budget, and out."""

    def __init__(self, file: str | None = None, limit: int = LIMIT) -> None:
        self.file = file  # where it is saved (see trace_file), and the last one read from
        self.limit = limit
        self.replayed = 0  # entries of the last mount's trace asked again before ready
        self.replaying = False  # set during the replay (readdir requests carry no pid)
        self._asked: dict[tuple[int, int, bytes], None] = {}
        self._own: dict[tuple[int, int, bytes], None] = {}

    def __len__(self) -> int:
        return len(self._asked) + len(self._own)

    def _add(self, key: tuple[int, int, bytes], own: bool) -> None:
        if len(self) < self.limit:
            (self._own if own else self._asked)[key] = None

    def lookup(self, parent_ino: int, name: bytes, own: bool = False) -> None:
        self._add((_LOOKUP, parent_ino, name), own)

    def readlink(self, ino: int, own: bool = False) -> None:
        self._add((_READLINK, ino, b""), own)

    def readdir(self, ino: int, own: bool = False) -> None:
        self._add((_READDIR, ino, b""), own or self.replaying)

    def entries(self, tree: MergedTree) -> list[tuple[str, str]]:
        """(kind, image path) of each request, in order; inodes the tree does not know are
        left out. Runs SQLite queries: call it where the tree is used (the event loop)."""
        paths: dict[int, str | None] = {tree.root.ino: ""}

        def path_of(ino: int) -> str | None:
            if ino not in paths:
                try:
                    node = tree.get(ino)
                    paths[ino] = tree.layer_of(node).path_of(node.entry.name_id)
                except StargzfsError:
                    paths[ino] = None
            return paths[ino]

        out: list[tuple[str, str]] = []
        own = (key for key in self._own if key not in self._asked)
        for kind, ino, name in itertools.chain(self._asked, own):
            path = path_of(ino)
            if path is None:
                continue
            if kind == _LOOKUP:
                path = f"{path}/{os.fsdecode(name)}" if path else os.fsdecode(name)
            out.append((KINDS[kind], path))
        return out


def trace_file(cache_dir: str, layer_digests: Sequence[str]) -> str:
    """Where the trace of the image made of these layers (bottom first) is kept: its paths
    are the merged tree's, so the key is the whole stack."""
    key = hashlib.sha256("\n".join(layer_digests).encode()).hexdigest()
    return os.path.join(cache_dir, "traces", f"{key}.json")


def save_trace(file: str, entries: Sequence[tuple[str, str]]) -> None:
    """Write the trace atomically (concurrent mounts of one image: the last one wins), and
    remove the traces of images not mounted for ``KEEP_DAYS`` (each unmount rewrites its
    own), and temporary files their writers left."""
    os.makedirs(os.path.dirname(file), exist_ok=True)
    _prune(os.path.dirname(file))
    tmp = f"{file}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            # ensure_ascii keeps undecodable names (surrogate escapes) intact.
            json.dump({"version": VERSION, "entries": list(entries)}, f)
        os.replace(tmp, file)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _prune(directory: str) -> None:
    now = time.time()
    with contextlib.suppress(OSError), os.scandir(directory) as found:
        for entry in found:
            with contextlib.suppress(OSError):
                age = now - entry.stat(follow_symlinks=False).st_mtime
                stale_tmp = age > 600 and _TEMP_NAME.fullmatch(entry.name)
                if stale_tmp or (age > KEEP_DAYS * 86400 and _TRACE_NAME.fullmatch(entry.name)):
                    os.unlink(entry.path)


def load_trace(file: str) -> list[tuple[str, str]]:
    """The saved trace, or [] (none yet, unreadable, malformed: it only costs speed)."""
    try:
        # Non-blocking and not through a symlink: a FIFO put there must not hang the mount.
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{file}: not a regular file")
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as e:
        log.debug("lookup trace %s: %s", file, e)
        return []
    try:
        if len(raw) > MAX_FILE_BYTES:
            raise ValueError("too large")
        doc = json.loads(raw)
        if doc.get("version") != VERSION:
            raise ValueError("unknown version")
        out: list[tuple[str, str]] = []
        for kind, path in doc["entries"][:LIMIT]:
            if kind not in KINDS or not isinstance(path, str):
                raise ValueError(f"bad entry {kind!r}")
            out.append((kind, path))
        return out
    except Exception as e:  # whatever it holds (RecursionError for deep nesting too)
        log.warning("ignoring the lookup trace %s: %s", file, type(e).__name__)
        return []


def _clean(path: str) -> list[str] | None:
    """The components of a relative image path, or None for anything else: absolute, empty
    or dot components, NUL, or text that is no file name (a lone surrogate)."""
    try:
        raw = os.fsencode(path)
    except UnicodeError:
        return None
    parts = path.split("/")
    if (
        len(raw) >= PATH_MAX
        or path.startswith("/")
        or any(p in ("", ".", "..") or "\0" in p or len(os.fsencode(p)) > NAME_MAX for p in parts)
    ):
        return None  # the kernel would refuse it anyway
    return parts


def _is_utf8(name: str) -> bool:
    """Image names are UTF-8 (the TOC is JSON); an undecodable probe is no directory."""
    try:
        name.encode("utf-8")
    except UnicodeError:
        return False
    return True


def usable_entries(
    tree: MergedTree,
    entries: Iterable[tuple[str, str]],
    dirs: dict[tuple[int, str], Node | None] | None = None,
) -> list[tuple[str, str]]:
    """The entries safe to replay: every parent a directory of the merged tree (so the kernel
    walks no symlink on the way), a listing a directory, a readlink a symlink. ``dirs``
    caches directories between calls ((parent inode, name) -> node, None: not a directory).
    Runs SQLite queries: call it where the tree is used."""
    known = dirs if dirs is not None else {}

    def directory(parts: Sequence[str]) -> Node | None:
        node = tree.root
        for name in parts:
            key = (node.ino, name)
            if key not in known:
                child = tree.lookup(node, name) if _is_utf8(name) else None
                known[key] = child if child is not None and child.is_dir else None
            found = known[key]
            if found is None:
                return None
            node = found
        return node

    out = []
    for kind, path in entries:
        parts = _clean(path) if path else []
        if parts is None:
            continue
        if kind == "readdir":
            ok = directory(parts) is not None
        else:
            parent = directory(parts[:-1]) if parts else None
            if parent is None:
                continue
            ok = kind == "lookup"
            if kind == "readlink" and _is_utf8(parts[-1]):
                node = tree.lookup(parent, parts[-1])
                ok = node is not None and node.entry.kind == "symlink"
        if ok:
            out.append((kind, path))
    return out


def list_directory(root: int, path: str, deadline: float = float("inf")) -> None:
    """List the directory ``path`` (relative to the descriptor ``root``; "" is root itself)
    to its end or ``deadline`` (time.monotonic), never through a symlink named last: its
    entries and their attributes land in the kernel's caches (readdir answers with both)."""
    fd = os.open(
        path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root
    )
    try:
        with os.scandir(fd) as listing:
            for _ in listing:
                if time.monotonic() >= deadline:
                    break
    finally:
        os.close(fd)


def replay(
    root: int,
    entries: Sequence[tuple[str, str]],
    deadline: float,
    progress: list[int] | None = None,
) -> int:
    """Ask the kernel for each entry, relative to the mount's root descriptor ``root``,
    until ``deadline`` (time.monotonic): names and missing names land in its caches, as do
    symlink targets and listings. Never follows a symlink named last. Blocking (a worker
    thread: the event loop answers). Returns how many were asked, and counts them in
    ``progress[0]`` as it goes (for a caller that stops waiting at the deadline)."""
    done = 0
    for kind, path in entries:
        if time.monotonic() >= deadline:
            break
        try:
            if kind == "lookup":
                os.lstat(path, dir_fd=root)
            elif kind == "readlink":
                os.readlink(path, dir_fd=root)
            else:
                list_directory(root, path, deadline)
        except (OSError, ValueError):
            pass  # a missing name is the point (the kernel keeps the negative entry)
        done += 1
        if progress is not None:
            progress[0] += 1
    return done
