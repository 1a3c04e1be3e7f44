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
import json
import logging
import os
import stat
import time
from collections.abc import Iterable, Sequence

from ..errors import StargzfsError
from ..index import MergedTree, Node

__all__ = ["LookupTrace", "load_trace", "replay", "save_trace", "trace_file", "usable_entries"]

log = logging.getLogger(__name__)

LIMIT = 20_000  # requests recorded per mount (a `find` over a big image would be all of it)
MAX_FILE_BYTES = 8 << 20  # a trace file larger than this is not one of ours
VERSION = 1
KINDS = ("lookup", "readlink", "readdir")
_LOOKUP, _READLINK, _READDIR = range(3)


class LookupTrace:
    """The name requests of one mount, in order, each once: (kind, inode, name). Recording
    is a dict insert on the handler's path; paths are made only when saved."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._seen: dict[tuple[int, int, bytes], None] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def _add(self, key: tuple[int, int, bytes]) -> None:
        if len(self._seen) < self.limit:
            self._seen[key] = None

    def lookup(self, parent_ino: int, name: bytes) -> None:
        self._add((_LOOKUP, parent_ino, name))

    def readlink(self, ino: int) -> None:
        self._add((_READLINK, ino, b""))

    def readdir(self, ino: int) -> None:
        self._add((_READDIR, ino, b""))

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
        for kind, ino, name in self._seen:
            path = path_of(ino)
            if path is None:
                continue
            if kind == _LOOKUP:
                path = f"{path}/{os.fsdecode(name)}" if path else os.fsdecode(name)
            out.append((KINDS[kind], path))
        return out


def trace_file(cache_dir: str, layer_digests: Sequence[str]) -> str:
    """Where the trace of the image made of these layers (bottom first) is kept: paths and
    inode numbers are the merged tree's, so the key is the whole stack."""
    key = hashlib.sha256("\n".join(layer_digests).encode()).hexdigest()
    return os.path.join(cache_dir, "traces", f"{key}.json")


def save_trace(file: str, entries: Sequence[tuple[str, str]]) -> None:
    """Write the trace atomically (concurrent mounts of one image: the last one wins)."""
    os.makedirs(os.path.dirname(file), exist_ok=True)
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


def load_trace(file: str) -> list[tuple[str, str]]:
    """The saved trace, or [] (none yet, unreadable, malformed: it only costs speed)."""
    try:
        with open(file, "rb") as f:
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
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("ignoring the lookup trace %s: %s", file, e)
        return []


def _clean(path: str) -> list[str] | None:
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") or "\0" in p for p in parts):
        return None
    return parts


def usable_entries(
    tree: MergedTree,
    entries: Iterable[tuple[str, str]],
    dirs: dict[str, Node | None] | None = None,
) -> list[tuple[str, str]]:
    """The entries safe to replay: every parent a directory of the merged tree (so the kernel
    walks no symlink on the way), a listing a directory, a readlink a symlink. ``dirs``
    caches directories between calls (path -> node, None: not a directory). Runs SQLite
    queries: call it where the tree is used."""
    known = dirs if dirs is not None else {}
    known.setdefault("", tree.root)

    def directory(path: str) -> Node | None:
        if path not in known:
            parent, _, name = path.rpartition("/")
            above = directory(parent)
            node = tree.lookup(above, name) if above is not None else None
            known[path] = node if node is not None and node.is_dir else None
        return known[path]

    out = []
    for kind, path in entries:
        parts = _clean(path) if path else []
        if parts is None:
            continue
        if kind == "readdir":
            ok = directory(path) is not None
        else:
            parent = directory("/".join(parts[:-1])) if parts else None
            if parent is None:
                continue
            ok = kind == "lookup"
            if kind == "readlink":
                node = tree.lookup(parent, parts[-1])
                ok = node is not None and node.entry.kind == "symlink"
        if ok:
            out.append((kind, path))
    return out


def replay(mountpoint: str, entries: Sequence[tuple[str, str]], deadline: float) -> int:
    """Ask the kernel for each entry through the mount until ``deadline`` (time.monotonic):
    names and missing names land in its caches, as do symlink targets and listings. Blocking
    (a worker thread: the event loop answers). Returns how many were asked."""
    done = 0
    for kind, path in entries:
        if time.monotonic() >= deadline:
            break
        full = os.path.join(mountpoint, path)
        try:
            if kind == "lookup":
                os.lstat(full)
            elif kind == "readlink":
                os.readlink(full)
            elif stat.S_ISDIR(os.lstat(full).st_mode):
                with os.scandir(full) as listing:
                    for _ in listing:
                        pass
        except OSError:
            pass  # a missing name is the point (the kernel keeps the negative entry)
        done += 1
    return done
