"""An HTTP proxy in front of a real registry that shows *when* things happen, for tests of
parallelism and streaming (``harness/proxy.py`` shows *what* happens).

* Counts requests in flight per kind (``"blob"``: blob GETs, ``"range"``: blob GETs with a
  Range header, ``"upload"``: POST/PATCH/PUT under ``/blobs/uploads/``) and the maximum seen.
* ``delay[kind] = seconds``: each such request waits that long (inside its in-flight window),
  so that requests the client sends together really overlap at the proxy.
* ``hold[digest] = offset``: the bytes of that blob from ``offset`` on are sent only once
  ``release`` is set (whatever the request's range): the client sees a download that has
  delivered exactly ``[0, offset)`` so far. ``held`` counts requests waiting there.
* ``bytes_sent[digest]``: blob body bytes delivered; ``requests``: (method, path, Range).

Every request is forwarded to the registry as is (bodies included) and ``Location`` headers
pointing at the registry are rewritten to point at the proxy, so uploads come back through it.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import re
import threading
import time
from collections import Counter
from typing import Any

__all__ = ["GatedProxy"]

_BLOB = re.compile(r"^/v2/.+/blobs/(sha256:[0-9a-f]{64})$")
_UPLOAD = re.compile(r"^/v2/.+/blobs/uploads/")
_PIECE = 256 * 1024


class GatedProxy:
    def __init__(self, upstream_host: str) -> None:
        self.upstream_host = upstream_host
        self.delay: dict[str, float] = {}
        self.hold: dict[str, int] = {}
        self.release = threading.Event()
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.held = 0
        self.bytes_sent: Counter[str] = Counter()
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def reset(self) -> None:
        """Forget counters and holds (waits for held requests to give up first)."""
        self.release.set()
        self.wait_idle()
        with self.lock:
            self.hold.clear()
            self.delay.clear()
            self.max_in_flight.clear()
            self.bytes_sent.clear()
            self.requests.clear()
        self.release.clear()

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if not +self.in_flight and self.held == 0:
                    return
            time.sleep(0.01)
        raise AssertionError(f"proxy still busy: {dict(self.in_flight)}")

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> GatedProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _handler(proxy: GatedProxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._handle()

        def do_HEAD(self) -> None:
            self._handle()

        def do_POST(self) -> None:
            self._handle()

        def do_PATCH(self) -> None:
            self._handle()

        def do_PUT(self) -> None:
            self._handle()

        def do_DELETE(self) -> None:
            self._handle()

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _handle(self) -> None:
            method, path = self.command, self.path
            rng = self.headers.get("Range")
            bare = path.split("?")[0]
            blob = _BLOB.match(bare) if method == "GET" else None
            kinds = []
            if blob:
                kinds.append("blob")
                if rng:
                    kinds.append("range")
            elif method in ("POST", "PATCH", "PUT") and _UPLOAD.match(bare):
                kinds.append("upload")
            body = self._body()
            with proxy.lock:
                proxy.requests.append((method, path, rng))
                for k in kinds:
                    proxy.in_flight[k] += 1
                    proxy.max_in_flight[k] = max(proxy.max_in_flight[k], proxy.in_flight[k])
            try:
                with contextlib.suppress(ConnectionError, TimeoutError):
                    self._forward(method, path, body, kinds, blob.group(1) if blob else None)
            finally:
                with proxy.lock:
                    for k in kinds:
                        proxy.in_flight[k] -= 1

        def _forward(
            self, method: str, path: str, body: bytes, kinds: list[str], digest: str | None
        ) -> None:
            delay = max((proxy.delay.get(k, 0.0) for k in kinds), default=0.0)
            if delay:
                time.sleep(delay)
            headers = {
                k: v
                for k, v in self.headers.items()
                if k.lower() not in ("host", "transfer-encoding", "content-length")
            }
            if body or method in ("POST", "PATCH", "PUT"):
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(proxy.upstream_host, timeout=60)
            try:
                conn.request(method, path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read() if method != "HEAD" else b""
            finally:
                conn.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() in ("transfer-encoding", "connection", "content-length"):
                    continue
                if k.lower() == "location":
                    v = v.replace(proxy.upstream_host, proxy.host)
                self.send_header(k, v)
            length = (resp.getheader("Content-Length") or "0") if method == "HEAD" else len(data)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if method == "HEAD" or not data:
                return
            start = 0
            m = re.match(r"bytes (\d+)-", resp.getheader("Content-Range") or "")
            if m:
                start = int(m.group(1))
            cut = len(data)
            if digest is not None and digest in proxy.hold and resp.status in (200, 206):
                cut = min(max(proxy.hold[digest] - start, 0), len(data))
            self._send(data[:cut], digest)
            if cut < len(data):
                with proxy.lock:
                    proxy.held += 1
                try:
                    proxy.release.wait(60)
                finally:
                    with proxy.lock:
                        proxy.held -= 1
                self._send(data[cut:], digest)

        def _send(self, data: bytes, digest: str | None) -> None:
            for i in range(0, len(data), _PIECE):
                piece = data[i : i + _PIECE]
                self.wfile.write(piece)
                if digest is not None:
                    with proxy.lock:
                        proxy.bytes_sent[digest] += len(piece)
            self.wfile.flush()

    return Handler
