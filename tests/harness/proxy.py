"""A misbehaving HTTP proxy in front of a real registry, for tests.

It forwards every request to the registry and counts what it sent back, and can be told to
misbehave the ways registries and CDNs do in the wild:

* ``ranges="ignore"``: answer Range GETs with 200 and the whole blob (ECR, cold proxies);
* ``multirange="refuse"``: answer multi-range requests with 416 (GCS, some proxies);
* ``fail_next(status, count, retry_after)``: the next ``count`` blob/manifest requests get
  ``status`` (429, 503, ...), optionally with ``Retry-After``;
* ``drop_next(count, after)``: cut the connection after ``after`` body bytes;
* ``corrupt_blob(digest, offset)``: flip one byte of a blob as it passes (at blob offset);
* ``redirect_blobs=True``: blob GETs get a 307 to a second port ("object storage") that
  serves the bytes and rejects any request carrying an Authorization header;
* ``down=True``: refuse everything with 503, as a registry outage;
* ``delay_ranges(seconds, below)``: hold blob Range GETs that start below blob offset
  ``below`` for ``seconds`` before forwarding them (a slow link, for races).

Counters: ``bytes_sent`` (blob body bytes), ``requests`` (list of (method, path, range)).
"""

from __future__ import annotations

import http.client
import http.server
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RegistryProxy"]

_BLOB = re.compile(r"^/v2/(.+)/blobs/(sha256:[0-9a-f]{64})$")


@dataclass
class _Faults:
    fail_status: int = 0
    fail_count: int = 0
    retry_after: str | None = None
    drop_count: int = 0
    drop_after: int = 0
    corrupt: dict[str, int] = field(default_factory=dict)


class RegistryProxy:
    def __init__(self, upstream_host: str) -> None:
        self.upstream_host = upstream_host  # "127.0.0.1:PORT"
        self.ranges = "pass"
        self.multirange = "pass"
        self.redirect_blobs = False
        self.down = False
        self.faults = _Faults()
        self.range_delay: tuple[float, int] = (0.0, 0)
        self.bytes_sent = 0
        self.requests: list[tuple[str, str, str | None]] = []
        self.storage_requests: list[tuple[str, bool]] = []  # (path, had Authorization)
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _handler(self, storage=False))
        self._storage = _Server(("127.0.0.1", 0), _handler(self, storage=True))
        for server in (self._server, self._storage):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def storage_host(self) -> str:
        return f"127.0.0.1:{self._storage.server_address[1]}"

    def fail_next(self, status: int, count: int = 1, retry_after: str | None = None) -> None:
        with self._lock:
            self.faults.fail_status, self.faults.fail_count = status, count
            self.faults.retry_after = retry_after

    def drop_next(self, count: int = 1, after: int = 100) -> None:
        with self._lock:
            self.faults.drop_count, self.faults.drop_after = count, after

    def corrupt_blob(self, digest: str, offset: int) -> None:
        with self._lock:
            self.faults.corrupt[digest] = offset

    def delay_ranges(self, seconds: float, below: int) -> None:
        self.range_delay = (seconds, below)

    def blob_ranges(self) -> list[tuple[int, int]]:
        """``(first, last)`` byte of every blob Range GET so far, in arrival order."""
        out = []
        for method, path, rng in list(self.requests):
            if method == "GET" and "/blobs/" in path and rng and "," not in rng:
                first, _, last = rng.removeprefix("bytes=").partition("-")
                out.append((int(first), int(last) if last else -1))
        return out

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_sent = 0
            self.requests.clear()
            self.storage_requests.clear()

    def close(self) -> None:
        for server in (self._server, self._storage):
            server.shutdown()
            server.server_close()

    # -- the request path ---------------------------------------------------------------

    def _take_fault(self) -> tuple[int, str | None, int | None]:
        with self._lock:
            f = self.faults
            if f.fail_count > 0:
                f.fail_count -= 1
                return f.fail_status, f.retry_after, None
            if f.drop_count > 0:
                f.drop_count -= 1
                return 0, None, f.drop_after
        return 0, None, None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _handler(proxy: RegistryProxy, *, storage: bool) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._forward("GET")

        def do_HEAD(self) -> None:
            self._forward("HEAD")

        def _reply(self, status: int, headers: dict[str, str] | None = None) -> None:
            body = b'{"errors":[{"code":"UNAVAILABLE","message":"injected by the test proxy"}]}'
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _forward(self, method: str) -> None:
            path = self.path
            rng = self.headers.get("Range")
            blob = _BLOB.match(path.split("?")[0])
            if storage:
                proxy.storage_requests.append((path, "Authorization" in self.headers))
                if "Authorization" in self.headers:
                    self._reply(400)  # object storage rejects foreign credentials
                    return
            else:
                proxy.requests.append((method, path, rng))
                if proxy.down:
                    self._reply(503)
                    return
                if path != "/v2/" and path != "/v2":
                    status, retry_after, _ = (0, None, None)
                    with proxy._lock:
                        pending = proxy.faults.fail_count > 0
                    if pending:
                        status, retry_after, _ = proxy._take_fault()
                        self._reply(status, {"Retry-After": retry_after} if retry_after else {})
                        return
                if blob and method == "GET" and proxy.redirect_blobs:
                    self.send_response(307)
                    self.send_header("Location", f"http://{proxy.storage_host}{path}?sig=x")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            seconds, below = proxy.range_delay
            if blob and rng and seconds:
                m = re.match(r"bytes=(\d+)-", rng)
                if m and int(m.group(1)) < below:
                    time.sleep(seconds)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            if storage:
                path = path.split("?")[0]
            multi = rng is not None and "," in rng
            if rng is not None and multi and proxy.multirange == "refuse":
                self._reply(416)
                return
            if rng is not None and proxy.ranges == "ignore":
                headers.pop("Range", None)
                rng = None
            conn = http.client.HTTPConnection(proxy.upstream_host, timeout=30)
            try:
                conn.request(method, path, headers=headers)
                resp = conn.getresponse()
                body = resp.read() if method != "HEAD" else b""
            finally:
                conn.close()
            if resp.status in (301, 302, 303, 307, 308):
                loc = resp.getheader("Location", "")
                loc = loc.replace(proxy.upstream_host, proxy.host)
                resp_headers = [
                    (k, v if k.lower() != "location" else loc) for k, v in resp.getheaders()
                ]
            else:
                resp_headers = list(resp.getheaders())
            start = 0
            m = re.match(r"bytes (\d+)-", resp.getheader("Content-Range") or "")
            if m:
                start = int(m.group(1))
            if (
                blob
                and body
                and blob.group(2) in proxy.faults.corrupt
                and resp.status in (200, 206)
            ):
                at = proxy.faults.corrupt[blob.group(2)] - start
                if 0 <= at < len(body):
                    body = body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]
            drop_after = None
            if blob and method == "GET" and not storage:
                with proxy._lock:
                    if proxy.faults.drop_count > 0:
                        proxy.faults.drop_count -= 1
                        drop_after = proxy.faults.drop_after
            self.send_response(resp.status)
            for k, v in resp_headers:
                if k.lower() in ("transfer-encoding", "connection", "content-length"):
                    continue
                self.send_header(k, v)
            self.send_header(
                "Content-Length",
                str(len(body) if method != "HEAD" else resp.getheader("Content-Length") or 0),
            )
            self.end_headers()
            if method == "HEAD":
                return
            if drop_after is not None and drop_after < len(body):
                self.wfile.write(body[:drop_after])
                self.wfile.flush()
                with proxy._lock:
                    proxy.bytes_sent += drop_after if blob else 0
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(body)
            if blob:
                with proxy._lock:
                    proxy.bytes_sent += len(body)

    return Handler
