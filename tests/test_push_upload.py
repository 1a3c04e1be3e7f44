"""The upload protocol against an in-memory registry (``httpx.MockTransport``): relative
``Location`` headers, monolithic vs chunked uploads, resuming a session after failed chunks,
mounts that fall back to uploads, retries, bounded request bodies."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from stargzfs.errors import RegistryError, UnsupportedError
from stargzfs.push.upload import Uploader
from stargzfs.reference import Reference, Repository
from stargzfs.registry import CredentialResolver, RegistryClient, RetryPolicy

HOST = "registry.test"
REPO = Repository(HOST, "team/app")
DATA = random.Random(3).randbytes(1_000_003)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


@dataclass
class UploadFake:
    """Sessions live in the server (not in the URL); Locations are relative."""

    blobs: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo → digest → data
    sessions: dict[str, bytearray] = field(default_factory=dict)
    log: list[tuple[str, str, int]] = field(default_factory=list)  # method, path, body size
    # Called before each request is handled; may return a response to send instead.
    before: Callable[[httpx.Request, int], httpx.Response | None] | None = None
    # After handling, "store then fail": PATCH numbers whose answer is replaced by a 500.
    fail_after_store: set[int] = field(default_factory=set)
    mount_answer: int = 201
    allow_delete: bool = True
    patches: int = 0
    started: int = 0
    refuse_patch: int | None = None  # answer every PATCH with this status
    manifests: dict[str, bytes] = field(default_factory=dict)

    def client(self) -> RegistryClient:
        return RegistryClient(
            transport=httpx.MockTransport(self.handle),
            credentials=CredentialResolver({}, env={}),
            registries=[],
            retry=RetryPolicy(max_attempts=4, base_delay=0.5),
        )

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = request.content
        self.log.append((request.method, request.url.path, len(body)))
        if self.before is not None:
            answer = self.before(request, len(self.log))
            if answer is not None:
                return answer
        path = request.url.path
        m = re.fullmatch(r"/v2/(.+)/blobs/uploads/([a-z0-9]*)", path)
        if m:
            return self._upload(request, m.group(1), m.group(2), body)
        m = re.fullmatch(r"/v2/(.+)/blobs/(sha256:[0-9a-f]{64})", path)
        if m and request.method == "HEAD":
            data = self.blobs.get(m.group(1), {}).get(m.group(2))
            if data is None:
                return httpx.Response(404)
            return httpx.Response(200, headers={"Content-Length": str(len(data))})
        m = re.fullmatch(r"/v2/(.+)/manifests/(.+)", path)
        if m and request.method == "PUT":
            self.manifests[f"{m.group(1)}:{m.group(2)}"] = body
            return httpx.Response(201)
        if m and request.method == "DELETE":
            if not self.allow_delete:
                return httpx.Response(
                    405,
                    json={"errors": [{"code": "UNSUPPORTED", "message": "deletes are off"}]},
                )
            return httpx.Response(202)
        return httpx.Response(404)

    def _upload(self, request: httpx.Request, repo: str, sid: str, body: bytes) -> httpx.Response:
        method = request.method
        if method == "POST":
            mount, src = request.url.params.get("mount"), request.url.params.get("from")
            if mount and src and mount in self.blobs.get(src, {}) and self.mount_answer == 201:
                self.blobs.setdefault(repo, {})[mount] = self.blobs[src][mount]
                return httpx.Response(201)
            sid = f"s{self.started}"
            self.started += 1
            self.sessions[sid] = bytearray()
            # Relative to the request URL (".../uploads/"), not even rooted.
            return httpx.Response(202, headers={"Location": f"{sid}?x=1"})
        session = self.sessions.get(sid)
        if session is None:
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UPLOAD_UNKNOWN"}]})
        loc = {"Location": f"/v2/{repo}/blobs/uploads/{sid}?x=2"}
        if method == "GET":
            return httpx.Response(204, headers={**loc, "Range": f"0-{len(session) - 1}"})
        if method == "PATCH" and self.refuse_patch is not None:
            return httpx.Response(self.refuse_patch)
        if method == "PATCH":
            self.patches += 1
            first = int(request.headers["content-range"].split("-")[0])
            if first != len(session):
                return httpx.Response(416)
            session += body
            if self.patches in self.fail_after_store:
                return httpx.Response(500)
            return httpx.Response(202, headers={**loc, "Range": f"0-{len(session) - 1}"})
        if method == "PUT":
            session += body
            digest = request.url.params["digest"]
            if "sha256:" + hashlib.sha256(session).hexdigest() != digest:
                return httpx.Response(400, json={"errors": [{"code": "DIGEST_INVALID"}]})
            self.blobs.setdefault(repo, {})[digest] = bytes(session)
            del self.sessions[sid]
            return httpx.Response(201)
        return httpx.Response(405)


def _source(data: bytes, piece: int = 100_000) -> Callable[[int], AsyncGenerator[bytes, None]]:
    async def gen(offset: int) -> AsyncGenerator[bytes, None]:
        for start in range(offset, len(data), piece):
            yield data[start : start + piece]

    return gen


def _run(fake: UploadFake, fn: Callable[[Uploader], Any], chunk_size: int = 256 * 1024) -> Any:
    async def main() -> Any:
        async with fake.client() as client:
            return await fn(Uploader(client, chunk_size=chunk_size))

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_chunked_upload_relative_locations_bounded_bodies() -> None:
    fake = UploadFake()
    result = _run(fake, lambda u: u.push_blob(REPO, DIGEST, len(DATA), _source(DATA)))
    assert result.outcome == "uploaded" and result.bytes_sent == len(DATA)
    assert fake.blobs["team/app"][DIGEST] == DATA
    patches = [size for method, _, size in fake.log if method == "PATCH"]
    assert len(patches) == 4 and max(patches) == 256 * 1024
    assert sum(patches) == len(DATA)
    # The relative Location "s0?x=1" was resolved against .../blobs/uploads/.
    assert ("PATCH", "/v2/team/app/blobs/uploads/s0", 256 * 1024) in fake.log


def test_small_blob_is_one_put() -> None:
    fake = UploadFake()
    small = b"config" * 10
    digest = "sha256:" + hashlib.sha256(small).hexdigest()
    _run(fake, lambda u: u.push_blob(REPO, digest, len(small), _source(small)))
    assert [m for m, _, _ in fake.log] == ["HEAD", "POST", "PUT"]
    assert fake.log[-1][2] == len(small)


def test_present_blob_is_skipped() -> None:
    fake = UploadFake(blobs={"team/app": {DIGEST: DATA}})
    result = _run(fake, lambda u: u.push_blob(REPO, DIGEST, len(DATA), _source(DATA)))
    assert result.outcome == "exists"
    assert [m for m, _, _ in fake.log] == ["HEAD"]


def test_failed_chunk_resumes_where_the_session_stands() -> None:
    # The second chunk is stored but answered 500; the fourth (last) is refused with a 503
    # before being stored. Each time the session is asked, and nothing accepted is sent again.
    def before(request: httpx.Request, n: int) -> httpx.Response | None:
        if request.method == "PATCH" and fake.patches == 3 and not flags.get("503"):
            flags["503"] = True
            return httpx.Response(503)
        return None

    flags: dict[str, bool] = {}
    fake = UploadFake(fail_after_store={2}, before=before)
    result = _run(fake, lambda u: u.push_blob(REPO, DIGEST, len(DATA), _source(DATA)))
    assert fake.blobs["team/app"][DIGEST] == DATA
    assert result.bytes_sent == len(DATA)
    # Only the last chunk (refused with 503 before being stored) went twice.
    last = len(DATA) - 3 * 256 * 1024
    assert sum(size for method, _, size in fake.log if method == "PATCH") == len(DATA) + last
    assert [m for m, _, _ in fake.log].count("GET") == 2


def test_mount_then_fallback_to_upload() -> None:
    other = Repository(HOST, "team/base")
    fake = UploadFake(blobs={"team/base": {DIGEST: DATA}})
    result = _run(
        fake, lambda u: u.push_blob(REPO, DIGEST, len(DATA), _source(DATA), mount_from=other)
    )
    assert result.outcome == "mounted" and result.bytes_sent == 0
    fake = UploadFake(blobs={"team/base": {DIGEST: DATA}}, mount_answer=202)
    result = _run(
        fake, lambda u: u.push_blob(REPO, DIGEST, len(DATA), _source(DATA), mount_from=other)
    )
    assert result.outcome == "uploaded"
    assert fake.blobs["team/app"][DIGEST] == DATA


def test_throttled_start_is_retried_and_4xx_is_not() -> None:
    def throttle(request: httpx.Request, n: int) -> httpx.Response | None:
        if request.method == "POST" and n <= 3:
            return httpx.Response(429, headers={"Retry-After": "1"})
        return None

    fake = UploadFake(before=throttle)
    _run(fake, lambda u: u.push_blob(REPO, DIGEST, len(DATA), _source(DATA)))
    assert fake.blobs["team/app"][DIGEST] == DATA

    def refuse(request: httpx.Request, n: int) -> httpx.Response | None:
        if request.method == "POST":
            return httpx.Response(400, json={"errors": [{"code": "NAME_INVALID"}]})
        return None

    fake = UploadFake(before=refuse)
    with pytest.raises(RegistryError, match="NAME_INVALID"):
        _run(fake, lambda u: u.push_blob(REPO, DIGEST, len(DATA), _source(DATA)))
    assert [m for m, _, _ in fake.log] == ["HEAD", "POST"]


def test_short_source_is_an_error() -> None:
    fake = UploadFake()
    with pytest.raises(Exception, match="source ended"):
        _run(fake, lambda u: u.push_blob(REPO, DIGEST, len(DATA) + 10, _source(DATA)))


def test_manifest_put_and_delete() -> None:
    fake = UploadFake()
    ref = Reference(REPO, "v1")
    digest = _run(fake, lambda u: u.put_manifest(ref, b"{}", "application/json"))
    assert digest == "sha256:" + hashlib.sha256(b"{}").hexdigest()
    assert fake.manifests["team/app:v1"] == b"{}"
    _run(fake, lambda u: u.delete_manifest(REPO, digest))
    fake = UploadFake(allow_delete=False)
    with pytest.raises(UnsupportedError, match="deletes are off"):
        _run(fake, lambda u: u.delete_manifest(REPO, digest))


def test_progress_line_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from stargzfs.push.pusher import ProgressLine

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    clock = iter([10.0, 10.1, 11.0])
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    line = ProgressLine(out, 4 * 1048576)
    line("sha256:a", 1048576)
    line("sha256:a", 2 * 1048576)  # within half a second: not printed
    line("sha256:b", 1048576)
    line.finish()
    text = out.getvalue()
    assert "\r  uploading 1.0 / 4.0 MiB" in text and "\r  uploading 3.0 / 4.0 MiB" in text
    assert "2.0 / 4.0" not in text and text.endswith("\r\033[K")


def test_memory_bounded_by_chunk_size() -> None:
    """Chunk bodies are released as soon as their request is done, even with the cyclic GC
    off (httpx keeps responses in reference cycles)."""
    import gc
    import tracemalloc

    big = random.Random(9).randbytes(8 * 1024 * 1024)
    digest = "sha256:" + hashlib.sha256(big).hexdigest()

    def discard(request: httpx.Request, n: int) -> httpx.Response | None:
        if request.method == "PATCH":
            return httpx.Response(202, headers={"Location": "/v2/team/app/blobs/uploads/s0"})
        if request.method == "PUT":
            return httpx.Response(201)
        return None

    fake = UploadFake(before=discard)
    gc.disable()
    tracemalloc.start()
    try:
        _run(fake, lambda u: u.push_blob(REPO, digest, len(big), _source(big, 65536)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        gc.enable()
    assert sum(size for method, _, size in fake.log if method == "PATCH") == len(big)
    assert peak < 3 * 256 * 1024 + 1024 * 1024, peak


def test_push_image_layers_then_config_then_manifest(tmp_path: Any) -> None:
    from harness.oci import gzip_layer, make_tar, write_oci_layout

    from stargzfs.push.pusher import push_image
    from stargzfs.push.sources import open_source

    rng = random.Random(5)
    layers = [gzip_layer(make_tar({f"f{i}": rng.randbytes(300_000)})) for i in range(4)]
    layout = write_oci_layout(tmp_path / "l", layers)
    fake = UploadFake()

    async def main() -> str:
        with open_source(f"oci:{layout}") as image:
            async with fake.client() as client:
                digest, _ = await push_image(
                    client, image, Reference(REPO, "v1"), jobs=3, chunk_size=128 * 1024
                )
                return digest

    digest = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    puts = [(path, size) for method, path, size in fake.log if method == "PUT"]
    assert puts[-1][0] == "/v2/team/app/manifests/v1"
    config_put = next(i for i, (_, size) in enumerate(puts) if 0 < size < 1000)
    assert config_put == len(puts) - 2  # the config is monolithic, after every layer
    assert len(fake.blobs["team/app"]) == 5
    assert digest == "sha256:" + hashlib.sha256(fake.manifests["team/app:v1"]).hexdigest()


@pytest.mark.parametrize("status", [400, 405, 416])
def test_refused_chunked_upload_falls_back_to_one_streamed_put(status: int) -> None:
    fake = UploadFake(refuse_patch=status)
    result = _run(fake, lambda u: u.push_blob(REPO, DIGEST, len(DATA), _source(DATA)))
    assert result.outcome == "uploaded" and result.bytes_sent == len(DATA)
    assert fake.blobs["team/app"][DIGEST] == DATA
    assert [m for m, _, _ in fake.log] == ["HEAD", "POST", "PATCH", "POST", "PUT"]
    assert fake.log[-1][2] == len(DATA)
