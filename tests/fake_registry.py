"""An in-memory registry for ``httpx.MockTransport``: the error paths real registries can't
produce on demand (throttling, outages, dropped connections, redirects to object storage,
registries that ignore ranges or refuse multi-range requests).

One :class:`FakeRegistry` serves three hosts: the registry (``registry.test``), its token
server (``auth.test``) and an object store it may redirect blob GETs to (``storage.test``),
which, like S3 with a presigned URL, refuses requests that also carry an ``Authorization``.
Behaviour switches are plain attributes; ``before`` can answer any request first.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import httpx

from stargzfs.registry import RegistryClient, RetryPolicy

REGISTRY = "registry.test"
AUTH = "auth.test"
STORAGE = "storage.test"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


class NetworkStream(httpx.AsyncByteStream):
    """A body delivered in 64 KiB pieces, like a socket; optionally dropping after ``cut``."""

    def __init__(self, data: bytes, cut: int | None = None) -> None:
        self.data = data
        self.cut = cut

    async def __aiter__(self) -> AsyncIterator[bytes]:
        end = len(self.data) if self.cut is None else self.cut
        for start in range(0, end, 65536):
            yield self.data[start : min(start + 65536, end)]
        if self.cut is not None:
            raise httpx.RemoteProtocolError("peer closed connection without sending the body")


Hook = Callable[[httpx.Request], "httpx.Response | Awaitable[httpx.Response | None] | None"]


@dataclass
class FakeRegistry:
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str = "alice"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    token_expires_in: int | None = 60
    ranges: bool = True  # False: answer Range GETs with 200 and the whole blob
    multirange: Literal["multipart", "416", "400", "200"] = "multipart"
    redirect_blobs: bool = False  # blob GETs → 307 to storage.test
    cut_bodies: int = 0  # the next N blob bodies drop after `cut_at` bytes
    cut_at: int = 10
    before: Hook | None = None
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)
    tokens_issued: int = 0
    presigned: set[str] = field(default_factory=set)

    # -- content -------------------------------------------------------------------------
    def add_blob(self, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(
        self, repo: str, data: bytes, media_type: str = OCI_MANIFEST, tag: str | None = None
    ) -> str:
        digest = sha256(data)
        self.manifests[(repo, digest)] = (data, media_type)
        if tag is not None:
            self.manifests[(repo, tag)] = (data, media_type)
        return digest

    def client(self, **kwargs: object) -> RegistryClient:
        """A client wired to this fake (no files, no registries.conf, fast retries)."""
        from stargzfs.registry import CredentialResolver, Credentials

        creds = kwargs.pop("credentials", None)
        if creds is None:
            creds = CredentialResolver(
                {REGISTRY: Credentials(self.username, self.password)}, env={}
            )
        kwargs.setdefault("retry", RetryPolicy(max_attempts=4, base_delay=0.5))
        kwargs.setdefault("insecure", ())
        return RegistryClient(
            transport=httpx.MockTransport(self.handle),
            credentials=creds,  # type: ignore[arg-type]
            registries=[],
            **kwargs,  # type: ignore[arg-type]
        )

    def count(self, host: str = REGISTRY, path_part: str = "") -> int:
        return sum(1 for r in self.requests if r.url.host == host and path_part in r.url.path)

    # -- HTTP ----------------------------------------------------------------------------
    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.before is not None:
            answer = self.before(request)
            if isinstance(answer, Awaitable):
                answer = await answer
            if answer is not None:
                return answer
        if request.url.host == AUTH:
            return self._token(request)
        if request.url.host == STORAGE:
            return self._storage(request)
        if request.url.host != REGISTRY:
            raise httpx.ConnectError(f"no such host {request.url.host}")
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        return self._api(request)

    def _basic_ok(self, header: str | None) -> bool:
        expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return header == f"Basic {expected}"

    def _token(self, request: httpx.Request) -> httpx.Response:
        header = request.headers.get("authorization")
        if header is not None and not self._basic_ok(header):
            return httpx.Response(401, content=error_body("UNAUTHORIZED", "bad credentials"))
        token = secrets.token_hex(8)
        # Anonymous callers get a token too, but one the registry won't accept (like Hub).
        if header is not None:
            self.tokens.add(token)
        self.tokens_issued += 1
        body: dict[str, object] = {"token": token}
        if self.token_expires_in is not None:
            body["expires_in"] = self.token_expires_in
        return httpx.Response(200, json=body)

    def _check_auth(self, request: httpx.Request) -> httpx.Response | None:
        header = request.headers.get("authorization")
        if self.auth == "basic" and not self._basic_ok(header):
            return httpx.Response(
                401,
                headers={"WWW-Authenticate": 'Basic realm="fake"'},
                content=error_body("UNAUTHORIZED", "authentication required"),
            )
        if self.auth == "bearer":
            token = header[len("Bearer ") :] if header and header.startswith("Bearer ") else None
            if token not in self.tokens:
                repo = request.url.path.split("/v2/", 1)[-1].rsplit("/", 2)[0]
                scope = (
                    "registry:catalog:*"
                    if "_catalog" in request.url.path
                    else (f"repository:{repo}:pull")
                )
                challenge = f'Bearer realm="https://{AUTH}/token",service="fake",scope="{scope}"'
                return httpx.Response(
                    401,
                    headers={"WWW-Authenticate": challenge},
                    content=error_body("UNAUTHORIZED", "authentication required"),
                )
        return None

    def _api(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v2/_catalog":
            repos = sorted({repo for repo, _ in self.manifests})
            return httpx.Response(200, json={"repositories": repos})
        if not path.startswith("/v2/"):
            return httpx.Response(404)
        rest = path[len("/v2/") :]
        if rest.endswith("/tags/list"):
            repo = rest[: -len("/tags/list")]
            tags = sorted(t for r, t in self.manifests if r == repo and not t.startswith("sha"))
            return httpx.Response(200, json={"name": repo, "tags": tags})
        repo, kind, ref = rest.rsplit("/", 2)
        if kind == "manifests":
            found = self.manifests.get((repo, ref))
            if found is None:
                return httpx.Response(
                    404, content=error_body("MANIFEST_UNKNOWN", "manifest unknown")
                )
            data, media_type = found
            headers = {"Content-Type": media_type, "Docker-Content-Digest": sha256(data)}
            if request.method == "HEAD":
                headers["Content-Length"] = str(len(data))
                return httpx.Response(200, headers=headers)
            return httpx.Response(200, headers=headers, content=data)
        if kind == "blobs":
            if ref not in self.blobs:
                return httpx.Response(404, content=error_body("BLOB_UNKNOWN", "blob unknown"))
            if self.redirect_blobs:
                sig = secrets.token_hex(4)
                self.presigned.add(sig)
                location = f"https://{STORAGE}/objects/{ref}?X-Signature={sig}"
                return httpx.Response(307, headers={"Location": location})
            return self._serve_blob(request, self.blobs[ref])
        return httpx.Response(404)

    def _storage(self, request: httpx.Request) -> httpx.Response:
        if "authorization" in request.headers:
            # S3: "Only one auth mechanism allowed" — and a leaked registry credential.
            return httpx.Response(400, content=b"<Error>InvalidArgument</Error>")
        if request.url.params.get("X-Signature") not in self.presigned:
            return httpx.Response(403, content=b"<Error>AccessDenied: expired</Error>")
        digest = request.url.path.rsplit("/", 1)[-1]
        return self._serve_blob(request, self.blobs[digest])

    def _body(self, data: bytes, status: int, headers: dict[str, str]) -> httpx.Response:
        headers["Content-Length"] = str(len(data))
        cut = None
        if self.cut_bodies > 0 and len(data) > self.cut_at:
            self.cut_bodies -= 1
            cut = self.cut_at
        return httpx.Response(status, headers=headers, stream=NetworkStream(data, cut))

    def _serve_blob(self, request: httpx.Request, data: bytes) -> httpx.Response:
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(data))})
        spec = request.headers.get("range")
        if spec is None or not self.ranges:
            return self._body(data, 200, {})
        spans: list[tuple[int, int]] = []
        for part in spec.removeprefix("bytes=").split(","):
            first, _, last = part.partition("-")
            end = int(last) if last else len(data) - 1
            if int(first) >= len(data):
                return httpx.Response(416, headers={"Content-Range": f"bytes */{len(data)}"})
            spans.append((int(first), min(end, len(data) - 1)))
        if len(spans) == 1:
            first, last = spans[0]
            headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}"}
            return self._body(data[first : last + 1], 206, headers)
        if self.multirange == "416":
            return httpx.Response(416, content=b"multi-range not supported")
        if self.multirange == "400":
            return httpx.Response(400, content=b"bad range")
        if self.multirange == "200":
            return self._body(data, 200, {})
        boundary = "THIS_STRING_SEPARATES"
        out = bytearray()
        for first, last in spans:
            out += f"--{boundary}\r\nContent-Type: application/octet-stream\r\n".encode()
            out += f"Content-Range: bytes {first}-{last}/{len(data)}\r\n\r\n".encode()
            out += data[first : last + 1] + b"\r\n"
        out += f"--{boundary}--\r\n".encode()
        content_type = f"multipart/byteranges; boundary={boundary}"
        return self._body(bytes(out), 206, {"Content-Type": content_type})
