"""A throttled TCP link for the benchmarks: what a registry across a real network looks like
to a pull or a mount (``scripts/bench_pull.py`` and ``scripts/bench_mount.py``,
``--link-mbit N``). On loopback, downloading costs next to nothing, which hides what a lazy
mount or a warm cache saves."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class ThrottledLink:
    """A TCP forwarder to ``upstream`` whose downstream bytes share one token bucket of
    ``rate`` bytes/s: a slow link (every connection together), for cold-vs-warm numbers."""

    def __init__(self, upstream: str, rate: float) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + n / self.rate
            delay = self._next - now
        if delay > 0:
            time.sleep(delay)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, up, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, throttle: bool) -> None:
        try:
            while data := src.recv(65536):
                if throttle:
                    self._take(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._server.close()
