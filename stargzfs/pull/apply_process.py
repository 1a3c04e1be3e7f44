"""Applying a rootfs's layers in a child process, so the whole apply (decompression, diff_id
hashing, tar parsing, file writes) runs beside the download instead of sharing its GIL.

One child serves one pull: it is started before the image is even resolved (its imports
overlap the registry round trips), then gets one message per layer, bottom first, each with
an fd of the layer's blob (passed over a ``SOCK_SEQPACKET`` socket with ``SCM_RIGHTS``: the
file may still be downloading, and may be renamed from ``.partial`` to its final name while
the child reads it). The child follows the file as it grows up to the declared size,
decompresses it in a thread (zlib/ISA-L and sha256 release the GIL) while its main thread
untars onto the staging directory with :class:`~stargzfs.pull.extract.LayerApplier`, and
answers with the layer's diff_id. Errors come back as the :mod:`stargzfs.errors` class name
and message, log records as they happen. The parent kills the child when the pull fails or
is interrupted; the child also stops when the parent goes away.

Protocol (JSON, one datagram each): parent -> child ``{"op": "root", "path"}``,
``{"op": "layer", "what", "compression", "size"}`` + one fd, ``{"op": "finish"}``;
child -> parent ``{"log": LEVEL, "msg"}``, ``{"diff_id"}``, ``{"stats": {...}}``,
``{"error": CLASS, "msg"}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from .. import errors

__all__ = ["LayerApplyProcess"]

log = logging.getLogger(__name__)

_MAX_MESSAGE = 1 << 20
# Texts (log lines, error messages) are cut to this many characters: a datagram must fit the
# socket's send buffer, and a hostile layer's entry name may be megabytes long.
_MAX_TEXT = 16_000
# Errors that cross the process boundary as themselves (their constructor takes a message).
_ERRORS: dict[str, type[errors.StargzfsError]] = {
    cls.__name__: cls
    for cls in (
        errors.StargzfsError,
        errors.UsageError,
        errors.NotFoundError,
        errors.IntegrityError,
        errors.FormatError,
        errors.UnsafePathError,
        errors.UnsupportedError,
    )
}


class LayerApplyProcess:
    """The parent's handle on the apply child (blocking calls: use it from a worker thread)."""

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "stargzfs.pull.apply_process",
                    str(child.fileno()),
                    str(os.getpid()),
                ],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                # its own process group: a Ctrl-C while it starts (before it can ignore
                # SIGINT) must not print a traceback; we decide, and kill it
                process_group=0,
                # the package's parent directory, so ``-m stargzfs`` finds this very copy
                cwd=str(Path(__file__).resolve().parents[2]),
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._sock = parent
        self._killed = False

    def _send(self, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        data = json.dumps(message).encode()
        try:
            if fds:
                socket.send_fds(self._sock, [data], list(fds))
            else:
                self._sock.send(data)
        except OSError:
            self._raise_gone()

    def _receive(self, flags: int = 0) -> dict[str, Any]:
        """The next reply that is not a log record (those are logged here)."""
        while True:
            try:
                data = self._sock.recv(_MAX_MESSAGE, flags)
            except OSError:
                data = b""
            if not data:
                self._raise_gone(read_queued=False)
            message: dict[str, Any] = json.loads(data)
            if "log" in message:
                log.log(logging.getLevelName(message["log"]), "%s", message["msg"])
                continue
            if "error" in message:
                cls = _ERRORS.get(message["error"])
                if cls is None:
                    raise RuntimeError(f"layer extraction failed: {message['msg']}")
                raise cls(message["msg"])
            return message

    def _raise_gone(self, read_queued: bool = True) -> NoReturn:
        if read_queued and not self._killed:
            # it may have said why before it went (a send then fails with EPIPE)
            self._receive(socket.MSG_DONTWAIT)
        rc = self._proc.wait()
        if self._killed:
            raise errors.StargzfsError("pull aborted")
        raise RuntimeError(f"the layer extraction process exited unexpectedly (status {rc})")

    def set_root(self, root: Path) -> None:
        self._send({"op": "root", "path": str(root)})

    def apply(self, fd: int, size: int, compression: str, what: str) -> str:
        """Apply the layer whose blob ``fd`` reads (``size`` bytes, maybe still arriving);
        returns the sha256 of its uncompressed bytes. ``fd`` stays the caller's."""
        self._send({"op": "layer", "what": what, "compression": compression, "size": size}, (fd,))
        return str(self._receive()["diff_id"])

    def finish(self) -> dict[str, int]:
        """Apply deferred directory metadata; returns the apply's counters."""
        self._send({"op": "finish"})
        stats: dict[str, int] = self._receive()["stats"]
        return stats

    def kill(self) -> None:
        """Stop the child now (the pull failed): a blocked :meth:`apply` raises."""
        self._killed = True
        with contextlib.suppress(OSError):
            self._proc.kill()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        try:
            self._proc.wait(5.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# --------------------------------------------------------------------------- the child


class _Follow:
    """Reads a file that may still be being written, up to ``size`` bytes, waiting at its
    end; gives up when the parent goes away (it kills us when the download fails)."""

    def __init__(self, fd: int, size: int, parent: int) -> None:
        self.fd, self.size, self.pos, self.parent = fd, size, 0, parent

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.pos
        if left <= 0:
            return b""
        want = left if n < 0 else min(n, left)
        delay = 0.001
        while True:
            data = os.read(self.fd, want)
            if data:
                self.pos += len(data)
                return data
            if os.getppid() != self.parent:
                raise SystemExit(4)
            time.sleep(delay)
            delay = min(delay * 2, 0.01)


class _Relay(logging.Handler):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError):
            msg = _cut(record.getMessage())
            self.sock.send(json.dumps({"log": record.levelname, "msg": msg}).encode())


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "... (cut)"


def _child(sock: socket.socket, parent: int) -> int:
    """``parent``: the pid that started us, from its argv (a getppid() here could already be
    init's: a parent killed while we imported had still queued its messages)."""
    from ..formats.layer_stream import Decompressor, ThreadedDecompressor
    from .extract import LayerApplier

    logging.getLogger().addHandler(_Relay(sock))
    logging.getLogger().setLevel(logging.INFO)

    def reply(message: dict[str, Any]) -> None:
        sock.send(json.dumps(message).encode())

    applier: LayerApplier | None = None
    try:
        while True:
            data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MESSAGE, 1)
            if not data:
                return 0  # the parent closed: nothing more to do
            message = json.loads(data)
            op = message["op"]
            if op == "root":
                applier = LayerApplier(message["path"])
            elif op == "layer":
                assert applier is not None and len(fds) == 1
                fd = fds[0]
                source = _Follow(fd, int(message["size"]), parent)
                inner = Decompressor(source, message["compression"], hash_output=True)
                stream = ThreadedDecompressor(inner)
                try:
                    applier.apply(stream, message["what"])
                    stream.drain()
                finally:
                    stream.close()
                    os.close(fd)
                assert inner.hasher is not None
                reply({"diff_id": "sha256:" + inner.hasher.hexdigest()})
            elif op == "finish":
                assert applier is not None
                applier.finish()
                s = applier.stats
                reply(
                    {
                        "stats": {
                            "files": s.files,
                            "bytes": s.bytes,
                            "skipped_devices": s.skipped_devices,
                            "entries": s.entries,
                        }
                    }
                )
    except errors.StargzfsError as e:
        name = type(e).__name__ if type(e).__name__ in _ERRORS else "StargzfsError"
        reply({"error": name, "msg": _cut(str(e))})
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename is not None else ""
        reply(
            {"error": "StargzfsError", "msg": _cut(f"extracting layers: {where}{e.strerror or e}")}
        )
        return 1
    except Exception as e:  # reported by the parent as an internal error
        reply({"error": "internal", "msg": _cut(f"{type(e).__name__}: {e}")})
        return 1
    finally:
        if applier is not None:
            applier.close()


def main() -> int:
    # Ctrl-C reaches the whole process group: the parent decides, and kills us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        return _child(sock, int(sys.argv[2]))
    except (BrokenPipeError, ConnectionResetError):
        return 3


if __name__ == "__main__":
    sys.exit(main())
