"""Corrupt and hostile layers give the library's own errors, with clear messages."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import struct
import tarfile
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layer_helpers import (
    FIXTURES,
    blob_with_toc,
    index_of_bytes,
    legacy_blob_with_toc,
    legacy_footer,
)

from stargzfs.errors import (
    DigestMismatchError,
    FormatError,
    NotLazyError,
    StargzfsError,
    UnsafePathError,
)
from stargzfs.formats.decompress import gzip_backend, inflate_gzip_members
from stargzfs.formats.footer import LayerFormat, estargz_footer, parse_footer
from stargzfs.formats.layer import detect_format, read_toc
from stargzfs.index import LayerIndex
from stargzfs.reader import read_file_range
from stargzfs.source import BytesSource

GOOD_FILE = {"name": "a.txt", "type": "reg", "size": 3, "offset": 0}


def toc(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "entries": list(entries)}


def build(doc: str | dict[str, Any], toc_offset: int = 1000) -> LayerIndex:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    return LayerIndex.build(text, format="estargz", compression="gzip", toc_offset=toc_offset)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../etc/passwd", "'..'"),
        ("a/../../b", "'..'"),
        ("/../etc/shadow", "'..'"),
        ("./..", "'..'"),
        ("a\x00b", "NUL"),
    ],
)
def test_hostile_names_are_rejected_naming_the_entry(name: str, why: str) -> None:
    with pytest.raises(UnsafePathError, match=why) as info:
        build(toc({"name": name, "type": "dir"}))
    assert repr(name) in str(info.value)


def test_names_are_cleaned_like_upstream() -> None:
    """``path.Clean("/" + name)`` made relative: leading slashes go, ``/`` and ``./`` are the
    root, a ``..`` that stays inside the layer is resolved."""
    index = build(
        toc(
            {"name": "/", "type": "dir", "mode": 0o700},
            {"name": "/etc/", "type": "dir"},
            {"name": "/etc/shadow", "type": "reg", "size": 3, "offset": 0},
            {"name": "//etc//passwd", "type": "reg", "size": 3, "offset": 10},
            {"name": "/etc/link", "type": "hardlink", "linkName": "/etc/shadow"},
            {"name": "./usr/../opt/./x", "type": "fifo"},
        )
    )
    assert [p for p, _ in index.walk()] == [
        "etc",
        "etc/link",
        "etc/passwd",
        "etc/shadow",
        "opt",
        "opt/x",
    ]
    root = index.resolve("")
    assert root is not None and root.mode == 0o700 and not root.implicit
    link = index.resolve("etc/link")
    assert link is not None and link.hardlink and link.nlink == 2
    assert build(toc({"name": "./", "type": "dir", "mode": 0o711})).get(1).mode == 0o711


def test_hostile_hardlink_target_is_rejected() -> None:
    with pytest.raises(UnsafePathError):
        build(toc(GOOD_FILE, {"name": "l", "type": "hardlink", "linkName": "../../a.txt"}))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "f", "type": "reg", "size": -1, "offset": 0}, "invalid size"),
        ({"name": "f", "type": "reg", "size": 1 << 60, "offset": 0}, "invalid size"),
        ({"name": "f", "type": "reg", "size": "3", "offset": 0}, "invalid size"),
        ({"name": "f", "type": "reg", "size": 3}, "without offset"),
        ({"name": "f", "type": "reg", "size": 3, "offset": 5000}, "invalid offset"),
        ({"name": "f", "type": "reg", "size": 3, "offset": 0, "digest": "md5:x"}, "digest"),
        ({"name": "f", "type": "socket"}, "unknown type"),
        ({"name": "f", "type": "symlink"}, "linkName"),
        ({"name": "f", "type": "hardlink", "linkName": "missing"}, "not in the layer"),
        ({"name": "f", "type": "dir", "mode": -5}, "invalid mode"),
        ({"name": "f", "type": "dir", "modtime": "yesterday"}, "modtime"),
        ({"name": "f", "type": "dir", "xattrs": {"user.a": "***"}}, "base64"),
        ({"name": "f", "type": "chunk", "offset": 0}, "does not follow"),
        ({"type": "dir"}, "no name"),
    ],
)
def test_bad_entries_are_format_errors(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        build(toc(entry))


def test_chunks_that_do_not_tile_the_file_are_rejected() -> None:
    big = {"name": "f", "type": "reg", "size": 100, "offset": 0, "chunkSize": 40}
    gap = {"name": "f", "type": "chunk", "offset": 10, "chunkOffset": 50, "chunkSize": 50}
    with pytest.raises(FormatError, match="does not follow"):
        build(toc(big, gap))
    with pytest.raises(FormatError, match="cover"):
        build(toc(big))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("", "expected '{'"),
        ("[]", "expected '{'"),
        ('{"version": 1, "entries": [', "invalid TOC JSON"),
        ('{"version": 1}', "no 'entries'"),
        ('{"version": 2, "entries": []}', "version"),
        ('{"version": 1, "entries": [1]}', "not an object"),
        ('{"version": 1, "entries": []} x', "trailing"),
    ],
)
def test_malformed_toc_documents(doc: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        build(doc)


async def test_footer_damage_is_reported() -> None:
    blob = bytearray(blob_with_toc(toc(), payload=b"x" * 100))
    blob[-51 + 16] = ord("z")  # a non-hex digit in the TOC offset
    with pytest.raises(FormatError, match="hexadecimal"):
        await read_toc(BytesSource(bytes(blob)))


async def test_toc_offset_out_of_range() -> None:
    blob = b"x" * 10 + estargz_footer(10_000)
    with pytest.raises(FormatError, match="outside the blob"):
        await read_toc(BytesSource(blob))


async def test_truncated_blob() -> None:
    whole = (FIXTURES / "basic.esgz").read_bytes()
    cut = whole[:20000] + whole[-51:]  # payload and TOC gone, footer kept
    with pytest.raises(FormatError):
        await read_toc(BytesSource(cut))
    with pytest.raises(NotLazyError, match="plain gzip"):
        await read_toc(BytesSource(whole[:-10]))  # footer gone: just a gzip stream


def plain_layers() -> dict[str, bytes]:
    import zstandard

    tar = (FIXTURES / "noprio.tar").read_bytes()
    return {
        "tar": tar,
        "gzip": gzip.compress(tar, mtime=0),
        "zstd": zstandard.ZstdCompressor().compress(tar),
    }


@pytest.mark.parametrize("kind", ["tar", "gzip", "zstd"])
async def test_plain_layers_are_detected_and_not_lazily_readable(kind: str) -> None:
    blob = plain_layers()[kind]
    fmt, footer = await detect_format(BytesSource(blob))
    assert fmt is LayerFormat(kind) and footer is None and not fmt.lazy
    with pytest.raises(NotLazyError, match=f"plain {kind} layer"):
        await read_toc(BytesSource(blob))
    with pytest.raises(NotLazyError):
        await index_of_bytes(blob)


async def test_empty_and_tiny_blobs_are_plain_tar() -> None:
    for blob in (b"", b"x", bytes(40)):
        fmt, footer = await detect_format(BytesSource(blob))
        assert fmt is LayerFormat.TAR and footer is None


async def test_corrupt_toc_member() -> None:
    blob = bytearray(blob_with_toc(toc(GOOD_FILE), payload=b"x" * 10))
    blob[30] ^= 0xFF
    with pytest.raises(FormatError):
        await read_toc(BytesSource(bytes(blob)))


async def test_chunk_digest_mismatch_is_never_served() -> None:
    import gzip

    payload = gzip.compress(b"hello", mtime=0)
    entry = {"name": "h", "type": "reg", "size": 5, "offset": 0, "digest": "sha256:" + "ab" * 32}
    index = await index_of_bytes(blob_with_toc(toc(entry), payload))
    source = BytesSource(blob_with_toc(toc(entry), payload))
    file = index.resolve("h")
    assert file is not None
    with pytest.raises(DigestMismatchError, match=r"h \(chunk at offset 0\)"):
        await read_file_range(source, index, file, 0, 5)


def gzip_bomb(prefix: bytes, mib: int) -> bytes:
    """A valid gzip member of ``prefix`` + ``mib`` MiB of zeros, ~1000 times smaller than that
    (one fully flushed block of 1 MiB of zeros, repeated)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(1 << 20)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    end = c.flush()
    crc = zlib.crc32(prefix)
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    size = (len(prefix) + (mib << 20)) & 0xFFFFFFFF
    trailer = struct.pack("<II", crc, size)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + head + block * mib + end + trailer


async def peak_memory(fn: Callable[[], Any]) -> tuple[Any, int]:
    """fn()'s (awaited) result and the peak of Python allocations while it ran."""
    tracemalloc.start()
    try:
        result = fn()
        if hasattr(result, "__await__"):
            result = await result
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(params=["zlib", "zlib-ng", "isal"])
def gzip_backend_name(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Each gzip inflater in turn for chunk decompression (isal is the one installed)."""
    monkeypatch.setenv("STARGZFS_GZIP", request.param)
    gzip_backend.cache_clear()
    yield request.param
    monkeypatch.delenv("STARGZFS_GZIP")
    gzip_backend.cache_clear()


async def test_gzip_chunk_bomb_is_never_inflated(gzip_backend_name: str) -> None:
    assert gzip_backend()[0] == gzip_backend_name
    bomb = gzip_bomb(b"hello", 128)
    out, peak = await peak_memory(lambda: inflate_gzip_members(bomb, 5))
    assert out == b"hello" and peak < 4 << 20
    # Across members: the first ends early, the next is the bomb.
    out, peak = await peak_memory(lambda: inflate_gzip_members(gzip.compress(b"ab") + bomb, 7))
    assert out == b"abhello" and peak < 4 << 20
    with pytest.raises(FormatError, match="truncated"):
        inflate_gzip_members(gzip.compress(b"ab"), 3)
    # a chunk is a run of members; what follows its declared size is never inflated
    run = gzip.compress(b"x" * 5000) + gzip.compress(b"y" * 7000) + b"trailing junk"
    assert inflate_gzip_members(run, 9000) == b"x" * 5000 + b"y" * 4000
    damaged = bytearray(gzip.compress(bytes(range(256)) * 64))
    damaged[-6] ^= 0xFF  # the member's CRC-32
    with pytest.raises(FormatError, match="corrupt gzip"):
        inflate_gzip_members(bytes(damaged), 256 * 64)


async def test_bomb_behind_a_file_reads_only_its_declared_size() -> None:
    bomb = gzip_bomb(b"hello", 64)
    digest = "sha256:" + hashlib.sha256(b"hello").hexdigest()
    entry = {"name": "h", "type": "reg", "size": 5, "offset": 0, "digest": digest}
    blob = blob_with_toc(toc(entry), bomb)
    index = await index_of_bytes(blob)
    file = index.resolve("h")
    assert file is not None
    data, peak = await peak_memory(lambda: read_file_range(BytesSource(blob), index, file, 0, 5))
    assert data == b"hello" and peak < 8 << 20
    # Declared bytes that are not what the digest says: a mismatch naming file and offset.
    lie = {**entry, "digest": "sha256:" + hashlib.sha256(b"HELLO").hexdigest()}
    blob = blob_with_toc(toc(lie), bomb)
    index = await index_of_bytes(blob)
    file = index.resolve("h")
    assert file is not None
    with pytest.raises(DigestMismatchError, match=r"h \(chunk at offset 0\)"):
        await read_file_range(BytesSource(blob), index, file, 0, 5)


async def test_toc_member_bomb_is_a_format_error() -> None:
    doc = json.dumps(toc(GOOD_FILE)).encode()
    buf = io.BytesIO()
    info = tarfile.TarInfo("stargz.index.json")
    info.size = len(doc)
    buf.write(info.tobuf(tarfile.GNU_FORMAT) + doc + bytes(-len(doc) % 512))
    # After the TOC file: 64 MiB of zeros (valid tar blocks, but no TOC member is like that).
    blob = gzip_bomb(buf.getvalue(), 64) + estargz_footer(0)
    with pytest.raises(FormatError, match="not a TOC member"):
        await read_toc(BytesSource(blob))

    async def load() -> None:
        with contextlib.suppress(FormatError):
            await index_of_bytes(blob)

    _, peak = await peak_memory(load)
    assert peak < 16 << 20


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(tail=st.binary(min_size=0, max_size=120), size=st.integers(0, 1 << 40))
def test_fuzz_footers(tail: bytes, size: int) -> None:
    with contextlib.suppress(FormatError):
        parse_footer(tail, max(size, len(tail)))


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(offset=st.integers(0, 1 << 64 - 1), xlen=st.integers(0, 40), sub=st.binary(max_size=4))
def test_fuzz_footer_fields(offset: int, xlen: int, sub: bytes) -> None:
    footer = bytearray(estargz_footer(offset % (1 << 63)))
    struct.pack_into("<H", footer, 10, xlen)
    footer[12 : 12 + len(sub)] = sub
    with contextlib.suppress(FormatError):
        parse_footer(bytes(footer), 1 << 40)


def footer_with_offset_text(kind: str, text: bytes) -> bytes:
    """A footer whose 16 offset characters are ``text``, verbatim."""
    if kind == "estargz":
        footer = bytearray(estargz_footer(0))
        footer[16:32] = text
    else:
        footer = bytearray(legacy_footer(0))
        footer[12:28] = text
    return bytes(footer)


@pytest.mark.parametrize("kind", ["estargz", "legacy"])
@pytest.mark.parametrize(
    "text",
    [
        b"0x00000000000010",  # Python's int(s, 16) takes a 0x prefix, Go's ParseInt does not
        b"0000_0000_0000_1",  # nor digit separators
        b" 00000000000010 ",  # nor blanks
        b"000000000000010\n",
        b"00000000000001g0",
        b"ffffffffffffffff",  # beyond int64: Go's ParseInt fails too
    ],
)
def test_footer_offset_is_parsed_like_go(kind: str, text: bytes) -> None:
    with pytest.raises(FormatError, match=r"not hexadecimal|out of range"):
        parse_footer(footer_with_offset_text(kind, text), 1 << 40)


@pytest.mark.parametrize("kind", ["estargz", "legacy"])
def test_footer_offset_sign_and_case_like_go(kind: str) -> None:
    for text, value in ((b"+00000000000001f", 31), (b"00000000000001Ff", 511)):
        footer = parse_footer(footer_with_offset_text(kind, text), 1 << 40)
        assert footer is not None and footer.toc_offset == value
    with pytest.raises(FormatError, match="outside the blob"):
        parse_footer(footer_with_offset_text(kind, b"-000000000000001"), 1 << 40)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    offset=st.integers(0, (1 << 64) - 1),
    flips=st.lists(st.tuples(st.integers(0, 46), st.integers(1, 255)), max_size=4),
    cut=st.integers(0, 47),
    size=st.integers(0, 1 << 40),
)
def test_fuzz_legacy_footers(
    offset: int, flips: list[tuple[int, int]], cut: int, size: int
) -> None:
    footer = bytearray(legacy_footer(offset))
    for at, bits in flips:
        footer[at] ^= bits
    tail = bytes(footer[cut:])
    size = max(size, len(tail))
    try:
        found = parse_footer(tail, size)
    except FormatError:
        return
    if found is not None:
        assert 0 <= found.toc_offset < size - found.footer_size


async def test_legacy_blob_reads_and_its_damage_is_reported() -> None:
    import gzip

    payload = gzip.compress(b"legacy!", mtime=0)
    digest = "sha256:" + hashlib.sha256(b"legacy!").hexdigest()
    entry = {"name": "l.txt", "type": "reg", "size": 7, "offset": 0, "digest": digest}
    blob = legacy_blob_with_toc(toc(entry), payload)
    raw = await read_toc(BytesSource(blob))
    assert raw.footer.dialect == "stargz-legacy" and raw.footer.footer_size == 47
    index = await index_of_bytes(blob)
    file = index.resolve("l.txt")
    assert file is not None
    assert await read_file_range(BytesSource(blob), index, file, 0, 7) == b"legacy!"
    bad = bytearray(blob)
    bad[-47 + 12] = ord("x")
    with pytest.raises(FormatError, match="hexadecimal"):
        await read_toc(BytesSource(bytes(bad)))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
entry_strategy = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["a", "a/b", "./c", "../x", "/y", "d/", "", "a\x00", "a/b/c"])
        | st.text(max_size=10),
        "type": st.sampled_from(
            ["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk", "other"]
        ),
    },
    optional={
        "size": json_values | st.integers(0, 5000),
        "offset": json_values | st.integers(0, 2000),
        "chunkOffset": st.integers(0, 5000) | json_values,
        "chunkSize": st.integers(0, 5000) | json_values,
        "linkName": st.sampled_from(["a", "a/b", "../a", "", "zz"]) | json_values,
        "mode": json_values,
        "uid": json_values,
        "modtime": st.sampled_from(["2023-11-14T22:13:20Z", "2023-13-40T99:99:99Z"]) | json_values,
        "digest": st.sampled_from(["sha256:" + "0" * 64, "sha256:zz"]) | json_values,
        "xattrs": st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=2)
        | json_values,
        "devMajor": json_values,
        "innerOffset": json_values,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(entry_strategy, max_size=8), version=st.sampled_from([1, 1, 1, 2, "1"]))
def test_fuzz_tocs_raise_only_our_errors(entries: list[dict[str, Any]], version: Any) -> None:
    doc = json.dumps({"version": version, "entries": entries})
    try:
        index = build(doc, toc_offset=3000)
    except StargzfsError:
        return
    for path, entry in index.walk():
        assert path
        index.chunks(entry)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_fuzz_toc_text(data: bytes) -> None:
    with contextlib.suppress(StargzfsError):
        build(data.decode("latin-1"))
