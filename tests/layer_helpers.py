"""Helpers for layer-format tests: fixture paths, a counting source, hand-made blobs."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from stargzfs.formats.footer import estargz_footer
from stargzfs.index import LayerIndex, load_index
from stargzfs.source import ByteSource, BytesSource

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
CASES = {
    "basic": "basic.esgz",
    "chunked": "chunked.esgz",
    "prioritized": "prioritized.esgz",
    "noprio": "noprio.esgz",
    "implicit-dirs": "implicit-dirs.esgz",
    "whiteout-upper": "whiteout-upper.esgz",
    "zstdchunked": "zstdchunked.zstdchunked",
}


def expected(case: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{case}.json").read_text())
    return data


class CountingSource:
    """Wraps a source and records every read (offset, length)."""

    def __init__(self, inner: ByteSource) -> None:
        self.inner = inner
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return self.inner.size

    async def read_at(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return await self.inner.read_at(offset, length)


def toc_member(toc: bytes | str) -> bytes:
    """A gzip member holding a tar with one file stargz.index.json."""
    data = toc.encode() if isinstance(toc, str) else toc
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


def blob_with_toc(toc: bytes | str | dict[str, Any], payload: bytes = b"") -> bytes:
    """An eStargz-shaped blob: payload, TOC member, footer."""
    if isinstance(toc, dict):
        toc = json.dumps(toc)
    return payload + toc_member(toc) + estargz_footer(len(payload))


async def index_of(source: ByteSource, annotations: dict[str, str] | None = None) -> LayerIndex:
    return await load_index(source, annotations)


async def index_of_bytes(blob: bytes) -> LayerIndex:
    return await index_of(BytesSource(blob))
