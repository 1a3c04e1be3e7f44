"""Byte sources: bounds checks and the tail cache that makes small layers one request."""

from __future__ import annotations

import pytest
from layer_helpers import FIXTURES, CountingSource, index_of

from stargzfs.errors import FormatError
from stargzfs.reader import iter_file
from stargzfs.source import BytesSource, FileSource, TailCachedSource


async def test_bounds_are_checked() -> None:
    src = BytesSource(b"0123456789")
    assert await src.read_at(2, 3) == b"234"
    with pytest.raises(FormatError, match="outside"):
        await src.read_at(8, 5)
    tail = TailCachedSource(src)
    await tail.read_at(5, 5)
    with pytest.raises(FormatError, match="outside"):
        await tail.read_at(8, 5)


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures is absent")
async def test_small_layer_costs_one_read_in_all() -> None:
    counting = CountingSource(FileSource(FIXTURES / "basic.esgz"))
    source = TailCachedSource(counting)
    index = await index_of(source)
    for _path, entry in index.walk():
        if entry.kind == "reg":
            async for _ in iter_file(source, index, entry):
                pass
    assert len(counting.reads) == 1  # the TOC's tail read covered the whole blob


async def test_a_read_straddling_the_kept_tail_fetches_only_what_lies_before_it() -> None:
    data = bytes(range(256)) * 40
    counting = CountingSource(BytesSource(data))
    source = TailCachedSource(counting)
    await source.read_at(len(data) - 1000, 1000)  # the footer/TOC tail read
    assert await source.read_at(len(data) - 1500, 800) == data[-1500:-700]
    assert counting.reads[-1] == (len(data) - 1500, 500)
    assert await source.read_at(len(data) - 900, 900) == data[-900:]
    assert len(counting.reads) == 2
