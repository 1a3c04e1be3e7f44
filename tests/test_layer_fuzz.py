"""Whole blobs with flipped bytes or cut short, through the full read path (footer, TOC,
index, every file read chunk by chunk): only the library's own exceptions may come out."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layer_helpers import CASES, FIXTURES, as_legacy, expected

from stargzfs.errors import StargzfsError
from stargzfs.formats.layer import read_toc
from stargzfs.index import load_index
from stargzfs.reader import iter_file, read_file_range
from stargzfs.source import BytesSource

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures is absent")

BLOBS = {
    "basic": (FIXTURES / CASES["basic"]).read_bytes() if FIXTURES.is_dir() else b"",
    "zstdchunked": (FIXTURES / CASES["zstdchunked"]).read_bytes() if FIXTURES.is_dir() else b"",
    "legacy": as_legacy((FIXTURES / CASES["chunked"]).read_bytes()) if FIXTURES.is_dir() else b"",
}
ANNOTATIONS = {
    "basic": expected("basic")["annotations"] if FIXTURES.is_dir() else {},
    "zstdchunked": expected("zstdchunked")["annotations"] if FIXTURES.is_dir() else {},
    "legacy": expected("chunked")["annotations"] if FIXTURES.is_dir() else {},
}


async def read_everything(blob: bytes, annotations: dict[str, str]) -> int:
    """What a mount and ``get`` do with a layer; returns the bytes of content read."""
    source = BytesSource(blob)
    await read_toc(source, annotations)
    index = await load_index(source, annotations)
    total = 0
    for _path, entry in index.walk():
        if entry.kind != "reg":
            continue
        async for piece in iter_file(source, index, entry):
            total += len(piece)
        if entry.size > 2:
            mid = entry.size // 2
            total += len(await read_file_range(source, index, entry, mid - 1, 3))
    return total


@st.composite
def damaged(draw: st.DrawFn, name: str) -> tuple[bytes, dict[str, str]]:
    blob = bytearray(BLOBS[name])
    size = len(blob)
    # Aim half of the damage at the tail (footer and TOC), where parsing happens.
    tail = min(size, 12_000)
    position = st.integers(0, size - 1) | st.integers(size - tail, size - 1)
    for at, bits in draw(st.lists(st.tuples(position, st.integers(1, 255)), max_size=6)):
        blob[at] ^= bits
    cut = draw(st.sampled_from(["none", "none", "end", "start", "middle"]))
    if cut == "end":
        blob = blob[: draw(st.integers(0, size - 1))]
    elif cut == "start":
        blob = blob[draw(st.integers(1, size - 1)) :]
    elif cut == "middle":
        # Keep the footer: the offsets it and the TOC hold now point at the wrong bytes.
        a = draw(st.integers(0, size - 60))
        b = draw(st.integers(a + 1, size - 51))
        blob = blob[:a] + blob[b:]
    # Without the annotations a damaged TOC may still parse: more of the path is exercised.
    annotations = ANNOTATIONS[name] if draw(st.booleans()) else {}
    return bytes(blob), annotations


async def check(blob: bytes, annotations: dict[str, str]) -> None:
    # Anything but our own errors propagates and fails the test.
    with contextlib.suppress(StargzfsError):
        await read_everything(blob, annotations)


@pytest.mark.parametrize("name", sorted(BLOBS))
async def test_undamaged_blobs_read_whole(name: str) -> None:
    assert await read_everything(BLOBS[name], ANNOTATIONS[name]) > 0


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(case=damaged("basic"))
async def test_fuzz_estargz_blob(case: tuple[bytes, dict[str, Any]]) -> None:
    await check(*case)


@FUZZ
@given(case=damaged("zstdchunked"))
async def test_fuzz_zstd_chunked_blob(case: tuple[bytes, dict[str, Any]]) -> None:
    await check(*case)


@FUZZ
@given(case=damaged("legacy"))
async def test_fuzz_legacy_stargz_blob(case: tuple[bytes, dict[str, Any]]) -> None:
    await check(*case)
