"""Helpers for layer-format tests: fixture paths, a counting source, hand-made blobs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
from dataclasses import dataclass
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


def legacy_footer(toc_offset: int) -> bytes:
    """The 47-byte legacy stargz footer (google/crfs): an empty gzip member whose whole Extra
    field (XLEN=22, no RFC 1952 subfield header) is ``%016x`` of the TOC offset + ``STARGZ``."""
    extra = b"%016xSTARGZ" % toc_offset
    header = b"\x1f\x8b\x08\x04" + b"\x00\x00\x00\x00" + b"\x00\xff" + struct.pack("<H", 22)
    # An empty deflate stream (final stored block of length 0) + CRC32 0 + ISIZE 0.
    footer = header + extra + b"\x01\x00\x00\xff\xff" + b"\x00" * 8
    assert len(footer) == 47
    return footer


def legacy_blob_with_toc(toc: bytes | str | dict[str, Any], payload: bytes = b"") -> bytes:
    """A legacy stargz blob: payload, TOC member, 47-byte footer."""
    if isinstance(toc, dict):
        toc = json.dumps(toc)
    return payload + toc_member(toc) + legacy_footer(len(payload))


def as_legacy(estargz_blob: bytes) -> bytes:
    """The same blob with its 51-byte eStargz footer replaced by the legacy 47-byte one."""
    toc_offset = int(estargz_blob[-51 + 16 : -51 + 32], 16)
    return estargz_blob[:-51] + legacy_footer(toc_offset)


async def index_of(source: ByteSource, annotations: dict[str, str] | None = None) -> LayerIndex:
    return await load_index(source, annotations)


async def index_of_bytes(blob: bytes) -> LayerIndex:
    return await index_of(BytesSource(blob))


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _skippable(data: bytes) -> bytes:
    return b"\x50\x2a\x4d\x18" + struct.pack("<I", len(data)) + data


@dataclass
class StorageBlob:
    """A containers/storage (podman) zstd:chunked blob built by hand, see storage_zstd_blob."""

    data: bytes
    toc: dict[str, Any]
    toc_json: bytes
    annotations: dict[str, str]
    contents: dict[str, bytes]  # regular file name -> content
    toc_offset: int
    toc_size: int


def storage_zstd_blob(
    files: list[tuple[str, list[bytes | int]]],
    *,
    tarsplit_size: int = 0,
    holes_have_data: bool = False,
) -> StorageBlob:
    """A zstd:chunked blob in containers/storage's layout (``pkg/chunked/compressor``).

    Each file is ``(name, pieces)``: a piece is bytes (a data chunk, its own zstd frame) or an
    int (a hole of that many zeros: ``chunkType: "zeros"``, with no bytes in the blob unless
    ``holes_have_data``). Tar headers sit in frames of their own before each payload. Then: the
    TOC (a zstd frame inside a skippable frame), the tar-split data (a skippable frame of
    ``tarsplit_size`` incompressible bytes) and the 64-byte footer in a skippable frame
    (TOC offset, compressed and uncompressed size, type 1, tar-split offset and sizes,
    ``GNUlInUx``). The footer and the manifest-position annotation point past the TOC's
    skippable-frame header, at the compressed TOC itself, as upstream's do.
    """
    import zstandard

    cctx = zstandard.ZstdCompressor(level=3)
    out = bytearray()
    entries: list[dict[str, Any]] = [
        {"type": "dir", "name": "data/", "mode": 0o755, "modtime": "2024-05-01T10:20:30Z"}
    ]
    contents: dict[str, bytes] = {}
    pending_padding = b""
    for name, pieces in files:
        size = sum(p if isinstance(p, int) else len(p) for p in pieces)
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 1714558830
        out += cctx.compress(pending_padding + info.tobuf(tarfile.PAX_FORMAT))
        start = len(out)
        chunks: list[dict[str, Any]] = []
        content = b""
        for piece in pieces:
            data = bytes(piece) if isinstance(piece, int) else piece
            chunk: dict[str, Any] = {
                "chunkOffset": len(content),
                "chunkSize": len(data),
                "chunkDigest": _sha(data),
            }
            if isinstance(piece, int):
                chunk["chunkType"] = "zeros"
            if not isinstance(piece, int) or holes_have_data:
                chunk["offset"] = len(out)
                out += cctx.compress(data)
            chunks.append(chunk)
            content += data
        contents[name] = content
        pending_padding = bytes(-size % 512)
        entry: dict[str, Any] = {
            "type": "reg",
            "name": name,
            "mode": 0o644,
            "size": size,
            "modtime": "2024-05-01T10:20:30.123456789Z",
            "digest": _sha(content),
            "offset": start,
            "endOffset": len(out),
        }
        if len(chunks) > 1 or any("chunkType" in c for c in chunks):
            entry.pop("offset")
            first, rest = chunks[0], chunks[1:]
            entry.update({k: v for k, v in first.items() if k != "chunkOffset"})
            entries.append(entry)
            for c in rest:
                entries.append({"type": "chunk", "name": name, **c})
        else:
            entries.append(entry)
    entries.append({"type": "symlink", "name": "data/link", "linkName": files[0][0]})
    out += cctx.compress(pending_padding + bytes(1024))  # end of archive
    toc = {"version": 1, "entries": entries, "tarSplitDigest": _sha(b"")}
    toc_json = json.dumps(toc).encode()
    packed = cctx.compress(toc_json)
    toc_offset = len(out) + 8
    out += _skippable(packed)
    tarsplit = hashlib.shake_256(b"tar-split").digest(tarsplit_size)
    tarsplit_offset = len(out) + 8
    out += _skippable(tarsplit)
    footer = struct.pack(
        "<QQQQQQQ",
        toc_offset,
        len(packed),
        len(toc_json),
        1,
        tarsplit_offset,
        len(tarsplit),
        len(tarsplit) * 2,
    )
    out += _skippable(footer + b"GNUlInUx")
    annotations = {
        "io.github.containers.zstd-chunked.manifest-checksum": _sha(packed),
        "io.github.containers.zstd-chunked.manifest-position": (
            f"{toc_offset}:{len(packed)}:{len(toc_json)}:1"
        ),
        "io.github.containers.zstd-chunked.tarsplit-position": (
            f"{tarsplit_offset}:{len(tarsplit)}:{len(tarsplit) * 2}"
        ),
    }
    return StorageBlob(bytes(out), toc, toc_json, annotations, contents, toc_offset, len(packed))
