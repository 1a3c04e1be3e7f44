"""The eStargz table of contents (``stargz.index.json``): streaming parse and validation.

Pure logic. A TOC of a million entries is hundreds of megabytes of JSON, so it is never
turned into one big list of dicts: :func:`iter_toc_entries` decodes one entry at a time and
the index builder stores each in compact form before the next is decoded.
"""

from __future__ import annotations

import codecs
import functools
import itertools
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..errors import FormatError, UnsafePathError

__all__ = [
    "ENTRY_TYPES",
    "HIDDEN_NAMES",
    "LANDMARK_NO_PREFETCH",
    "LANDMARK_PREFETCH",
    "TAR_TYPES",
    "TOC_TAR_NAME",
    "clean_name",
    "iter_toc_batches",
    "iter_toc_entries",
    "parse_digest",
    "parse_modtime",
]

TOC_TAR_NAME = "stargz.index.json"
LANDMARK_PREFETCH = ".prefetch.landmark"
LANDMARK_NO_PREFETCH = ".no.prefetch.landmark"
HIDDEN_NAMES = frozenset({TOC_TAR_NAME, LANDMARK_PREFETCH, LANDMARK_NO_PREFETCH})
ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"})
#: tar typeflag -> TOC entry type (the writer's, and the kind stargzfs.pull.tarstream reports)
TAR_TYPES: Mapping[bytes, str] = {
    b"0": "reg",
    b"\x00": "reg",
    b"7": "reg",  # contiguous file: a regular file everywhere that matters
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "char",
    b"4": "block",
    b"5": "dir",
    b"6": "fifo",
}

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|z|[+-]\d\d:\d\d)\Z"
)


def clean_name(name: str) -> str:
    """Clean a TOC/tar entry name to a relative path; "" is the layer root.

    As upstream's ``cleanEntryName`` (``path.Clean("/" + name)`` made relative):
    ``./a//b/`` → ``a/b``, ``/etc/passwd`` → ``etc/passwd``, ``a/../b`` → ``b``, and ``/``,
    ``.`` or ``./`` alone name the root. Rejected, naming the entry: NUL bytes, and a ``..``
    that climbs above the root (upstream silently clamps it; a hostile layer gets an error).
    """
    if (
        "\x00" not in name
        and "//" not in name
        and "/." not in name
        and not name.startswith(("/", "."))
    ):
        return name.rstrip("/")  # the common case: already clean
    if "\x00" in name:
        raise UnsafePathError(f"entry name {name!r} contains a NUL byte")
    parts: list[str] = []
    for part in name.split("/"):
        if part == "..":
            if not parts:
                raise UnsafePathError(
                    f"entry name {name!r} has a '..' component that escapes the layer root"
                )
            parts.pop()
        elif part and part != ".":
            parts.append(part)
    return "/".join(parts)


@functools.lru_cache(maxsize=4096)
def parse_modtime(text: str) -> int:
    """RFC 3339 timestamp → nanoseconds since the epoch (TOCs repeat times: cached)."""
    m = _RFC3339.match(text)
    if m is None:
        raise FormatError(f"invalid modtime {text!r}")
    import calendar

    year, mon, day, hh, mm, ss = (int(g) for g in m.groups()[:6])
    frac, tz = m.group(7), m.group(8)
    try:
        secs = calendar.timegm((year, mon, day, hh, mm, ss, 0, 0, 0))
    except (ValueError, OverflowError) as e:
        raise FormatError(f"invalid modtime {text!r}") from e
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        secs -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    nanos = int(frac.ljust(9, "0")) if frac else 0
    return secs * 1_000_000_000 + nanos


def parse_digest(value: object, what: str) -> bytes:
    """``sha256:<64 hex>`` → 32 raw bytes."""
    if not isinstance(value, str) or not value.startswith("sha256:") or len(value) != 71:
        raise FormatError(f"{what}: unsupported or malformed digest {value!r}")
    try:
        return bytes.fromhex(value[7:])
    except ValueError as e:
        raise FormatError(f"{what}: malformed digest {value!r}") from e


_WINDOW = 4 << 20  # bytes of JSON decoded to text at a time
_BATCH = 1 << 16  # characters of TOC entries decoded by one call of the JSON decoder


class _Scanner:
    """Walks a JSON document held as bytes, decoding it to text one window at a time, so
    a TOC of hundreds of megabytes never exists as one giant str next to its bytes."""

    def __init__(self, data: bytes | str | Iterable[bytes]) -> None:
        self.pos = 0
        self.base = 0  # characters dropped before ``text``, for error positions
        self.text = ""
        self.final = False
        self._single_until = 0  # before this position, elements are decoded one at a time
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        if isinstance(data, str):
            self.text, self.final = data, True
            self._pieces: Iterator[bytes] = iter(())
        elif isinstance(data, (bytes, bytearray, memoryview)):
            view = memoryview(data)
            self._pieces = (bytes(view[i : i + _WINDOW]) for i in range(0, len(view), _WINDOW))
        else:
            self._pieces = iter(data)
        self._fill()

    def _fill(self) -> bool:
        """Append the next piece of input; False when there is none."""
        if self.final:
            return False
        piece = next(self._pieces, None)
        if piece is None:
            self.final = True
            new = self._decoder.decode(b"", final=True)
        else:
            new = self._decoder.decode(piece)
        self.base += self.pos
        self.text = self.text[self.pos :] + new
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next non-blank character ("" at the end), without consuming it."""
        while True:
            text, pos = self.text, self.pos
            if pos < len(text) and text[pos] not in " \t\n\r":
                return text[pos]
            m = _WS.match(text, pos)
            self.pos = m.end() if m else pos
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self._fill():
                return ""

    def expect(self, char: str) -> None:
        found = self.peek()
        if found != char:
            where = self.base + self.pos
            shown = repr(self.text[self.pos : self.pos + 10]) if found else "end of data"
            raise FormatError(
                f"invalid TOC JSON at character {where}: expected {char!r}, found {shown}"
            )
        self.pos += 1

    def _fill_ahead(self) -> None:
        """Read on when little is left: a value cut by the window's end is decoded twice, and
        the failed try costs a count of the window's lines (JSONDecodeError's lineno)."""
        if not self.final and len(self.text) - self.pos < _BATCH:
            self._fill()

    def value(self) -> Any:
        self.peek()
        self._fill_ahead()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
                # A value that touches the window's edge may be cut short (a number): read on.
                if end < len(self.text) or self.final:
                    self.pos = end
                    return value
            except json.JSONDecodeError as e:
                if self.final:
                    raise FormatError(
                        f"invalid TOC JSON: {e.msg} at character {self.base + e.pos}"
                    ) from None
            self._fill()

    def batch(self) -> list[Any]:
        """The array elements from here to the last ``},`` within ``_BATCH`` characters,
        decoded in one call of the C decoder (``[]`` when that is not possible).

        Tokenizing JSON is deterministic from a known element boundary, so the elements
        between here and a ``},`` parse as ``[`` + them + ``]`` exactly when that ``}`` closes
        an element of this array; a ``},`` inside a string or a nested object makes the parse
        fail instead. Then one earlier cut (before where the parse failed) is tried, and when
        that fails too the elements up to the first cut are left to :meth:`value`, one at a
        time, whose errors give the position of anything malformed.
        """
        self._fill_ahead()
        text, pos = self.text, self.pos
        if self.base + pos < self._single_until:
            return []
        cut = text.rfind("},", pos, pos + _BATCH)
        first_cut = cut
        for _attempt in range(2):
            if cut < 0:
                break
            try:
                values: list[Any] = _DECODER.decode("[" + text[pos : cut + 1] + "]")
            except json.JSONDecodeError as e:
                # e.pos counts the "[": the failure is at text[pos + e.pos - 1].
                cut = text.rfind("},", pos, min(cut, pos + e.pos - 1))
                continue
            self.pos = cut + 1
            return values
        if first_cut >= 0:
            self._single_until = self.base + first_cut + 1
        return []

    def at_end(self) -> bool:
        return self.peek() == ""


def iter_toc_entries(data: bytes | str | Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """Yield the raw entry objects of a TOC document, one at a time, in order.

    Checks the document's shape (an object with ``version`` 1 and an ``entries`` array of
    objects) and each entry's ``name`` and ``type``; field-level validation is the index
    builder's. Raises :class:`FormatError` for anything else.
    """
    for batch in iter_toc_batches(data):
        yield from batch


def iter_toc_batches(data: bytes | str | Iterable[bytes]) -> Iterator[list[dict[str, Any]]]:
    """:func:`iter_toc_entries`, a list of consecutive entries at a time (a few hundred:
    what one call of the JSON decoder gave). An error is raised after the entries before the
    one it is about have been yielded, as :func:`iter_toc_entries` does."""
    scan = _Scanner(data)
    scan.expect("{")
    seen_entries = False
    version: object = None
    first = True
    while scan.peek() != "}":
        if not first:
            scan.expect(",")
        first = False
        key = scan.value()
        if not isinstance(key, str):
            raise FormatError("invalid TOC JSON: object key is not a string")
        scan.expect(":")
        if key != "entries":
            value = scan.value()
            if key == "version":
                version = value
            continue
        seen_entries = True
        scan.expect("[")
        index = 0
        while scan.peek() != "]":
            if index:
                scan.expect(",")
            batch = scan.batch() or [scan.value()]
            if not _all_good(batch):
                for i, entry in enumerate(batch):
                    if not _all_good([entry]):
                        if i:
                            yield batch[:i]
                        _check_entry(entry, index + i)
            index += len(batch)
            yield batch
        scan.pos += 1
    scan.pos += 1
    if not scan.at_end():
        raise FormatError("invalid TOC JSON: trailing data after the document")
    if not seen_entries:
        raise FormatError("TOC has no 'entries' array")
    if version != 1:
        raise FormatError(f"unsupported TOC version {version!r} (expected 1)")


def _all_good(batch: list[Any]) -> bool:
    """Whether every entry passes :func:`_check_entry`, in a few passes of C (no Python code
    per entry): objects (else ``dict.get`` raises), names that are strings, known types."""
    try:
        types = set(map(dict.get, batch, itertools.repeat("type")))
        names = set(map(type, map(dict.get, batch, itertools.repeat("name"))))
    except TypeError:  # not an object, or an unhashable type
        return False
    return types <= ENTRY_TYPES and names == {str}


def _check_entry(entry: object, index: int) -> None:
    if not isinstance(entry, dict):
        raise FormatError(f"TOC entry #{index} is not an object")
    name = entry.get("name")
    if not isinstance(name, str):
        raise FormatError(f"TOC entry #{index} has no name")
    kind = entry.get("type")
    if not isinstance(kind, str) or kind not in ENTRY_TYPES:
        raise FormatError(f"TOC entry {name!r} has unknown type {kind!r}")
