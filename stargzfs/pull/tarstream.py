"""A fast, forward-only reader of tar streams (what :class:`~.extract.LayerApplier` applies).

Python's :mod:`tarfile` spends ~110-150 µs of pure Python per member of a layer tar (its
``_Stream`` buffering, ``frombuf``, ``nts``/``nti``, the PAX regexes); this reads the same
members with a fraction of that work: the stream is read in big pieces (1 MiB) into one buffer,
a header is one slice of it, its checksum two ``zlib.adler32`` calls, and a member's data is
handed out as slices of the buffer (:meth:`TarReader.copy_to_fd` writes them straight to a
file with ``os.write``), never 512 bytes at a time.

Formats: POSIX ustar (the 155-byte ``prefix`` field) and pax (``x`` extended headers: path,
linkpath, size, uid, gid, uname, gname, mtime with a fraction, and any other record, e.g.
``SCHILY.xattr.*``, kept in :attr:`TarMember.pax_headers`; ``g`` global headers apply to every
following member), GNU (``L`` long names, ``K`` long link targets, base-256 numbers), and V7
(no magic; a directory is a regular file whose name ends in ``/``). Names and pax values are
decoded as UTF-8 with ``surrogateescape`` (so ``hdrcharset=BINARY`` and other non-UTF-8 names
keep their bytes), as :mod:`tarfile` does with ``encoding="utf-8"`` in stream mode.

The members are what ``tarfile.open(fileobj=..., mode="r|")`` yields for every archive it
writes (same names, types, numbers, link names, pax headers, data; see
``tests/test_tarstream.py``). Where the two differ it is on damaged or unusual input, and on
purpose: a bad header checksum or a stream that ends inside a header, an extension header or
a member's data is a :class:`TarFormatError` naming the offset (and the entry) where tarfile
would quietly end the archive; the prefix field is only read in a POSIX (``ustar\\0``) header
(GNU headers keep times there); GNU sparse members (``S``, ``GNU.sparse.*``) are refused.

The archive ends at a zero block (a second one normally follows it; anything after is
ignored, as tarfile and GNU tar do) or at the end of the stream at a member boundary.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError
from ..formats.toc import TAR_TYPES

__all__ = ["TarFormatError", "TarMember", "TarReader"]

log = logging.getLogger(__name__)

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_BUFSIZE = 1 << 20
_MAX_EXTENSION = 64 << 20  # the largest pax / long-name header payload read into memory

#: typeflag -> kind (what :attr:`TarMember.type` holds); others are "other"
TYPES = TAR_TYPES
#: kinds whose size counts no data in the archive (as tarfile and Go's archive/tar read it)
_NO_DATA = frozenset({"hardlink", "symlink", "char", "block", "dir", "fifo"})
_EXTENSIONS = frozenset({b"x", b"X", b"g", b"L", b"K"})


class TarFormatError(FormatError):
    """The stream is not a well-formed tar archive (the message names the offset / entry)."""


@dataclass(slots=True)
class TarMember:
    """One archive member, its extension headers (pax, GNU long names) applied."""

    name: str
    type: str  # reg, dir, symlink, hardlink, char, block, fifo, other
    typeflag: bytes  # the header's type byte (b"5" for a V7 directory, b"\x00" + "/")
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int | float  # an int from the header, a float from a pax record (as tarfile)
    linkname: str
    uname: str
    gname: str
    devmajor: int
    devminor: int
    pax_headers: dict[str, str] = field(default_factory=dict)  # global ones included
    offset: int = 0  # of its first header (extension headers included)
    offset_data: int = 0  # of its data


def _str(raw: bytes) -> str:
    """A NUL-terminated header string (as tarfile's ``nts``)."""
    p = raw.find(0)
    if p >= 0:
        raw = raw[:p]
    return raw.decode("utf-8", "surrogateescape")


def _num(raw: bytes) -> int:
    """A numeric header field: octal digits (NUL/space terminated, possibly empty), or GNU
    base-256 (first byte 0x80 positive, 0xff negative two's complement), as tarfile's ``nti``.
    ValueError if it is neither."""
    first = raw[0]
    if first == 0x80 or first == 0xFF:
        n = int.from_bytes(raw[1:], "big")
        if first == 0xFF:
            n -= 1 << (8 * (len(raw) - 1))
        return n
    p = raw.find(0)
    if p >= 0:
        raw = raw[:p]
    raw = raw.strip()
    if not raw:
        return 0
    if not raw.isascii():
        raise ValueError("not ASCII")
    return int(raw, 8)


def _signed_checksum_ok(h: bytes, stored: int) -> bool:
    """The header's checksum as old Sun and NeXT tars computed it: signed bytes."""
    unsigned = sum(h[:148]) + sum(h[156:]) + 256
    high = len(h[:148].translate(None, _LOW)) + len(h[156:].translate(None, _LOW))
    return unsigned - 256 * high == stored


_LOW = bytes(range(128))


def _parse_pax(buf: bytes, into: dict[str, str]) -> bool:
    """Add the records ``"%d %s=%s\n" % (length, keyword, value)`` of a pax header to
    ``into`` (later ones win); False if they are malformed. NUL padding after the last record
    is allowed."""
    pos, n = 0, len(buf)
    while pos < n:
        if buf[pos] == 0:
            return buf.count(0, pos) == n - pos
        sp = buf.find(b" ", pos, pos + 21)
        digits = buf[pos:sp] if sp > pos else b""
        if not digits.isdigit() or not digits.isascii():
            return False
        end = pos + int(digits)
        eq = buf.find(b"=", sp + 1, end)
        if end > n or eq < 0 or buf[end - 1] != 0x0A:
            return False
        key = buf[sp + 1 : eq].decode("utf-8", "surrogateescape")
        into[key] = buf[eq + 1 : end - 1].decode("utf-8", "surrogateescape")
        pos = end
    return True


_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s")


@functools.lru_cache(maxsize=256)
def _owner(raw: bytes) -> str:
    """A user or group name field (the same few in every member)."""
    return _str(raw)


def _pax_int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0  # as tarfile


def _pax_float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0  # as tarfile


class TarReader:
    """Members of the tar archive read from ``stream`` (anything with ``read(n)``: a file, a
    pipe, a decompressor), front to back: :meth:`next` (or iteration), and the current
    member's data with :meth:`copy_to_fd`, :meth:`read` or :meth:`skip_data` (data left
    unread is skipped by the next :meth:`next`)."""

    def __init__(self, stream: Any, *, bufsize: int = _BUFSIZE) -> None:
        self._stream = stream
        self._bufsize = bufsize
        self._buf = b""
        self._mv = memoryview(self._buf)
        self._len = 0
        self._pos = 0
        self._base = 0  # archive offset of _buf[0]
        self._eof = False
        self._ended = False
        self._left = 0  # data of the current member not yet read
        self._pad = 0  # its padding to the block
        self._member: TarMember | None = None
        self._globals: dict[str, str] = {}

    # -- the buffer ------------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Bytes of the archive consumed so far."""
        return self._base + self._pos

    def _refill(self) -> bool:
        """Replace the (fully consumed) buffer with the next piece of the stream."""
        if self._eof:
            return False
        data = self._stream.read(self._bufsize)
        if not data:
            self._eof = True
            return False
        if type(data) is not bytes:
            data = bytes(data)
        self._base += self._len
        self._buf = data
        self._mv = memoryview(data)
        self._len = len(data)
        self._pos = 0
        return True

    def _take(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer at the end of the stream)."""
        pos = self._pos
        end = pos + n
        if end <= self._len:
            self._pos = end
            return self._buf[pos:end]
        parts = [self._buf[pos:]]
        have = self._len - pos
        self._pos = self._len
        while have < n and self._refill():
            k = min(n - have, self._len)
            parts.append(self._buf[:k])
            self._pos = k
            have += k
        return b"".join(parts)

    def _skip(self, n: int) -> int:
        """Skip ``n`` bytes; how many were there."""
        done = 0
        while True:
            avail = self._len - self._pos
            if avail >= n - done:
                self._pos += n - done
                return n
            done += avail
            self._pos = self._len
            if not self._refill():
                return done

    # -- members ---------------------------------------------------------------------------
    def __iter__(self) -> TarReader:
        return self

    def __next__(self) -> TarMember:
        m = self.next()
        if m is None:
            raise StopIteration
        return m

    def _where(self, offset: int) -> str:
        after = f" (after entry {self._member.name!r})" if self._member is not None else ""
        return f"at offset {offset}{after}"

    def next(self) -> TarMember | None:
        """The next member, or None at the end of the archive."""
        rest = self._left + self._pad
        if rest:
            if self._pos + rest <= self._len:  # the rest of the previous member is buffered
                self._pos += rest
                self._left = self._pad = 0
            else:
                self._skip_rest()
        if self._ended:
            return None
        start = -1
        local: dict[str, str] | None = None
        long_name: str | None = None
        long_link: str | None = None
        while True:
            off = self._base + self._pos
            h = self._take(BLOCK)
            if len(h) != BLOCK or h == _ZERO_BLOCK:
                if start >= 0:
                    what = "ends" if len(h) != BLOCK else "has an end-of-archive block"
                    raise TarFormatError(
                        f"the archive {what} after an extension header at offset {start}"
                    )
                if h:
                    if len(h) != BLOCK:
                        raise TarFormatError(
                            f"truncated header {self._where(off)}: the stream ends after "
                            f"{len(h)} of its 512 bytes"
                        )
                    self._check_end(off)
                self._ended = True
                return None
            f = _HEADER.unpack_from(h)
            # the checksum: each half of the block sums to less than 65521, so the low half
            # of its Adler-32 is that half's exact byte sum plus one
            try:
                stored = int(f[6].rstrip(b"\x00 ") or b"0", 8)
            except ValueError:
                try:
                    stored = _num(f[6])
                except ValueError:
                    stored = -1  # not a number: a bad checksum
            if stored != (
                (zlib.adler32(h[:256]) & 0xFFFF)
                + (zlib.adler32(h[256:]) & 0xFFFF)
                - 2
                - sum(f[6])
                + 256
            ) and not _signed_checksum_ok(h, stored):
                raise TarFormatError(f"bad header checksum {self._where(off)}")
            if start < 0:
                start = off
            typeflag = f[7]
            if typeflag not in _EXTENSIONS:
                break
            # an extension header: its payload applies to the next header
            try:
                size = int(f[4].rstrip(b"\x00 ") or b"0", 8)
            except ValueError:
                size = self._num(f[4], "size", off)
            if not 0 <= size <= _MAX_EXTENSION:
                raise TarFormatError(
                    f"extension header {typeflag!r} {self._where(off)} has a size of {size}"
                )
            pos = self._pos
            end = pos + size
            padded = end + (-size % BLOCK)
            if padded <= self._len:
                payload = self._buf[pos:end]
                self._pos = padded
            else:
                payload = self._take(size)
                if len(payload) != size or self._skip(-size % BLOCK) != -size % BLOCK:
                    raise TarFormatError(
                        f"truncated extension header {typeflag!r} {self._where(off)}: the "
                        f"stream ends in its data"
                    )
            if typeflag == b"L":
                long_name = _str(payload)
            elif typeflag == b"K":
                long_link = _str(payload)
            else:
                if typeflag == b"g":
                    into = self._globals
                elif local is None:
                    into = local = {}
                else:
                    into = local
                if not _parse_pax(payload, into):
                    raise TarFormatError(
                        f"malformed pax header {typeflag!r} {self._where(off)}: {payload!r:.200}"
                    )

        # the member's own header
        try:
            mode = int(f[1].rstrip(b"\x00 ") or b"0", 8)
            uid = int(f[2].rstrip(b"\x00 ") or b"0", 8)
            gid = int(f[3].rstrip(b"\x00 ") or b"0", 8)
            size = int(f[4].rstrip(b"\x00 ") or b"0", 8)
            mtime: int | float = int(f[5].rstrip(b"\x00 ") or b"0", 8)
            devmajor = int(f[13].rstrip(b"\x00 ") or b"0", 8)
            devminor = int(f[14].rstrip(b"\x00 ") or b"0", 8)
        except ValueError:  # base-256, or something odd (or bad): field by field, slowly
            mode = self._num(f[1], "mode", off)
            uid = self._num(f[2], "uid", off)
            gid = self._num(f[3], "gid", off)
            size = self._num(f[4], "size", off)
            mtime = self._num(f[5], "mtime", off)
            devmajor = self._num(f[13], "devmajor", off)
            devminor = self._num(f[14], "devminor", off)
        name = f[0].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
        prefix = f[15]
        if prefix[0] and f[9] == b"ustar\x00" and typeflag != b"S":
            name = _str(prefix) + "/" + name
        if long_name is not None:
            name = long_name
        # V7: a directory is a file whose name ends in a slash. The whole name decides (a pax
        # path, a GNU long name, prefix + name), as in GNU tar and Go's archive/tar; tarfile
        # looks at the header's truncated field: a long name cut after a slash made a file a
        # directory and its data a bad header. An empty name field after a prefix is a
        # directory too, as in Go (tarfile: a file).
        whole = name
        if local is not None and local.get("path"):
            whole = local["path"]
        elif self._globals.get("path"):
            whole = self._globals["path"]
        if typeflag == b"\x00" and whole.endswith("/"):
            typeflag = b"5"
        kind = TYPES.get(typeflag, "other")
        if kind == "dir":
            name = name.removesuffix("/") if long_name is not None else name.rstrip("/")
        m = TarMember(
            name,
            kind,
            typeflag,
            mode,
            uid,
            gid,
            size,
            mtime,
            long_link
            if long_link is not None
            else f[8].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape"),
            _owner(f[11]),
            _owner(f[12]),
            devmajor,
            devminor,
            offset=start,
        )
        if self._globals or local:
            pax = {**self._globals, **local} if local else self._globals.copy()
            m.pax_headers = pax
            self._apply_pax(m, pax, off)
        if typeflag == b"S":
            raise TarFormatError(f"entry {m.name!r} is a GNU sparse file: not supported")
        if m.size < 0:
            raise TarFormatError(f"entry {m.name!r} {self._where(off)} has a negative size")
        self._member = m
        m.offset_data = self._base + self._pos
        if kind not in _NO_DATA:
            self._left = m.size
            self._pad = -m.size % BLOCK
        return m

    def _num(self, raw: bytes, what: str, off: int) -> int:
        try:
            return _num(raw)
        except ValueError:
            raise TarFormatError(
                f"invalid {what} field {raw!r} in the header {self._where(off)}"
            ) from None

    def _apply_pax(self, m: TarMember, pax: dict[str, str], off: int) -> None:
        """Apply the fields pax records replace (as tarfile: a bad number is 0)."""
        for key, value in pax.items():
            if key == "mtime":
                m.mtime = _pax_float(value)
                if not math.isfinite(m.mtime):
                    raise TarFormatError(
                        f"entry {m.name!r} {self._where(off)}: bad pax mtime {value!r}"
                    )
            elif key == "path":
                m.name = value.rstrip("/")
            elif key == "linkpath":
                m.linkname = value
            elif key == "size":
                try:
                    m.size = int(value)
                except ValueError:
                    raise TarFormatError(
                        f"entry {m.name!r} {self._where(off)}: bad pax size {value!r}"
                    ) from None
            elif key == "uid":
                m.uid = _pax_int(value)
            elif key == "gid":
                m.gid = _pax_int(value)
            elif key == "uname":
                m.uname = value
            elif key == "gname":
                m.gname = value
            elif key.startswith("GNU.sparse."):
                raise TarFormatError(f"entry {m.name!r} is a GNU sparse file: not supported")

    def _check_end(self, off: int) -> None:
        """A zero block at ``off`` ends the archive: a second one normally follows."""
        second = self._take(BLOCK)
        if second.count(0) != len(second):
            log.warning(
                "tar: a lone zero block at offset %d ends the archive; what follows is ignored",
                off,
            )

    # -- data ------------------------------------------------------------------------------
    @property
    def remaining(self) -> int:
        """Bytes of the current member's data not read yet."""
        return self._left

    def _truncated(self, got: int) -> TarFormatError:
        m = self._member
        assert m is not None
        return TarFormatError(
            f"entry {m.name!r}: data is truncated (the stream ends after {got} of its "
            f"{m.size} bytes)"
        )

    def read(self, n: int = -1) -> bytes | memoryview:
        """Up to ``n`` bytes (all if negative) of the current member's data, as large a piece
        as the buffer holds: a memoryview of it (no copy; it keeps that buffer alive); empty
        at the end of the data."""
        left = self._left
        if n < 0 or n > left:
            n = left
        if n == 0:
            return b""
        if self._pos == self._len and not self._refill():
            raise self._truncated(self._member.size - left if self._member else 0)
        pos = self._pos
        k = min(n, self._len - pos)
        self._pos = pos + k
        self._left = left - k
        return self._mv[pos : pos + k]

    def copy_to_fd(self, fd: int) -> int:
        """Write the rest of the current member's data to ``fd``; how many bytes."""
        total = 0
        left = self._left
        while left:
            pos = self._pos
            avail = self._len - pos
            if not avail:
                if not self._refill():
                    self._left = left
                    raise self._truncated(self._member.size - left if self._member else 0)
                continue
            k = avail if avail < left else left
            piece = self._mv[pos : pos + k]
            done = os.write(fd, piece)
            while done < k:
                done += os.write(fd, piece[done:])
            self._pos = pos + k
            self._left = left = left - k
            total += k
        return total

    def skip_data(self) -> None:
        """Skip the rest of the current member's data."""
        left = self._left
        got = self._skip(left)
        self._left = 0
        if got != left:
            m = self._member
            raise self._truncated((m.size - left + got) if m else got)

    def _skip_rest(self) -> None:
        self.skip_data()
        pad = self._pad
        self._pad = 0
        if self._skip(pad) != pad:
            m = self._member
            raise TarFormatError(
                f"entry {m.name if m else '?'!r}: the stream ends in the padding after its data"
            )
