"""Streaming decompression of whole layer blobs (multi-member gzip, multi-frame zstd, or
plain), optionally hashing the output (the layer's diff_id) as it goes: what a pull, the
layout writers and the converter read whole layers through. (Per-chunk inflation for the
mount is :mod:`stargzfs.formats.decompress`.)"""

from __future__ import annotations

import gzip
import hashlib
import io
import queue
import threading
from typing import IO, Any, Literal

from ..errors import FormatError
from .decompress import gzip_backend

__all__ = ["Decompressor", "ThreadedDecompressor", "gzip_backend", "open_decompressed"]

_RAW_READ = 128 * 1024


def _with_readinto(raw: Any) -> Any:
    """``raw`` if it has ``readinto`` (what the C gzip readers call), else an adapter."""
    if hasattr(raw, "readinto"):
        return raw

    class _ReadInto:
        def read(self, n: int = -1) -> bytes:
            data: bytes = raw.read(n)
            return data

        def readinto(self, b: Any) -> int:
            data = raw.read(len(b))
            b[: len(data)] = data
            return len(data)

    return _ReadInto()


class Decompressor(io.RawIOBase):
    """A read-only stream of the decompressed bytes of ``raw`` (multi-member gzip, multi-frame
    zstd, or plain), optionally hashing the decompressed output (the layer's diff_id)."""

    def __init__(
        self,
        raw: Any,
        compression: Literal["none", "gzip", "zstd"],
        *,
        hash_output: bool = False,
    ) -> None:
        super().__init__()
        self._raw = raw
        self._compression = compression
        self._buf = b""
        self._off = 0
        self._eof = False
        self.hasher = hashlib.sha256() if hash_output else None
        self._z: Any = None
        self._zstd_reader: Any = None
        self._gzip_reader: Any = None
        if compression == "zstd":
            import zstandard

            self._zstd_reader = zstandard.ZstdDecompressor().stream_reader(
                raw, read_size=1 << 20, read_across_frames=True, closefd=False
            )
        elif compression == "gzip":
            self._gz = gzip_backend()[1]
            if hasattr(self._gz, "_GzipReader"):
                # ISA-L's / zlib-ng's gzip reader in C: members are chained without copying
                # the rest of the input at every member's end (eStargz has one per chunk)
                self._gzip_reader = self._gz._GzipReader(_with_readinto(raw), _RAW_READ)
            else:
                self._z = self._gz.decompressobj(31)
        self._member_started = False
        self._members_done = False  # (zero padding may follow a member, not replace them all)

    def readable(self) -> bool:
        return True

    def _fill(self, want: int) -> None:
        rest = self._buf[self._off :]
        self._off = 0
        out: list[bytes] = [rest] if rest else []
        have = len(rest)
        while have < want and not self._eof:
            if self._compression == "none":
                data = self._raw.read(max(want - have, 1 << 20))
                if not data:
                    self._eof = True
                    break
            elif self._compression == "zstd":
                data = self._zstd_reader.read(max(want - have, 1 << 20))
                if not data:
                    self._eof = True
                    break
            elif self._gzip_reader is not None:
                data = self._read_gzip(max(want - have, 1 << 20))
                if not data:
                    self._eof = True
                    break
            else:
                data = self._gunzip_some(want - have)
                if data is None:
                    self._eof = True
                    break
            if data:
                if self.hasher is not None:
                    self.hasher.update(data)
                out.append(data)
                have += len(data)
        self._buf = b"".join(out)

    def _read_gzip(self, n: int) -> bytes:
        try:
            return bytes(self._gzip_reader.read(n))
        except EOFError:
            raise FormatError("gzip stream is truncated") from None
        except gzip.BadGzipFile as e:
            raise FormatError(f"corrupt gzip data: {e}") from None

    def _gunzip_some(self, want: int) -> bytes | None:
        """Some decompressed bytes (may be b""), or None at the end of the stream.

        Zero bytes where a next member would start are padding, as gzip(1) and the C readers
        take them (tape-style blocking): the rest must then be zeros too."""
        z = self._z
        if z.unconsumed_tail:
            data = z.decompress(z.unconsumed_tail, max(want, 1 << 20))
        else:
            # small reads: a member ending mid-input copies the rest as ``unused_data``
            raw = self._raw.read(_RAW_READ)
            if not raw:
                if self._member_started and not z.eof:
                    raise FormatError("gzip stream is truncated")
                return None
            if not self._member_started and raw[0] == 0 and self._members_done:
                self._skip_padding(raw)
                return None
            self._member_started = True
            data = z.decompress(raw, max(want, 1 << 20))
        while z.eof:
            self._members_done = True
            rest = z.unused_data
            self._z = z = self._gz.decompressobj(31)
            self._member_started = bool(rest)
            if not rest:
                break
            if rest[0] == 0:
                self._skip_padding(rest)
                self._member_started = False
                break
            more = z.decompress(rest, 1 << 20)
            data += more
        return bytes(data)

    def _skip_padding(self, first: bytes) -> None:
        """Consume the zero padding after the last member (to the end of the input)."""
        data = first
        while data:
            if data.count(0) != len(data):
                raise FormatError("corrupt gzip data: bytes after the zero padding")
            data = self._raw.read(_RAW_READ)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            chunks: list[bytes] = []
            while True:
                chunk = self.read(1 << 20)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
        if len(self._buf) - self._off < n:
            try:
                self._fill(n)
            except Exception as e:
                if isinstance(e, gzip_backend()[2]):
                    raise FormatError(f"corrupt gzip data: {e}") from None
                if type(e).__module__.startswith("zstandard") or "zstd" in type(e).__name__:
                    raise FormatError(f"corrupt zstd data: {e}") from None
                raise
        off = self._off
        if off == 0 and n >= len(self._buf):
            data, self._buf = self._buf, b""
            return data
        data = self._buf[off : off + n]
        self._off = off + len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read to the end (so the hash covers everything, trailing padding included)."""
        while self.read(1 << 20):
            pass


class ThreadedDecompressor(io.RawIOBase):
    """A :class:`Decompressor` run ahead in its own thread (decompression and hashing release
    the GIL, so they overlap the consumer's tar parsing and file writes on another core)."""

    _CHUNK = 1 << 20

    def __init__(self, inner: Decompressor, depth: int = 32) -> None:
        super().__init__()
        self.inner = inner
        self.hasher = inner.hasher
        self._q: queue.Queue[bytes | BaseException | None] = queue.Queue(depth)
        self._stop = threading.Event()
        self._buf = b""
        self._off = 0
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="decompress", daemon=True)
        self._thread.start()

    def _put(self, item: bytes | BaseException | None) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while True:
                data = self.inner.read(self._CHUNK)
                if not data:
                    break
                if not self._put(data):
                    return
            self._put(None)
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            chunks: list[bytes] = []
            while chunk := self.read(self._CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        if self._off >= len(self._buf):
            if self._eof:
                return b""
            item = self._q.get()
            if item is None:
                self._eof = True
                return b""
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            self._buf, self._off = item, 0
        off = self._off
        if off == 0 and n >= len(self._buf):
            self._off = len(self._buf)
            return self._buf
        data = self._buf[off : off + n]
        self._off = off + len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(self._CHUNK):
            pass

    def close(self) -> None:
        self._stop.set()
        super().close()


def open_decompressed(
    raw: IO[bytes] | Any,
    compression: Literal["none", "gzip", "zstd"],
    *,
    hash_output: bool,
    threaded: bool = False,
) -> Decompressor | ThreadedDecompressor:
    """A decompressed stream of ``raw``; ``threaded``: decompressed ahead in a thread (the
    decompressors and sha256 release the GIL, so that overlaps the consumer's work)."""
    inner = Decompressor(raw, compression, hash_output=hash_output)
    return ThreadedDecompressor(inner) if threaded else inner
