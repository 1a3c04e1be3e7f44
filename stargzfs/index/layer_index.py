"""A compact, queryable index of one layer's TOC, stored in SQLite.

Why SQLite: a million-entry layer must fit in well under 200 bytes per entry, answer
lookup-by-name and list-a-directory without scans, and be persistable so a remount need not
re-parse. One row per entry (keyed by its inode number) plus a (parent, name) index gives
all three; built into a file next to the chunk cache, its pages live in the OS page cache
rather than in the daemon's heap.

Inode numbers are the row ids, assigned in TOC order (root = 1), so they are stable for the
same TOC. A hardlink has a row of its own (its name) whose ``ino`` names the canonical row;
every query returns the canonical attributes, as ``stat`` on a real hardlink does.

Files with more than one chunk have rows in ``chunks``; a single-chunk file keeps its one
chunk's location in its own row. Where a chunk's compressed bytes end is not stored per
chunk: it is the next larger payload offset in the blob (or the TOC offset), kept as one
sorted array.
"""

from __future__ import annotations

import array
import base64
import binascii
import bisect
import contextlib
import fcntl
import itertools
import json
import operator
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError, NotFoundError
from ..formats.toc import (
    HIDDEN_NAMES,
    LANDMARK_NO_PREFETCH,
    LANDMARK_PREFETCH,
    clean_name,
    iter_toc_batches,
    parse_digest,
    parse_modtime,
)

__all__ = ["ROOT_ID", "Chunk", "Entry", "LayerIndex"]

ROOT_ID = 1
SCHEMA_VERSION = 3

# Entry kinds as stored; the TOC's "hardlink" rows point at a canonical row instead.
_KINDS = ("", "dir", "reg", "symlink", "char", "block", "fifo", "hardlink")
_KIND_CODE = {name: code for code, name in enumerate(_KINDS) if name}
DIR, REG, SYMLINK, CHAR, BLOCK, FIFO, HARDLINK = 1, 2, 3, 4, 5, 6, 7
_F_IMPLICIT = 0x10  # a parent directory with no entry of its own
_F_CHUNKED = 0x20  # content described by rows in `chunks`
# Chunk flags (containers/storage's ``chunkType: "zeros"``): a run of zero bytes, which a
# reader produces without fetching; with _C_NO_DATA it has no bytes in the blob at all.
_C_ZEROS = 0x1
_C_NO_DATA = 0x2
_KIND_MASK = 0x0F

_MAX_SIZE = 1 << 53  # larger sizes are corrupt TOCs, not real files
_MAX_INT = 1 << 62
_HIDDEN_LENGTHS = frozenset(map(len, HIDDEN_NAMES))  # (a length is cheaper than a hash)
_UNCLEAN_START = frozenset(("", "."))  # a base name that clean_name may change
_MAX_ID = (1 << 32) - 1
_MAX_DEV = (1 << 20) - 1  # Linux: 12-bit major, 20-bit minor

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE entries (
    id INTEGER PRIMARY KEY,
    parent INTEGER NOT NULL,
    name TEXT NOT NULL,
    kind INTEGER NOT NULL,
    mode INTEGER, uid INTEGER, gid INTEGER, size INTEGER, mtime INTEGER,
    link TEXT, dev INTEGER, xattrs TEXT, digest BLOB,
    offset INTEGER, inner INTEGER, nlink INTEGER, ino INTEGER, owner INTEGER
);
CREATE TABLE chunks (
    entry INTEGER NOT NULL, foff INTEGER NOT NULL, size INTEGER NOT NULL,
    offset INTEGER NOT NULL, inner INTEGER, digest BLOB, flags INTEGER,
    PRIMARY KEY (entry, foff)
) WITHOUT ROWID;
CREATE TABLE owners (kind TEXT, id INTEGER, name TEXT, PRIMARY KEY (kind, id)) WITHOUT ROWID;
CREATE TABLE names (ref INTEGER PRIMARY KEY, uname TEXT, gname TEXT);
"""
_COLUMNS = "id, parent, name, kind, mode, uid, gid, size, mtime, link, dev, xattrs, digest, "
_COLUMNS += "offset, inner, nlink, ino, owner"
# See _Builder._rows: "" and -1 stand for NULL.
_ENTRY_VALUES = "(?,?,?,?,?,?,?,?,nullif(?,''),?,?,nullif(?,-1),nullif(?,-1),nullif(?,-1),?,?)"
_ENTRY_WIDTH = 16
_INSERT_ENTRY = (
    "INSERT INTO entries (id, parent, name, kind, mode, uid, gid, size, mtime, link, dev, "
    "xattrs, digest, offset, inner, owner) VALUES "
)
# Rows are inserted this many per statement: sqlite3's fixed cost per statement executed
# (reset, step, the GIL released and taken back) is then paid once per group. 32 rows of 16
# values stay below SQLite's oldest limit of 999 parameters.
_ROWS_PER_INSERT = 32
_INSERT_ENTRIES = _INSERT_ENTRY + ",".join([_ENTRY_VALUES] * _ROWS_PER_INSERT)
_INSERT_ENTRY += _ENTRY_VALUES
_CHUNK_COLUMNS = "foff, size, offset, inner, digest, coalesce(flags, 0)"


@dataclass(frozen=True, slots=True)
class Chunk:
    """One independently decompressible piece of a file."""

    file_offset: int  # where the chunk's bytes start in the file
    size: int  # uncompressed bytes of this chunk
    comp_offset: int  # start of the compressed member(s) in the blob
    comp_end: int  # end (exclusive) of the compressed range to fetch
    inner_offset: int  # where the chunk starts in the member's uncompressed stream
    digest: bytes | None  # sha256 of the chunk's uncompressed bytes (None: unverified)
    # A hole (zstd:chunked ``chunkType: "zeros"``): ``size`` zero bytes, nothing to fetch.
    # Its compressed range is empty when the blob holds no bytes for it.
    zeros: bool = False


@dataclass(frozen=True, slots=True)
class Entry:
    """A name in the layer and the attributes of the inode it names."""

    id: int  # inode number within the layer (the canonical row for hardlinks)
    parent: int
    name: str
    kind: str  # dir reg symlink char block fifo (a hardlink reports its target's kind)
    mode: int  # permission bits incl. setuid/setgid/sticky (0o7777)
    uid: int
    gid: int
    size: int
    mtime_ns: int | None
    linkname: str  # symlink target; for a hardlink name, the target's path
    devmajor: int
    devminor: int
    nlink: int
    xattrs_json: str | None
    digest: bytes | None
    implicit: bool
    hardlink: bool  # this name is a hardlink to ``id``
    name_id: int  # the row of this name (== id unless hardlink)
    # Owner names of this entry: its own userName/groupName, else the latest one the TOC
    # gave for its uid/gid before it (upstream's carry-forward); "" for implicit dirs.
    uname: str = ""
    gname: str = ""

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    @property
    def xattrs(self) -> dict[str, bytes]:
        if not self.xattrs_json:
            return {}
        raw: dict[str, str] = json.loads(self.xattrs_json)
        return {k: base64.b64decode(v) for k, v in raw.items()}


class LayerIndex:
    """Read side of the index. Build one with :meth:`build`, reopen with :meth:`open`."""

    def __init__(self, db: sqlite3.Connection, offsets: array.array[int] | None = None) -> None:
        self._db = db
        meta = dict(db.execute("SELECT key, value FROM meta WHERE key != 'offsets'"))
        if meta.get("schema") != SCHEMA_VERSION:
            raise FormatError("index file has an unknown schema version")
        self.format: str = meta["format"]
        self.compression: str = meta["compression"]
        self.toc_offset: int = meta["toc_offset"]
        self.toc_digest: str | None = meta.get("toc_digest")
        self.landmark: str | None = meta.get("landmark")
        self.prefetch_end: int | None = meta.get("prefetch_end")
        self.entry_count: int = meta["entry_count"]
        # An annotation vouched for the TOC (toc.digest, or a zstd:chunked manifest checksum).
        self.verified: bool = bool(meta.get("verified"))
        if offsets is None:  # (a build hands them over: not read back, not held twice)
            offsets = array.array("q")
            row = db.execute("SELECT value FROM meta WHERE key = 'offsets'").fetchone()
            if row is None:
                raise KeyError("offsets")
            offsets.frombytes(row[0])
        self._offsets = offsets
        self._owners: dict[tuple[str, int], str] = {
            (k, i): n for k, i, n in db.execute("SELECT kind, id, name FROM owners")
        }
        self._names: dict[int, tuple[str, str]] = {
            ref: (u, g) for ref, u, g in db.execute("SELECT ref, uname, gname FROM names")
        }

    # -- construction -------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        toc_json: str | bytes | Iterable[bytes],
        *,
        format: str,
        compression: str,
        toc_offset: int,
        toc_digest: str | None = None,
        path: str | os.PathLike[str] | None = None,
        check: Callable[[], str] | None = None,
        verified: bool = False,
    ) -> LayerIndex:
        """Parse a TOC document into an index (in memory, or in a file at ``path``).

        A file is written under a temporary name and renamed into place, so concurrent
        builders and readers never see a half-written index. ``toc_json`` may be an iterable
        of byte pieces (the TOC streamed out of its compressed member); ``check`` then runs
        once it is consumed, before anything is committed: it returns the TOC digest to
        record, or raises (a digest mismatch) to abort. ``verified`` records that an
        annotation vouches for the TOC (the caller checked it, or ``check`` does); every chunk
        must then carry a digest (holes excepted: the TOC itself says what they hold), as
        upstream's verifier requires, else :class:`FormatError`. Unverified layers may have
        chunks without digests: they are read unchecked.
        """
        target = os.fspath(path) if path is not None else None
        tmp = f"{target}.{os.getpid()}.tmp" if target else ":memory:"
        lock_fd = -1
        if target:
            _remove_dead_builders_files(target)
            # Held until the rename: others tell a live builder's file from a dead one's by it
            # (a pid says nothing across PID namespaces sharing a cache directory).
            lock_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            return cls._build_into(
                toc_json, format, compression, toc_offset, toc_digest, target, tmp, check, verified
            )
        finally:
            if lock_fd >= 0:
                os.close(lock_fd)  # (after sqlite closed the file: see _build_into)

    @classmethod
    def _build_into(
        cls,
        toc_json: str | bytes | Iterable[bytes],
        format: str,
        compression: str,
        toc_offset: int,
        toc_digest: str | None,
        target: str | None,
        tmp: str,
        check: Callable[[], str] | None,
        verified: bool,
    ) -> LayerIndex:
        db = sqlite3.connect(tmp, check_same_thread=False, isolation_level=None)
        try:
            db.executescript(
                "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16384;"
            )
            db.executescript(_SCHEMA)
            db.execute("BEGIN")
            builder = _Builder(db, toc_offset, verified)
            offsets = builder.run(toc_json)
            if check is not None:
                toc_digest = check()
            ((count,),) = db.execute("SELECT count(*) FROM entries")
            meta: dict[str, Any] = {
                "schema": SCHEMA_VERSION,
                "format": format,
                "compression": compression,
                "toc_offset": toc_offset,
                "toc_digest": toc_digest,
                "verified": int(verified),
                "entry_count": count,
                "landmark": builder.landmark,
                "prefetch_end": builder.prefetch_end,
            }
            db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            if target:  # (an index in memory is never reopened)
                db.execute("INSERT INTO meta VALUES ('offsets', ?)", (offsets,))
            db.execute("COMMIT")
        except BaseException:
            db.close()
            if target and os.path.exists(tmp):
                os.unlink(tmp)
            raise
        if target:
            db.close()
            os.replace(tmp, target)
            return cls._open(target, offsets)
        db.execute("PRAGMA cache_size=-2048")
        return cls(db, offsets)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> LayerIndex:
        return cls._open(path)

    @classmethod
    def _open(
        cls, path: str | os.PathLike[str], offsets: array.array[int] | None = None
    ) -> LayerIndex:
        uri = f"file:{os.fspath(path)}?mode=ro"
        db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA cache_size=-2048")
        try:
            return cls(db, offsets)
        except (sqlite3.DatabaseError, KeyError, TypeError, ValueError) as e:
            db.close()
            raise FormatError(f"index file {os.fspath(path)} is unreadable: {e}") from None

    def close(self) -> None:
        self._db.close()

    # -- queries ------------------------------------------------------------------------

    def get(self, ino: int) -> Entry:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM entries WHERE id=?", (ino,)).fetchone()
        if row is None:
            raise NotFoundError(f"no inode {ino} in this layer")
        return self._entry(row)

    def lookup(self, parent: int, name: str) -> Entry | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM entries WHERE parent=? AND name=?", (parent, name)
        ).fetchone()
        return None if row is None else self._entry(row)

    def lookup_with(self, parent: int, name: str, other: str) -> tuple[Entry | None, bool]:
        """``lookup(parent, name)`` and whether ``other`` exists there too, in one query."""
        entry, seen = None, False
        for row in self._db.execute(
            f"SELECT {_COLUMNS} FROM entries WHERE parent=? AND name IN (?, ?)",
            (parent, name, other),
        ):
            if row[2] == name:
                entry = self._entry(row)
            else:
                seen = True
        return entry, seen

    def resolve(self, path: str) -> Entry | None:
        """The entry at a layer-relative path (symlinks are not followed)."""
        entry = self.get(ROOT_ID)
        for part in clean_name(path).split("/") if path.strip("/.") else []:
            if not entry.is_dir:
                return None
            found = self.lookup(entry.id, part)
            if found is None:
                return None
            entry = found
        return entry

    def children(self, parent: int, after: str | None = None) -> Iterator[Entry]:
        """Entries of a directory in name order, optionally starting after a name."""
        if after is None:
            cur = self._db.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE parent=? AND id!=? ORDER BY name",
                (parent, ROOT_ID),
            )
        else:
            cur = self._db.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE parent=? AND name>? AND id!=? ORDER BY name",
                (parent, after, ROOT_ID),
            )
        for row in cur:
            yield self._entry(row)

    def path_of(self, name_id: int) -> str:
        parts: list[str] = []
        while name_id != ROOT_ID:
            row = self._db.execute(
                "SELECT parent, name FROM entries WHERE id=?", (name_id,)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no inode {name_id} in this layer")
            parts.append(row[1])
            name_id = row[0]
        return "/".join(reversed(parts))

    def walk(self, top: int = ROOT_ID, prefix: str = "") -> Iterator[tuple[str, Entry]]:
        """Every entry below ``top`` as (path, entry), depth first, in name order."""
        for child in self.children(top):
            path = f"{prefix}{child.name}"
            yield path, child
            if child.is_dir and not child.hardlink:
                yield from self.walk(child.id, path + "/")

    def chunks(self, entry: Entry) -> list[Chunk]:
        """All chunks of a regular file, in file order (empty for an empty file)."""
        return self.chunks_for(entry, 0, entry.size)

    def chunks_for(self, entry: Entry, offset: int, length: int) -> list[Chunk]:
        """The chunks holding bytes ``[offset, offset+length)`` of a file (clipped to EOF).

        One range query on the (entry, file offset) key: the cost is that of the chunks
        returned, not of the file's chunk count.
        """
        end = min(offset + length, entry.size)
        if entry.kind != "reg" or offset >= end:
            return []
        single = self._single_chunk(entry)
        if single is not None:
            return [single]
        return [
            self._chunk(*row)
            for row in self._db.execute(
                f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE entry=?1 AND foff < ?3 "
                "AND foff >= coalesce("
                "(SELECT max(foff) FROM chunks WHERE entry=?1 AND foff <= ?2), 0) "
                "ORDER BY foff",
                (entry.id, offset, end),
            )
        ]

    def _single_chunk(self, entry: Entry) -> Chunk | None:
        """The one chunk of a file kept in its own row; None when it has rows in ``chunks``."""
        kind, off, inner = self._db.execute(
            "SELECT kind, offset, inner FROM entries WHERE id=?", (entry.id,)
        ).fetchone()
        if kind & _F_CHUNKED:
            return None
        return Chunk(0, entry.size, off, self.compressed_end(off), inner or 0, entry.digest)

    def chunks_before(self, end: int) -> list[Chunk]:
        """Every chunk whose compressed bytes lie entirely before ``end`` (the prefetch
        range), in blob order. A full scan: run it once, off the event loop."""
        out = [
            Chunk(0, size, off, self.compressed_end(off), inner or 0, digest)
            for size, off, inner, digest in self._db.execute(
                "SELECT size, offset, inner, digest FROM entries WHERE offset IS NOT NULL "
                "AND offset < ? AND (kind & ?) = 0",
                (end, _F_CHUNKED),
            )
        ]
        out += [
            self._chunk(*row)
            for row in self._db.execute(
                f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE offset < ?", (end,)
            )
        ]
        return sorted((c for c in out if c.comp_end <= end), key=lambda c: c.comp_offset)

    def prioritized_paths(self, end: int) -> list[str]:
        """Paths of the regular files whose content starts before blob offset ``end`` (the
        prefetch range), in blob order."""
        rows = self._db.execute(
            "SELECT id FROM entries WHERE offset IS NOT NULL AND offset < ? AND (kind & ?) = ? "
            "ORDER BY offset",
            (end, _KIND_MASK, REG),
        ).fetchall()
        return [self.path_of(row[0]) for row in rows]

    def _chunk(
        self, foff: int, size: int, off: int, inner: int | None, digest: bytes | None, flags: int
    ) -> Chunk:
        if flags & _C_NO_DATA:
            return Chunk(foff, size, off, off, 0, digest, True)
        end = self.compressed_end(off)
        return Chunk(foff, size, off, end, inner or 0, digest, bool(flags & _C_ZEROS))

    def compressed_end(self, offset: int) -> int:
        """Where the compressed range starting at ``offset`` ends: the next payload start."""
        i = bisect.bisect_right(self._offsets, offset)
        return self._offsets[i] if i < len(self._offsets) else self.toc_offset

    def uname(self, uid: int) -> str:
        """The first user name the TOC gives ``uid`` (an entry's own: ``Entry.uname``)."""
        return self._owners.get(("u", uid), "")

    def gname(self, gid: int) -> str:
        """The first group name the TOC gives ``gid`` (an entry's own: ``Entry.gname``)."""
        return self._owners.get(("g", gid), "")

    def _entry(self, row: tuple[Any, ...]) -> Entry:
        name_id, parent, name, kind = row[0], row[1], row[2], row[3]
        hardlink = (kind & _KIND_MASK) == HARDLINK
        linkname = row[9] or ""
        if hardlink:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE id=?", (row[16],)
            ).fetchone()
            kind = row[3]
        dev = row[10] or 0
        uname, gname = self._names.get(row[17], ("", "")) if row[17] else ("", "")
        return Entry(
            id=row[0],
            parent=parent,
            name=name,
            kind=_KINDS[kind & _KIND_MASK],
            mode=row[4] or 0,
            uid=row[5] or 0,
            gid=row[6] or 0,
            size=row[7] or 0,
            mtime_ns=row[8],
            linkname=linkname if hardlink else (row[9] or ""),
            devmajor=dev >> 32,
            devminor=dev & 0xFFFFFFFF,
            nlink=row[15] or 1,
            xattrs_json=row[11],
            digest=row[12],
            implicit=bool(kind & _F_IMPLICIT),
            hardlink=hardlink,
            name_id=name_id,
            uname=uname,
            gname=gname,
        )


class _Builder:
    """One pass over the TOC entries, writing rows; then hardlinks, nlink and the indexes."""

    def __init__(self, db: sqlite3.Connection, toc_offset: int, verified: bool = False) -> None:
        self.db = db
        self.toc_offset = toc_offset
        # The TOC is vouched for: every chunk must then have a digest to be checked against
        # (upstream's verifier: "some ChunkDigest not found in TOC JSON").
        self.verified = verified
        self.next_id = ROOT_ID + 1
        self.dirs: dict[str, int] = {"": ROOT_ID}
        self.dir_updates: list[tuple[Any, ...]] = []
        self.hardlinks: list[tuple[int, str, str]] = []  # (row id, target path, own path)
        self.chunk_rows: list[tuple[Any, ...]] = []
        # Payload offsets, in TOC order (which is mostly blob order: cheap to sort).
        self.offsets = array.array("q")
        self.replaced = False  # some names were given twice (see _dedupe)
        self.owners: dict[tuple[str, int], str] = {}  # first name per id (uname(), gname())
        self.name_refs: dict[tuple[str, str], int] = {}  # (uname, gname) -> names.ref
        self.landmark: str | None = None
        self.prefetch_end: int | None = None
        # The regular file that following "chunk" entries belong to.
        self.cur_file: tuple[int, str, int, list[tuple[Any, ...]], int | None] | None = None
        self.root_row: tuple[Any, ...] = (ROOT_ID, ROOT_ID, "", DIR | _F_IMPLICIT, 0o755)
        # Rows are streamed into the INSERTs; side rows wait here until they are done.
        self.implicit_rows: list[tuple[Any, ...]] = []

    def run(self, text: bytes | str | Iterable[bytes]) -> array.array[int]:
        """Build the tables; returns the sorted payload offsets (see ``compressed_end``)."""
        rows = self._rows(iter_toc_batches(text))
        rest: list[Any] = []

        def groups() -> Iterator[list[Any]]:
            while True:
                values = list(
                    itertools.chain.from_iterable(itertools.islice(rows, _ROWS_PER_INSERT))
                )
                if len(values) < _ROWS_PER_INSERT * _ENTRY_WIDTH:
                    rest.extend(values)
                    return
                yield values

        self.db.executemany(_INSERT_ENTRIES, groups())
        self.db.executemany(
            _INSERT_ENTRY,
            [rest[i : i + _ENTRY_WIDTH] for i in range(0, len(rest), _ENTRY_WIDTH)],
        )
        self._finish_file()
        self.db.executemany(
            "INSERT INTO entries (id, parent, name, kind, mode) VALUES (?,?,?,?,?)",
            [self.root_row, *self.implicit_rows],
        )
        self.db.executemany(
            "UPDATE entries SET kind=?, mode=?, uid=?, gid=?, mtime=?, xattrs=?, owner=? "
            "WHERE id=?",
            self.dir_updates,
        )
        self.db.executemany(
            "INSERT OR REPLACE INTO chunks VALUES (?,?,?,?,?,nullif(?,-1),?)", self.chunk_rows
        )
        # Indexing after the bulk insert (one sort) is much faster than maintaining it.
        self.db.execute("CREATE INDEX by_name ON entries (parent, name)")
        self._dedupe()
        self._count_links(self._resolve_hardlinks())
        self.db.executemany(
            "INSERT INTO owners VALUES (?, ?, ?)",
            [(k, i, n) for (k, i), n in self.owners.items()],
        )
        self.db.executemany(
            "INSERT INTO names VALUES (?, ?, ?)",
            [(ref, u, g) for (u, g), ref in self.name_refs.items()],
        )
        return _sorted_unique(self.offsets)

    # Entries are validated and turned into rows here, one at a time (a generator feeding
    # executemany, so no list of a million rows is ever held). This loop is most of the
    # build's Python time, so the common case of each field is checked inline (an exact
    # ``int`` in range, a canonical digest) and anything else goes to the general helper,
    # which accepts the same values and raises the error.
    #
    # Rows hold no None for columns a reader treats as 0 or "" (link, dev, inner, owner):
    # they store 0 or "" instead, in the same (zero) record bytes. The nullable columns get
    # a sentinel that the INSERT turns into NULL (_INSERT_ENTRY): Python's sqlite3 binds an
    # int, str or bytearray directly but sends None and bytes through its adapter lookup,
    # several times slower. Digests are bytearrays for the same reason.
    def _rows(self, batches: Iterable[list[dict[str, Any]]]) -> Iterator[tuple[Any, ...]]:
        dirs_get = self.dirs.get
        add_offset = self.offsets.append
        toc_offset = self.toc_offset
        verified = self.verified
        owners = self.owners
        cur_u: dict[int, str] = {}  # latest user name per uid
        cur_g: dict[int, str] = {}  # latest group name per gid
        name_refs = self.name_refs
        last_uid = last_gid = -1
        last_owner = 0  # the names ref of (last_uid, last_gid), 0 for none
        mtimes: dict[str, int | str] = {}  # modtime text -> bound value ("" for none)
        last_modtime: object = None
        mtime: int | str = ""
        last_head = None  # the parent path of the last row, and its id
        last_pid = ROOT_ID
        fromhex = bytearray.fromhex
        for e in itertools.chain.from_iterable(batches):
            raw = e["name"]
            kind = e["type"]
            if kind == "chunk":
                self._add_chunk(e, raw)
                continue
            if self.cur_file is not None:
                self._finish_file()
            head, sep, base = raw.rpartition("/")
            if (
                head == last_head
                and base[:1] not in _UNCLEAN_START
                and "\x00" not in base
                and (head or not sep)
            ):
                # The clean parent of the last row and a plain name in it: clean already.
                path = raw
            else:
                if "//" in raw or "/." in raw or "\x00" in raw or raw.startswith(("/", ".")):
                    path = clean_name(raw)
                else:
                    path = raw.rstrip("/")  # clean_name's common case: already clean
                head, _, base = path.rpartition("/")
            if len(path) in _HIDDEN_LENGTHS and path in HIDDEN_NAMES:
                if path in (LANDMARK_PREFETCH, LANDMARK_NO_PREFETCH):
                    self.landmark = path
                    if path == LANDMARK_PREFETCH:
                        self.prefetch_end = _int(e, "offset", raw, 0)
                off = e.get("offset")
                if isinstance(off, int) and off > 0:
                    self.offsets.append(off)
                continue

            mode = e.get("mode", 0)
            if type(mode) is not int or not 0 <= mode <= _MAX_INT:
                mode = _int(e, "mode", raw, 0)
            mode &= 0o7777
            uid = e.get("uid", 0)
            if type(uid) is not int or not 0 <= uid <= _MAX_ID:
                uid = _int(e, "uid", raw, 0, _MAX_ID)
            gid = e.get("gid", 0)
            if type(gid) is not int or not 0 <= gid <= _MAX_ID:
                gid = _int(e, "gid", raw, 0, _MAX_ID)
            # Names are written only when they change for an id (upstream's nameIfChanged):
            # an entry without one has the latest name seen for its uid (gname: its gid).
            uname = e.get("userName")
            gname = e.get("groupName")
            if uname or gname or uid != last_uid or gid != last_gid:
                if isinstance(uname, str) and uname:
                    cur_u[uid] = uname
                    owners.setdefault(("u", uid), uname)
                if isinstance(gname, str) and gname:
                    cur_g[gid] = gname
                    owners.setdefault(("g", gid), gname)
                names = (cur_u.get(uid, ""), cur_g.get(gid, ""))
                last_owner = 0
                if names != ("", ""):
                    last_owner = name_refs.get(names, 0)
                    if not last_owner:
                        last_owner = name_refs[names] = len(name_refs) + 1
                last_uid, last_gid = uid, gid
            owner = last_owner

            modtime = e.get("modtime")
            if modtime != last_modtime:  # (neighbours often share a time)
                mtime = ""
                if modtime is not None:
                    if type(modtime) is not str:
                        raise FormatError(f"TOC entry {raw!r}: modtime is not a string")
                    cached = mtimes.get(modtime)
                    if cached is None:
                        ns = parse_modtime(modtime)
                        # Go's zero time: unspecified.
                        cached = "" if ns == -62135596800 * 1_000_000_000 else ns
                        if len(mtimes) >= 4096:
                            mtimes.clear()
                        mtimes[modtime] = cached
                    mtime = cached
                last_modtime = modtime
            xattrs = e.get("xattrs")
            xattrs_json = _check_xattrs(xattrs, raw) if xattrs else None

            if kind == "dir":
                target = ROOT_ID if path == "" else dirs_get(path)
                if target is not None:
                    # The root, or a dir entry after its children (or repeated): update it,
                    # keep the inode.
                    if target == ROOT_ID:
                        self.root_row = (ROOT_ID, ROOT_ID, "", DIR, mode)
                    self.dir_updates.append(
                        (DIR, mode, uid, gid, _null(mtime), xattrs_json, owner or None, target)
                    )
                    continue
            elif path == "":
                raise FormatError(f"TOC entry {raw!r} of type {kind} names the layer root")
            if head != last_head:  # (entries come directory by directory)
                pid = dirs_get(head)
                if pid is None:
                    pid = self._implicit_dir(head)
                last_head, last_pid = head, pid
            pid = last_pid
            nid = self.next_id
            self.next_id = nid + 1
            link = ""
            dev = inner = size = 0
            digest: bytearray | None = None
            offset: int | None = None
            code = _KIND_CODE[kind]
            if kind == "reg":
                size = e.get("size", 0)
                if type(size) is not int or not 0 <= size <= _MAX_SIZE:
                    size = _int(e, "size", raw, 0, _MAX_SIZE)
                if size:
                    ctype = e.get("chunkType")
                    zeros = 0 if ctype is None or ctype == "" else _chunk_flags(e, raw)
                    offset = e.get("offset")
                    if type(offset) is not int or not 0 <= offset < toc_offset:
                        offset = _int(e, "offset", raw, None, toc_offset - 1)
                    if offset is None and not zeros:
                        raise FormatError(f"TOC entry {raw!r}: non-empty file without offset")
                    inner = e.get("innerOffset", 0)
                    if type(inner) is not int or not 0 <= inner <= _MAX_SIZE:
                        inner = _int(e, "innerOffset", raw, 0, _MAX_SIZE)
                    if offset is not None:
                        add_offset(offset)
                    end_offset = e.get("endOffset")
                    if end_offset is not None:
                        end_offset = _int(e, "endOffset", raw, None, toc_offset)
                        # containers/storage: where this file's compressed bytes end.
                        if offset is not None and end_offset < offset:
                            raise FormatError(
                                f"TOC entry {raw!r}: endOffset {end_offset} is before "
                                f"offset {offset}"
                            )
                        add_offset(end_offset)
                    cd = e.get("chunkDigest")
                    fd = e.get("digest")
                    cdig = fdig = None
                    if cd:
                        # _digest's common case, inline.
                        if type(cd) is str and len(cd) == 71 and cd.startswith("sha256:"):
                            try:
                                cdig = fromhex(cd[7:])
                            except ValueError:
                                cdig = _digest(cd, raw)
                        else:
                            cdig = _digest(cd, raw)
                    if fd:
                        fdig = cdig if fd == cd else _digest(fd, raw)
                    csize = e.get("chunkSize", 0)
                    if type(csize) is not int or not 0 <= csize <= _MAX_SIZE:
                        csize = _int(e, "chunkSize", raw, 0, _MAX_SIZE)
                    if (csize and csize < size) or zeros:
                        digest = fdig  # of the whole file; each chunk has its own
                        first = (nid, 0, csize, offset, inner, cdig, zeros)
                        self.cur_file = (nid, raw, size, [first], end_offset)
                        code |= _F_CHUNKED
                    else:
                        # One chunk: the whole file. Verified against chunkDigest, as upstream
                        # does, or the file digest (containers/storage writes only that one).
                        if cdig is not None and fdig is not None and cdig != fdig:
                            raise FormatError(
                                f"TOC entry {raw!r}: chunkDigest and digest of its one chunk differ"
                            )
                        digest = cdig or fdig
                        if digest is None and verified:
                            raise FormatError(_no_digest(raw, 0))
                elif e.get("digest"):
                    digest = _digest(e["digest"], raw)
            elif kind == "dir":
                self.dirs[path] = nid
            elif kind == "symlink":
                link = _str(e, "linkName", raw)
                size = len(link) if link.isascii() else len(link.encode("utf-8", "surrogateescape"))
            elif kind == "hardlink":
                link = clean_name(_str(e, "linkName", raw))
                self.hardlinks.append((nid, link, path))
            elif kind in ("char", "block"):
                major = _int(e, "devMajor", raw, 0, _MAX_DEV)
                minor = _int(e, "devMinor", raw, 0, _MAX_DEV)
                dev = (major << 32) | minor
            yield (
                nid,
                pid,
                base,
                code,
                mode,
                uid,
                gid,
                size,
                mtime,
                link,
                dev,
                -1 if xattrs_json is None else xattrs_json,
                -1 if digest is None else digest,
                -1 if offset is None else offset,
                inner,
                owner,
            )

    def _implicit_dir(self, path: str) -> int:
        """A parent directory with no entry of its own (yet): a row, and its parents'."""
        head, _, base = path.rpartition("/")
        grand = self.dirs.get(head)
        if grand is None:
            grand = self._implicit_dir(head)
        did = self.next_id
        self.next_id = did + 1
        self.dirs[path] = did
        self.implicit_rows.append((did, grand, base, DIR | _F_IMPLICIT, 0o755))
        return did

    def _add_chunk(self, e: dict[str, Any], raw: str) -> None:
        cur = self.cur_file
        if cur is None or (raw != cur[1] and clean_name(raw) != clean_name(cur[1])):
            raise FormatError(f"TOC chunk entry {raw!r} does not follow its file's entry")
        nid, _, _size, chunks, _end = cur
        foff = _int(e, "chunkOffset", raw, 0, _MAX_SIZE)
        csize = _int(e, "chunkSize", raw, 0, _MAX_SIZE)
        zeros = _chunk_flags(e, raw)
        offset = _int(e, "offset", raw, None, self.toc_offset - 1)
        if offset is None and not zeros:
            raise FormatError(f"TOC chunk entry {raw!r} at {foff} has no offset")
        inner = _int(e, "innerOffset", raw, 0, _MAX_SIZE)
        cdig = e.get("chunkDigest")
        digest = _digest(cdig, raw) if cdig else None
        chunks.append((nid, foff, csize, offset, inner, digest, zeros))
        if offset is not None:
            self.offsets.append(offset)

    def _finish_file(self) -> None:
        """Check a chunked file's chunks tile it exactly, then queue their rows."""
        if self.cur_file is None:
            return
        _nid, raw, size, chunks, end_offset = self.cur_file
        self.cur_file = None
        pos = 0
        fixed: list[tuple[Any, ...]] = []
        for i, (cid, foff, csize, off, inner, dig, flags) in enumerate(chunks):
            if foff != pos:
                raise FormatError(
                    f"TOC entry {raw!r}: chunk at {foff} does not follow the previous one "
                    f"(expected offset {pos})"
                )
            if csize == 0:  # 0 means "to the end of the file"
                csize = size - foff
            if csize <= 0 or foff + csize > size:
                raise FormatError(f"TOC entry {raw!r}: chunk at {foff} has a bad size {csize}")
            if csize != size - foff and i == len(chunks) - 1:
                raise FormatError(f"TOC entry {raw!r}: chunks cover {foff + csize} of {size} bytes")
            if dig is None and self.verified and not flags & _C_ZEROS:
                raise FormatError(_no_digest(raw, foff))
            if off is None:
                # A hole with no bytes in the blob: an empty range next to its neighbours
                # (the next chunk's start, else the previous one's), so that a coalesced
                # fetch of the file's chunks stays one contiguous run.
                later = (c[3] for c in chunks[i + 1 :] if c[3] is not None)
                off = next(later, None)
                if off is None:
                    off = fixed[-1][3] if fixed else (end_offset or 0)
                flags |= _C_NO_DATA
            fixed.append((cid, foff, csize, off, inner, -1 if dig is None else dig, flags))
            pos = foff + csize
        self.chunk_rows.extend(fixed)

    def _dedupe(self) -> None:
        """A name that appears twice: the later entry wins, as when extracting the tar."""
        # Counting the distinct names is a third of the cost of grouping them: the usual
        # layer, with no name twice, is done with that.
        ((rows,),) = self.db.execute("SELECT count(*) FROM entries")
        ((names,),) = self.db.execute(
            "SELECT count(*) FROM (SELECT DISTINCT parent, name FROM entries)"
        )
        if rows == names:
            return
        self.replaced = True
        dups = self.db.execute(
            "SELECT parent, name, max(id) FROM entries GROUP BY parent, name HAVING count(*) > 1"
        ).fetchall()
        gone: set[int] = set()
        for parent, name, keep in dups:
            gone.update(
                row[0]
                for row in self.db.execute(
                    "SELECT id FROM entries WHERE parent=? AND name=? AND id!=?",
                    (parent, name, keep),
                )
            )
            self.db.execute(
                "DELETE FROM entries WHERE parent=? AND name=? AND id!=?", (parent, name, keep)
            )
        if gone:
            # A replaced name is no longer a link to anything (a hardlink repeated under the
            # same name is one name, not two), and its chunks go with it.
            self.hardlinks = [h for h in self.hardlinks if h[0] not in gone]
            self.db.executemany("DELETE FROM chunks WHERE entry=?", [(i,) for i in gone])

    def _resolve_hardlinks(self) -> dict[int, int]:
        """Point every hardlink row at its canonical inode; returns {link row: inode}."""
        canon: dict[int, int] = {}
        for nid, target, _path in self.hardlinks:
            seen = set()
            cur_target = target
            while True:
                if cur_target in seen:
                    raise FormatError(f"hardlink loop at {cur_target!r}")
                seen.add(cur_target)
                found = self._lookup(cur_target)
                if found is None:
                    raise FormatError(f"hardlink to {cur_target!r}, which is not in the layer")
                tid, kind, link = found
                if kind & _KIND_MASK == HARDLINK:
                    cur_target = link
                    continue
                if kind & _KIND_MASK == DIR:
                    raise FormatError(f"hardlink to directory {cur_target!r}")
                canon[nid] = tid
                break
        self.db.executemany(
            "UPDATE entries SET ino=? WHERE id=?", [(t, n) for n, t in canon.items()]
        )
        return canon

    def _lookup(self, path: str) -> tuple[int, int, str] | None:
        """The (id, kind, link) of the row at a path, or None."""
        head, _, base = path.rpartition("/")
        if self.replaced or not path:
            # A replaced directory's id may still be in ``dirs``: walk the rows instead.
            tid = _lookup_path(self.db, path)
            if tid is None:
                return None
            row = self.db.execute("SELECT id, kind, link FROM entries WHERE id=?", (tid,))
        else:
            # Rows are only ever created below a directory of ``dirs``.
            parent = self.dirs.get(head)
            if parent is None:
                return None
            row = self.db.execute(
                "SELECT id, kind, link FROM entries WHERE parent=? AND name=?", (parent, base)
            )
        found: tuple[int, int, str] | None = row.fetchone()
        return found

    def _count_links(self, canon: dict[int, int]) -> None:
        """Directories: 2 + subdirectories. Files: 1 + the hardlinks naming them."""
        subdirs = dict.fromkeys(self.dirs.values(), 0)
        for (parent,) in self.db.execute(
            "SELECT parent FROM entries WHERE (kind & 15) = ? AND id != ?", (DIR, ROOT_ID)
        ):
            subdirs[parent] = subdirs.get(parent, 0) + 1
        links: dict[int, int] = {}
        for target in canon.values():
            links[target] = links.get(target, 1) + 1
        self.db.executemany(
            "UPDATE entries SET nlink=? WHERE id=?",
            [(2 + n, d) for d, n in subdirs.items()] + [(n, f) for f, n in links.items()],
        )


def _sorted_unique(values: array.array[int]) -> array.array[int]:
    """``values`` (all >= 0) sorted without repeats. Offsets come mostly in blob order: when
    already sorted, no list of a million ints is made (it would stay in the heap after)."""
    if not all(map(operator.le, values, itertools.islice(values, 1, None))):
        values = array.array("q", sorted(values))
    # Sorted: a repeat is equal to the value before it.
    keep = map(operator.ne, values, itertools.chain((-1,), values))
    return array.array("q", itertools.compress(values, keep))


def _lookup_path(db: sqlite3.Connection, path: str) -> int | None:
    cur = ROOT_ID
    for part in path.split("/") if path else []:
        row = db.execute("SELECT id FROM entries WHERE parent=? AND name=?", (cur, part)).fetchone()
        if row is None:
            return None
        cur = row[0]
    return cur


def _null(mtime: int | str) -> int | None:
    return None if mtime == "" else int(mtime)


def _digest(value: object, what: str) -> bytearray:
    """:func:`parse_digest` as a bytearray (which sqlite3 binds directly), the common case
    inline."""
    if type(value) is str and len(value) == 71 and value.startswith("sha256:"):
        try:
            return bytearray.fromhex(value[7:])
        except ValueError:
            pass
    return bytearray(parse_digest(value, what))  # raises the error


def _int(
    e: dict[str, Any], key: str, raw: str, default: int | None, maximum: int = _MAX_INT
) -> Any:
    value = e.get(key, default)
    # type() is, not isinstance: bool is an int subclass and must be rejected.
    if type(value) is int and 0 <= value <= maximum:
        return value
    if value is None:
        return default
    raise FormatError(f"TOC entry {raw!r}: invalid {key} {value!r}")


def _no_digest(raw: str, foff: int) -> str:
    return (
        f"TOC entry {raw!r}: the chunk at offset {foff} has no chunkDigest, so its bytes "
        "cannot be verified although the TOC is (read the layer as unverified to accept it)"
    )


def _chunk_flags(e: dict[str, Any], raw: str) -> int:
    """``chunkType``: absent or "" for data, "zeros" for a hole (containers/storage)."""
    kind = e.get("chunkType")
    if kind is None or kind == "":
        return 0
    if kind == "zeros":
        return _C_ZEROS
    raise FormatError(f"TOC entry {raw!r}: unknown chunkType {kind!r}")


def _str(e: dict[str, Any], key: str, raw: str) -> str:
    value = e.get(key)
    if not isinstance(value, str) or not value or "\x00" in value:
        raise FormatError(f"TOC entry {raw!r}: missing or invalid {key}")
    return value


def _check_xattrs(xattrs: object, raw: str) -> str:
    if not isinstance(xattrs, dict):
        raise FormatError(f"TOC entry {raw!r}: xattrs is not an object")
    for k, v in xattrs.items():
        if not isinstance(v, str) or not k:
            raise FormatError(f"TOC entry {raw!r}: invalid xattr {k!r}")
        try:
            base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise FormatError(f"TOC entry {raw!r}: xattr {k!r} is not base64") from None
    return json.dumps(xattrs, separators=(",", ":"), sort_keys=True)


def _remove_dead_builders_files(target: str) -> None:
    """Remove ``TARGET.PID.tmp`` files whose builder is gone (killed mid-build): a live
    builder holds an flock on its file."""
    folder, base = os.path.split(target)
    prefix = base + "."
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        if not name[len(prefix) : -len(".tmp")].isdigit():
            continue
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # being built
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
        finally:
            os.close(fd)
