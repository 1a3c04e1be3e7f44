"""Plain gzip / zstd / tar layers, which have no TOC and cannot be read per chunk.

To still mount them, the layer is fetched once, verified against its digest, decompressed
into an uncompressed tar in the cache directory, and indexed from its tar headers: the index
then points into that local tar (compression "none"), so the rest of the stack reads it like
any other layer. Both the tar and its index are reused by later mounts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from typing import Any

import trio

from ..errors import DigestMismatchError, FormatError, UnsafePathError
from ..formats.footer import LayerFormat, detect_plain_format
from ..formats.toc import clean_name
from ..source import ByteSource, FileSource
from .layer_index import LayerIndex

__all__ = ["open_plain_layer", "tar_toc"]

_PIECE = 8 << 20  # bytes per range read while downloading

_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


async def open_plain_layer(
    source: ByteSource, digest: str, cache_dir: str | os.PathLike[str], what: str = "layer"
) -> tuple[FileSource, LayerIndex]:
    """The layer as a local uncompressed tar and its index (fetched and built once)."""
    folder = os.path.join(os.fspath(cache_dir), "tars")
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, digest.replace(":", "-"))
    tar_path, index_path = stem + ".tar", stem + ".sqlite"
    if not os.path.exists(tar_path):
        await _download(source, digest, tar_path, what)
    tar_source = FileSource(tar_path)
    if os.path.exists(index_path):
        try:
            return tar_source, LayerIndex.open(index_path)
        except FormatError:
            os.unlink(index_path)

    def build() -> LayerIndex:
        return LayerIndex.build(
            tar_toc(tar_path),
            format=LayerFormat.TAR.value,
            compression="none",
            toc_offset=tar_source.size,
            path=index_path,
        )

    return tar_source, await trio.to_thread.run_sync(build)


async def _download(source: ByteSource, digest: str, tar_path: str, what: str) -> None:
    """Stream the blob, verify its digest, decompress it to ``tar_path`` (atomically)."""
    head = await source.read_at(0, min(source.size, 8))
    fmt = detect_plain_format(head)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(tar_path), prefix=".tmp-")
    hasher = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            inflate = _Inflater(fmt)
            for offset in range(0, source.size, _PIECE):
                piece = await source.read_at(offset, min(_PIECE, source.size - offset))
                data = await trio.to_thread.run_sync(inflate.feed, piece, hasher)
                await trio.to_thread.run_sync(out.write, data)
            await trio.to_thread.run_sync(out.write, inflate.finish())
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest:
            raise DigestMismatchError(what, digest, actual)
        os.replace(tmp, tar_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _Inflater:
    """Streaming decompression of a (multi-member) gzip, zstd or uncompressed layer."""

    def __init__(self, fmt: LayerFormat) -> None:
        self.fmt = fmt
        self._gz: Any = zlib.decompressobj(wbits=31) if fmt is LayerFormat.GZIP else None
        self._zstd: Any = None
        if fmt is LayerFormat.ZSTD:
            import zstandard

            self._zstd = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)

    def feed(self, data: bytes, hasher: Any) -> bytes:
        hasher.update(data)
        try:
            if self._gz is not None:
                out = []
                while data:
                    out.append(self._gz.decompress(data))
                    if not self._gz.eof:
                        break
                    data = self._gz.unused_data  # next gzip member
                    self._gz = zlib.decompressobj(wbits=31)
                return b"".join(out)
            if self._zstd is not None:
                return bytes(self._zstd.decompress(data))
        except zlib.error as e:
            raise FormatError(f"corrupt gzip layer: {e}") from None
        except Exception as e:  # zstandard.ZstdError
            raise FormatError(f"corrupt zstd layer: {e}") from None
        return data

    def finish(self) -> bytes:
        return b""


def tar_toc(tar_path: str) -> bytes:
    """A TOC document (eStargz schema, no digests) describing a local uncompressed tar."""
    return json.dumps({"version": 1, "entries": list(_entries(tar_path))}).encode()


def _entries(tar_path: str) -> Iterator[dict[str, Any]]:
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for member in tar:
                kind = _TYPES.get(member.type)
                if kind is None:
                    continue  # sparse and other exotic members are not part of a rootfs view
                name = clean_name(member.name)
                entry: dict[str, Any] = {
                    "name": name + ("/" if kind == "dir" else ""),
                    "type": kind,
                    "mode": member.mode & 0o7777,
                    "uid": member.uid,
                    "gid": member.gid,
                }
                if member.uname:
                    entry["userName"] = member.uname
                if member.gname:
                    entry["groupName"] = member.gname
                if member.mtime:
                    entry["modtime"] = _rfc3339(int(member.mtime))
                if kind == "reg":
                    entry["size"] = member.size
                    if member.size:
                        entry["offset"] = member.offset_data
                elif kind in ("symlink", "hardlink"):
                    entry["linkName"] = member.linkname
                elif kind in ("char", "block"):
                    entry["devMajor"], entry["devMinor"] = member.devmajor, member.devminor
                xattrs = {
                    k[len("SCHILY.xattr.") :]: base64.b64encode(
                        v.encode("utf-8", "surrogateescape")
                    ).decode()
                    for k, v in member.pax_headers.items()
                    if k.startswith("SCHILY.xattr.")
                }
                if xattrs:
                    entry["xattrs"] = xattrs
                yield entry
    except UnsafePathError:
        raise
    except (tarfile.TarError, OSError) as e:
        raise FormatError(f"{tar_path}: not a valid tar: {e}") from None


def _rfc3339(seconds: int) -> str:
    import datetime

    t = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")
