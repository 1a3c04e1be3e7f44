"""The registry client: error paths against an in-memory fake (``httpx.MockTransport``), the
happy paths and auth modes against real ``docker-registry`` processes."""

from __future__ import annotations

import email.utils
import json
import logging
import random
import time
from contextlib import aclosing
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from fake_registry import (
    REGISTRY,
    STORAGE,
    FakeRegistry,
    error_body,
    sha256,
)
from harness import FIXTURE_MANIFEST_DIGEST, Registry, RegistryFactory
from test_registry_auth import fake_helper, write_json

from stargzfs.errors import (
    AuthError,
    DigestMismatchError,
    FormatError,
    NotFoundError,
    RegistryError,
    UnsupportedError,
    UsageError,
)
from stargzfs.image import resolve_image
from stargzfs.reference import Platform, Repository, parse_reference
from stargzfs.registry import (
    OCI_INDEX,
    CredentialResolver,
    Credentials,
    EndpointResolver,
    RegistryBlobSource,
    RegistryClient,
    RetryPolicy,
    TempSpill,
    parse_mirror_option,
)
from stargzfs.registry.endpoints import load_registries_conf, parse_registries_conf
from stargzfs.registry.ranges import (
    Part,
    parse_content_range,
    parse_multipart_byteranges,
    slice_from_parts,
)
from stargzfs.registry.retry import parse_retry_after

BLOB = random.Random(7).randbytes(300_000)
DIGEST = sha256(BLOB)
REPO = Repository(REGISTRY, "app")
MANIFEST = json.dumps(
    {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}
).encode()
SPANS = [(0, 10), (1000, 500), (70_000, 4096), (299_990, 10), (150_000, 1)]


def blob_fake(**kwargs: object) -> FakeRegistry:
    fake = FakeRegistry(**kwargs)  # type: ignore[arg-type]
    fake.add_blob(BLOB)
    fake.add_manifest("app", MANIFEST, tag="v1")
    return fake


def expect(spans: list[tuple[int, int]]) -> list[bytes]:
    return [BLOB[o : o + n] for o, n in spans]


# --------------------------------------------------------------------------- manifests


async def test_manifest_bytes_media_type_digest_and_accept_list() -> None:
    fake = blob_fake()
    index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    fake.add_manifest("app", index, OCI_INDEX, tag="multi")

    def negotiate(request: httpx.Request) -> httpx.Response | None:
        # Like a real registry: without the index types in Accept, no index comes back.
        accept = request.headers.get("accept", "")
        wanted = [
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        ]
        if "/manifests/" in request.url.path and not all(t in accept for t in wanted):
            return httpx.Response(404, content=error_body("MANIFEST_UNKNOWN", "no match"))
        return None

    fake.before = negotiate
    async with fake.client() as client:
        got = await client.get_manifest(parse_reference(f"{REGISTRY}/app:multi"))
        assert (got.data, got.media_type, got.digest) == (index, OCI_INDEX, sha256(index))
        by_digest = await client.get_manifest(parse_reference(f"{REGISTRY}/app@{sha256(MANIFEST)}"))
        assert by_digest.data == MANIFEST
        head = await client.head_manifest(parse_reference(f"{REGISTRY}/app:v1"))
        assert (head.digest, head.size) == (sha256(MANIFEST), len(MANIFEST))


async def test_manifest_digest_is_verified() -> None:
    fake = blob_fake()
    claimed = sha256(b"what was promised")
    fake.manifests[("app", claimed)] = (MANIFEST, "application/vnd.oci.image.manifest.v1+json")
    async with fake.client() as client:
        with pytest.raises(DigestMismatchError) as info:
            await client.get_manifest(parse_reference(f"{REGISTRY}/app@{claimed}"))
    assert info.value.expected == claimed and info.value.actual == sha256(MANIFEST)


async def test_not_found_codes_are_surfaced() -> None:
    fake = blob_fake()
    async with fake.client() as client:
        with pytest.raises(NotFoundError, match="MANIFEST_UNKNOWN: manifest unknown"):
            await client.get_manifest(parse_reference(f"{REGISTRY}/app:nope"))
        missing = sha256(b"missing")
        with pytest.raises(NotFoundError, match="BLOB_UNKNOWN"):
            await client.get_blob_range(REPO, missing, 0, 10)
        with pytest.raises(NotFoundError, match="BLOB_UNKNOWN"):
            await client.head_blob(REPO, missing)
    # 404s are final: one request each (plus nothing retried).
    assert fake.count(REGISTRY) == 3


@pytest.mark.parametrize(
    ("status", "code", "error", "text"),
    [
        (400, "SIZE_INVALID", RegistryError, "HTTP 400 (SIZE_INVALID: nope)"),
        (403, "DENIED", AuthError, "access denied (HTTP 403 (DENIED: nope))"),
        (405, "UNSUPPORTED", UnsupportedError, "not supported"),
        (400, "UNSUPPORTED", UnsupportedError, "not supported"),
        (400, "NAME_UNKNOWN", NotFoundError, "NAME_UNKNOWN"),
        (418, None, RegistryError, "HTTP 418"),
    ],
)
async def test_other_4xx_are_mapped_and_never_retried(
    status: int, code: str | None, error: type[Exception], text: str
) -> None:
    fake = blob_fake()
    body = error_body(code, "nope") if code else b"teapot"
    fake.before = lambda request: httpx.Response(status, content=body)
    async with fake.client() as client:
        with pytest.raises(error) as info:
            await client.get_manifest(parse_reference(f"{REGISTRY}/app:v1"))
    assert text in str(info.value)
    assert len(fake.requests) == 1
    if isinstance(info.value, RegistryError):
        assert info.value.status == status


async def test_503_then_success(autojump_clock: trio.testing.MockClock) -> None:
    fake = blob_fake()
    outages = [503]
    fake.before = lambda r: httpx.Response(outages.pop()) if outages else None
    async with fake.client() as client:
        start = trio.current_time()
        got = await client.get_manifest(parse_reference(f"{REGISTRY}/app:v1"))
        assert got.data == MANIFEST
        assert client.stats.retries == 1
        # Backoff: at least half of the first 0.5 s step, at most the step.
        assert 0.25 <= trio.current_time() - start <= 0.5


async def test_429_honours_retry_after(autojump_clock: trio.testing.MockClock) -> None:
    fake = blob_fake()
    throttled = [httpx.Response(429, headers={"Retry-After": "7"})]
    fake.before = lambda r: throttled.pop() if throttled else None
    async with fake.client() as client:
        start = trio.current_time()
        assert (await client.get_blob_range(REPO, DIGEST, 5, 5)) == BLOB[5:10]
        assert trio.current_time() - start == pytest.approx(7.0)


async def test_retry_after_beyond_the_budget_fails_fast(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = blob_fake()
    fake.before = lambda r: httpx.Response(
        429,
        headers={"Retry-After": "3600"},
        content=error_body("TOOMANYREQUESTS", "slow down"),
    )
    async with fake.client() as client:
        start = trio.current_time()
        with pytest.raises(RegistryError, match="retry after 3600 s") as info:
            await client.get_manifest(parse_reference(f"{REGISTRY}/app:v1"))
        assert trio.current_time() - start < 1
    assert info.value.status == 429 and info.value.code == "TOOMANYREQUESTS"
    assert "TOOMANYREQUESTS: slow down" in str(info.value)


async def test_persistent_5xx_exhausts_bounded_retries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = blob_fake()
    fake.before = lambda r: httpx.Response(
        500, content=error_body("INTERNAL_ERROR", "disk on fire")
    )
    async with fake.client(retry=RetryPolicy(max_attempts=4, base_delay=1.0)) as client:
        with pytest.raises(RegistryError) as info:
            await client.get_manifest(parse_reference(f"{REGISTRY}/app:v1"))
    message = str(info.value)
    assert info.value.status == 500 and info.value.code == "INTERNAL_ERROR"
    assert "INTERNAL_ERROR: disk on fire" in message and "4 attempts" in message
    assert info.value.exit_code == 5
    assert len(fake.requests) == 4


async def test_total_time_budget_bounds_retries(autojump_clock: trio.testing.MockClock) -> None:
    fake = blob_fake()
    fake.before = lambda r: httpx.Response(502)
    policy = RetryPolicy(max_attempts=100, max_total=30.0, base_delay=2.0, max_delay=8.0)
    async with fake.client(retry=policy) as client:
        start = trio.current_time()
        with pytest.raises(RegistryError, match="retry time budget spent"):
            await client.get_manifest(parse_reference(f"{REGISTRY}/app:v1"))
        assert trio.current_time() - start <= 30.0
    assert 4 <= len(fake.requests) < 100


async def test_connection_errors_and_timeouts_are_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = blob_fake()
    errors: list[Exception] = [httpx.ConnectError("refused"), httpx.ReadTimeout("slow")]

    def flaky(request: httpx.Request) -> None:
        if errors:
            raise errors.pop(0)

    fake.before = flaky
    async with fake.client() as client:
        assert (await client.get_manifest(parse_reference(f"{REGISTRY}/app:v1"))).data == MANIFEST
        assert client.stats.retries == 2


async def test_protocol_misuse_is_not_retried() -> None:
    fake = blob_fake()

    def broken(request: httpx.Request) -> None:
        raise httpx.UnsupportedProtocol("no such scheme")

    fake.before = broken
    async with fake.client() as client:
        with pytest.raises(RegistryError, match="UnsupportedProtocol"):
            await client.get_manifest(parse_reference(f"{REGISTRY}/app:v1"))
    assert len(fake.requests) == 1


# --------------------------------------------------------------------------- redirects


async def test_redirect_to_storage_never_carries_authorization(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # The fake storage answers 400 to any request carrying Authorization (as S3 does).
    fake = blob_fake(auth="bearer", redirect_blobs=True)
    async with fake.client(redirect_ttl=60.0) as client:
        for offset in (0, 5000, 100_000):
            assert (
                await client.get_blob_range(REPO, DIGEST, offset, 100)
                == BLOB[offset : offset + 100]
            )
        # The redirect target was cached: one blob request to the registry for three reads.
        assert fake.count(REGISTRY, "/blobs/") == 2  # the 401 probe + the authorized GET
        assert fake.count(STORAGE) == 3
        assert all("authorization" not in r.headers for r in fake.requests if r.url.host == STORAGE)
        await trio.sleep(61)  # the cached target expires: ask the registry again
        assert await client.get_blob_range(REPO, DIGEST, 7, 3) == BLOB[7:10]
        assert fake.count(REGISTRY, "/blobs/") == 3
    # Presigned URLs are capabilities: no log line (ours or httpx's) shows their signature.
    assert STORAGE in caplog.text and "X-Signature" not in caplog.text


async def test_expired_presigned_url_is_resolved_again_once() -> None:
    fake = blob_fake(redirect_blobs=True)
    async with fake.client() as client:
        assert await client.get_blob_range(REPO, DIGEST, 0, 4) == BLOB[:4]
        fake.presigned.clear()  # every signature issued so far expires
        assert await client.get_blob_range(REPO, DIGEST, 10, 4) == BLOB[10:14]
        assert fake.count(REGISTRY, "/blobs/") == 2
        # Storage that keeps refusing fresh URLs: an auth error naming the storage host, not
        # quoting its body (S3 echoes the signature it rejected).
        echo = (
            b"<Error><Code>SignatureDoesNotMatch</Code><SignatureProvided>abc</SignatureProvided>"
        )
        fake.before = lambda r: httpx.Response(403, content=echo) if r.url.host == STORAGE else None
        with pytest.raises(AuthError, match=f"access denied .*from {STORAGE}") as info:
            await client.get_blob_range(REPO, DIGEST, 20, 4)
        assert "Signature" not in str(info.value)


async def test_same_origin_redirect_keeps_authorization() -> None:
    fake = blob_fake(auth="basic")

    def moved(request: httpx.Request) -> httpx.Response | None:
        path = request.url.path
        if path.startswith("/v2/app/blobs/") and request.headers.get("authorization"):
            return httpx.Response(307, headers={"Location": f"/moved/{DIGEST}"})
        if path.startswith("/moved/"):
            return fake._check_auth(request) or httpx.Response(200, content=BLOB[:50])
        return None

    fake.before = moved
    async with fake.client() as client:
        assert await client.get_blob_range(REPO, DIGEST, 0, 50) == BLOB[:50]


# --------------------------------------------------------------------------- ranges


async def test_200_instead_of_206_downloads_the_blob_once() -> None:
    fake = blob_fake(ranges=False)
    reads = [(0, 10), (250_000, 1000), (77, 7), (299_999, 1), (123_456, 65_536)]
    async with fake.client() as client:
        for offset, length in reads:
            assert (
                await client.get_blob_range(REPO, DIGEST, offset, length)
                == BLOB[offset : offset + length]
            )
        stats = client.blob_stats(REPO, DIGEST)
    # One probe answered 200 (closed unread), one verified download; the rest is local.
    assert stats.requests == 2
    assert stats.bytes == len(BLOB)
    assert sum(1 for r in fake.requests if "range" not in r.headers) == 1


async def test_200_instead_of_206_spills_big_blobs_to_an_anonymous_file(tmp_path: Path) -> None:
    fake = blob_fake(ranges=False)
    spill = TempSpill(max_memory=64 * 1024, directory=str(tmp_path))
    async with fake.client(spill=spill) as client:
        assert await client.get_blob_range(REPO, DIGEST, 299_000, 1000) == BLOB[299_000:]
        assert await client.get_blob_range(REPO, DIGEST, 1, 2) == BLOB[1:3]
        assert list(tmp_path.iterdir()) == []  # unlinked at once: nothing to clean up
        async with aclosing(client.stream_blob(REPO, DIGEST)) as chunks:
            assert b"".join([c async for c in chunks]) == BLOB  # replayed from the copy
    assert sum(1 for r in fake.requests if "range" not in r.headers) == 1


async def test_200_instead_of_206_concurrent_readers_share_one_download() -> None:
    fake = blob_fake(ranges=False)
    async with fake.client() as client:
        results: dict[int, bytes] = {}

        async def read(offset: int) -> None:
            results[offset] = await client.get_blob_range(REPO, DIGEST, offset, 999)

        async with trio.open_nursery() as nursery:
            for offset in range(0, 290_000, 29_000):
                nursery.start_soon(read, offset)
    assert all(data == BLOB[o : o + 999] for o, data in results.items()) and len(results) == 10
    assert sum(1 for r in fake.requests if "range" not in r.headers) == 1


async def test_200_instead_of_206_without_spill_reads_through() -> None:
    fake = blob_fake(ranges=False)
    big = random.Random(8).randbytes(3_000_000)
    digest = fake.add_blob(big)
    async with fake.client(spill=None) as client:
        for offset, length in [(100, 10), (2_000_000, 5000), (0, 1)]:
            assert (
                await client.get_blob_range(REPO, digest, offset, length)
                == big[offset : offset + length]
            )
        stats = client.blob_stats(REPO, digest)
    # Each read streamed from the start and stopped once it had its bytes: the three
    # together cost less than one whole download.
    assert stats.bytes < len(big)
    assert sum(1 for r in fake.requests if "range" in r.headers) == 1  # only the first probe


async def test_spilled_blob_is_verified() -> None:
    fake = blob_fake(ranges=False)
    fake.blobs[DIGEST] = BLOB[:-1] + b"\x00"  # corrupt storage
    async with fake.client() as client:
        with pytest.raises(DigestMismatchError, match=DIGEST):
            await client.get_blob_range(REPO, DIGEST, 5, 5)


async def test_range_outside_the_blob() -> None:
    fake = blob_fake()
    async with fake.client() as client:
        with pytest.raises(FormatError, match="outside"):
            await client.get_blob_range(REPO, DIGEST, len(BLOB) + 10, 5)
        assert await client.get_blob_range(REPO, DIGEST, 0, 1) == BLOB[:1]  # learns the size
        requests = len(fake.requests)
        with pytest.raises(FormatError, match="outside"):
            await client.get_blob_range(REPO, DIGEST, len(BLOB) - 2, 5)
        assert len(fake.requests) == requests  # known size: refused locally
        with pytest.raises(UsageError):
            await client.get_blob_range(REPO, DIGEST, -1, 5)
        assert await client.get_blob_range(REPO, DIGEST, 10, 0) == b""


async def test_multi_range_after_single_ranges_are_proven() -> None:
    fake = blob_fake()
    async with fake.client() as client:
        # Unproven: single ranges (one request each).
        assert await client.get_blob_ranges(REPO, DIGEST, SPANS) == expect(SPANS)
        assert not any("," in r.headers.get("range", "") for r in fake.requests)
        before = len(fake.requests)
        assert await client.get_blob_ranges(REPO, DIGEST, SPANS) == expect(SPANS)
        assert len(fake.requests) == before + 1  # one multipart/byteranges request


@pytest.mark.parametrize("refusal", ["416", "400", "200"])
async def test_multi_range_refusal_falls_back_to_single_ranges(refusal: str) -> None:
    fake = blob_fake(multirange=refusal)  # type: ignore[arg-type]
    async with fake.client() as client:
        assert await client.get_blob_range(REPO, DIGEST, 0, 1) == BLOB[:1]
        assert await client.get_blob_ranges(REPO, DIGEST, SPANS) == expect(SPANS)
        assert await client.get_blob_ranges(REPO, DIGEST, SPANS) == expect(SPANS)
    multi = [r for r in fake.requests if "," in r.headers.get("range", "")]
    assert len(multi) == 1  # tried once, then never again on this host


async def test_range_requests_ask_for_identity_encoding() -> None:
    fake = blob_fake()

    def gzip_only_if_allowed(request: httpx.Request) -> httpx.Response | None:
        if "range" in request.headers and request.headers.get("accept-encoding") != "identity":
            return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"zzz")
        return None

    fake.before = gzip_only_if_allowed
    async with fake.client() as client:
        assert await client.get_blob_range(REPO, DIGEST, 3, 3) == BLOB[3:6]


# --------------------------------------------------------------------------- bodies


async def test_stream_resumes_after_dropped_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = blob_fake(cut_bodies=2, cut_at=70_000)
    async with fake.client() as client, aclosing(client.stream_blob(REPO, DIGEST)) as chunks:
        data = b"".join([c async for c in chunks])
    assert data == BLOB
    ranges = [r.headers.get("range") for r in fake.requests]
    assert ranges == [None, "bytes=70000-", "bytes=140000-"]


async def test_stream_resume_without_range_support_skips(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = blob_fake(ranges=False, cut_bodies=1, cut_at=1000)
    async with fake.client() as client:
        assert await client.get_blob(REPO, DIGEST) == BLOB


async def test_range_body_cut_short_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    fake = blob_fake(cut_bodies=1, cut_at=100)
    async with fake.client() as client:
        assert await client.get_blob_range(REPO, DIGEST, 1000, 5000) == BLOB[1000:6000]
        assert client.stats.retries == 1


async def test_range_body_longer_than_asked_is_an_error() -> None:
    fake = blob_fake()
    fake.before = lambda r: (
        httpx.Response(
            206, headers={"Content-Range": f"bytes 10-13/{len(BLOB)}"}, content=BLOB[10:30]
        )
        if "/blobs/" in r.url.path
        else None
    )
    async with fake.client() as client:
        with pytest.raises(RegistryError, match="more bytes than announced"):
            await client.get_blob_range(REPO, DIGEST, 10, 4)


async def test_stream_verifies_and_offsets() -> None:
    fake = blob_fake()
    fake.blobs[DIGEST] = BLOB[:-1] + b"!"
    async with fake.client() as client:
        received = bytearray()
        with pytest.raises(DigestMismatchError):
            async with aclosing(client.stream_blob(REPO, DIGEST)) as chunks:
                async for chunk in chunks:
                    received += chunk
        assert bytes(received) == BLOB[:-1] + b"!"  # mismatch reported after the last chunk
        fake.blobs[DIGEST] = BLOB
        async with aclosing(client.stream_blob(REPO, DIGEST, offset=299_000, verify=False)) as c:
            assert b"".join([x async for x in c]) == BLOB[299_000:]
        with pytest.raises(UsageError, match="verify=False"):
            async with aclosing(client.stream_blob(REPO, DIGEST, offset=5, verify=True)) as c:
                await c.__anext__()
        with pytest.raises(FormatError, match="larger than 1000"):
            await client.get_blob(REPO, DIGEST, max_size=1000)
        assert await client.head_blob(REPO, DIGEST) == len(BLOB)


async def test_host_concurrency_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    fake = blob_fake()
    in_flight = peak = 0

    async def slow(request: httpx.Request) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await trio.sleep(1)
        in_flight -= 1

    fake.before = slow
    results: dict[int, bytes] = {}
    async with fake.client(max_per_host=3) as client:

        async def read(i: int) -> None:
            results[i] = await client.get_blob_range(REPO, DIGEST, i * 1000, 10)

        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(read, i)
    assert peak == 3
    assert all(results[i] == BLOB[i * 1000 : i * 1000 + 10] for i in range(12))


async def test_blob_source_reads_and_counts() -> None:
    fake = blob_fake()
    async with fake.client() as client:
        source = RegistryBlobSource(client, REPO, DIGEST, len(BLOB))
        assert source.size == len(BLOB)
        assert await source.read_at(10, 20) == BLOB[10:30]
        assert await source.read_ranges([(0, 3), (5, 3)]) == [BLOB[0:3], BLOB[5:8]]
        assert await source.read_ranges([(0, 3), (5, 3)]) == [BLOB[0:3], BLOB[5:8]]
        # One single range proved range support: each read_ranges is one multi-range request.
        assert source.stats.requests == 3
        assert source.stats.bytes > 20 + 6 + 6  # multipart framing is traffic too
        requests = len(fake.requests)
        with pytest.raises(FormatError, match="outside"):
            await source.read_at(len(BLOB) - 1, 2)
        assert len(fake.requests) == requests


# --------------------------------------------------------------------------- listings


async def test_tags_follow_link_pagination() -> None:
    fake = blob_fake()
    all_tags = [f"t{i}" for i in range(7)]

    def paged(request: httpx.Request) -> httpx.Response | None:
        if not request.url.path.endswith("/tags/list"):
            return None
        n = int(request.url.params.get("n", "100"))
        last = request.url.params.get("last")
        start = all_tags.index(last) + 1 if last else 0
        page = all_tags[start : start + n]
        headers = {}
        if start + n < len(all_tags):
            headers["Link"] = f'</v2/app/tags/list?n={n}&last={page[-1]}>; rel="next"'
        return httpx.Response(200, headers=headers, json={"name": "app", "tags": page})

    fake.before = paged
    async with fake.client() as client:
        assert await client.list_tags(REPO, page_size=3) == all_tags
        assert await client.catalog(REGISTRY) == ["app"]
    assert fake.count(REGISTRY, "/tags/list") == 3


async def test_tags_self_link_does_not_loop_and_null_tags() -> None:
    fake = blob_fake()
    fake.before = lambda r: httpx.Response(
        200, headers={"Link": '</v2/app/tags/list>; rel="next"'}, json={"tags": None}
    )
    async with fake.client() as client:
        assert await client.list_tags(REPO) == []
    assert len(fake.requests) == 1


# --------------------------------------------------------------------------- endpoints


def test_plain_http_only_for_loopback_or_insecure() -> None:
    resolver = EndpointResolver(insecure=["corp.example:5000"])
    cases = {
        "localhost:5000": "http",
        "localhost": "http",
        "127.0.0.1:5000": "http",
        "127.9.9.9": "http",
        "[::1]:5000": "http",
        "corp.example:5000": "http",
        "corp.example": "https",
        "example.com": "https",
        "128.0.0.1": "https",
    }
    for host, scheme in cases.items():
        assert resolver.upstream(Repository(host, "x")).scheme == scheme, host
    hub = resolver.upstream(parse_reference("nginx").repo)
    assert hub.base_url == "https://registry-1.docker.io"


def test_mirror_option_and_registries_conf(tmp_path: Path) -> None:
    assert parse_mirror_option(["docker.io=mirror.gcr.io", "index.docker.io=http://m2/x"]) == {
        "docker.io": ["mirror.gcr.io", "http://m2/x"]
    }
    with pytest.raises(UsageError, match="REGISTRY=MIRROR"):
        parse_mirror_option(["nonsense"])
    conf = parse_registries_conf(
        """
        unqualified-search-registries = ["docker.io"]
        [[registry]]
        location = "docker.io"
        [[registry.mirror]]
        location = "mirror.corp/dockerhub"
        [[registry.mirror]]
        location = "digests.corp"
        pull-from-mirror = "digest-only"
        insecure = true

        [[registry]]
        prefix = "quay.io/team"
        location = "internal.corp:5000/quay-team"

        [[registry]]
        prefix = "evil.io"
        blocked = true
        """,
        tmp_path / "registries.conf",
    )
    resolver = EndpointResolver(mirrors={"docker.io": ["first.corp"]}, registries=conf)
    hub = parse_reference("nginx").repo
    tag_pull = resolver.pull_endpoints(hub, by_digest=False)
    assert [(e.base_url, e.repo_path(hub.path)) for e in tag_pull] == [
        ("https://first.corp", "library/nginx"),
        ("https://mirror.corp", "dockerhub/library/nginx"),
        ("https://registry-1.docker.io", "library/nginx"),
    ]
    digest_pull = resolver.pull_endpoints(hub, by_digest=True)
    assert ("http://digests.corp", "library/nginx") in [
        (e.base_url, e.repo_path(hub.path)) for e in digest_pull
    ]
    quay = Repository("quay.io", "team/app")
    upstream = resolver.upstream(quay)
    assert (upstream.base_url, upstream.repo_path(quay.path)) == (
        "https://internal.corp:5000",
        "quay-team/app",
    )
    with pytest.raises(UsageError, match="blocked"):
        resolver.upstream(Repository("evil.io", "x"))
    with pytest.raises(UsageError, match="not valid TOML"):
        parse_registries_conf("[[registry]\n", tmp_path / "bad.conf")
    path = tmp_path / "env.conf"
    path.write_text('[[registry]]\nlocation = "a.io"\ninsecure = true\n')
    [loaded] = load_registries_conf(env={"CONTAINERS_REGISTRIES_CONF": str(path)})
    assert loaded.insecure and loaded.prefix == "a.io"
    assert load_registries_conf(env={"CONTAINERS_REGISTRIES_CONF": str(tmp_path / "none")}) == []


async def test_mirror_tried_first_then_upstream() -> None:
    fake = blob_fake()
    mirror_hits: list[str] = []

    def mirror(request: httpx.Request) -> httpx.Response | None:
        if request.url.host != "mirror.test":
            return None
        mirror_hits.append(request.url.path)
        if request.url.path.endswith("/manifests/v1"):
            return httpx.Response(
                200,
                headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
                content=MANIFEST,
            )
        return httpx.Response(404, content=error_body("BLOB_UNKNOWN", "not cached"))

    fake.before = mirror
    async with fake.client(mirrors={REGISTRY: ["mirror.test"]}) as client:
        assert (await client.get_manifest(parse_reference(f"{REGISTRY}/app:v1"))).data == MANIFEST
        assert fake.count(REGISTRY, "/manifests/") == 0  # the mirror served it
        for offset in (0, 10, 20):
            assert await client.get_blob_range(REPO, DIGEST, offset, 5) == BLOB[offset : offset + 5]
        with pytest.raises(NotFoundError, match="MANIFEST_UNKNOWN"):  # upstream's error
            await client.get_manifest(parse_reference(f"{REGISTRY}/app:gone"))
    # The blob was missing on the mirror once; later reads went straight upstream.
    assert sum(1 for p in mirror_hits if "/blobs/" in p) == 1
    assert fake.count(REGISTRY, "/blobs/") == 3


# --------------------------------------------------------------------------- helpers


def test_content_range_and_multipart_parsing() -> None:
    assert parse_content_range("bytes 0-9/100") is not None
    cr = parse_content_range("bytes 10-19/*")
    assert cr is not None and (cr.first, cr.length, cr.total) == (10, 10, None)
    for bad in ("bytes 9-0/100", "bytes 0-100/100", "items 0-1/2", "bytes */100", None):
        assert parse_content_range(bad) is None
    # A part whose data contains the boundary string: lengths, not scanning, delimit parts.
    boundary = "XYZ"
    data = b"--XYZ\r\nnot a real boundary"
    body = (
        b"\r\n--XYZ\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Range: bytes 5-"
        + str(4 + len(data)).encode()
        + b"/1000\r\n\r\n"
        + data
        + b"\r\n--XYZ\r\ncontent-range: bytes 900-901/1000\r\n\r\nab\r\n--XYZ--\r\n"
    )
    parts = parse_multipart_byteranges(body, boundary)
    assert parts == [Part(5, data), Part(900, b"ab")]
    assert slice_from_parts(parts, 6, 3) == data[1:4]
    with pytest.raises(FormatError):
        slice_from_parts(parts, 100, 1)
    with pytest.raises(FormatError, match="truncated"):
        parse_multipart_byteranges(body[:60], boundary)


def test_retry_after_forms() -> None:
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    delay = parse_retry_after(later)
    assert delay is not None and 25 < delay <= 30


# --------------------------------------------------------------------------- real registries


def fixture_blob(fixtures_dir: Path, digest: str) -> bytes:
    return (fixtures_dir / "oci-image" / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()


def docker_config_env(tmp_path: Path, reg: Registry) -> dict[str, str]:
    """Credentials in a temporary ``$DOCKER_CONFIG/config.json`` (nothing from the user)."""
    config: dict[str, object] = {"auths": {}}
    if reg.username is not None and reg.password is not None:
        import base64

        auth = base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()
        config = {"auths": {reg.host: {"auth": auth}}}
    write_json(tmp_path / "docker" / "config.json", config)
    return {"HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path / "docker")}


def helper_env(tmp_path: Path, reg: Registry) -> dict[str, str]:
    """Credentials from a ``docker-credential-test`` helper on ``PATH``."""
    store = fake_helper(tmp_path / "bin", "test")
    write_json(store, {reg.host: {"Username": reg.username, "Secret": reg.password}})
    write_json(tmp_path / "docker" / "config.json", {"credHelpers": {reg.host: "test"}})
    return {
        "HOME": str(tmp_path),
        "DOCKER_CONFIG": str(tmp_path / "docker"),
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
    }


async def check_image(reg: Registry, env: dict[str, str], fixtures_dir: Path, repo: str) -> None:
    ref = parse_reference(reg.push_oci(fixtures_dir / "oci-image", "v1", f"{repo}:v1"))
    async with RegistryClient(credentials=CredentialResolver(env=env), registries=[]) as client:
        image = await resolve_image(client, ref, Platform.parse("linux/amd64"))
        assert image.digest == FIXTURE_MANIFEST_DIGEST
        fixture = json.loads((fixtures_dir / "basic.json").read_text())
        assert image.config.diff_ids[0] == fixture["diff_id"]
        layer = image.manifest.layers[0]
        blob = fixture_blob(fixtures_dir, layer.digest)
        source = RegistryBlobSource(client, ref.repo, layer.digest, layer.size)
        assert await source.read_at(1234, 4321) == blob[1234 : 1234 + 4321]
        assert await source.read_at(len(blob) - 51, 51) == blob[-51:]  # the footer
        spans = [(0, 100), (10_000, 50), (len(blob) - 10, 10)]
        assert await source.read_ranges(spans) == [blob[o : o + n] for o, n in spans]
        assert await client.head_blob(ref.repo, layer.digest) == len(blob)
        assert await client.get_blob(ref.repo, layer.digest) == blob
        assert "v1" in await client.list_tags(ref.repo)


async def test_real_open_registry(registry: Registry, fixtures_dir: Path, tmp_path: Path) -> None:
    await check_image(registry, docker_config_env(tmp_path, registry), fixtures_dir, "client/open")


async def test_real_basic_registry_docker_config(
    registry_basic: Registry, fixtures_dir: Path, tmp_path: Path
) -> None:
    env = docker_config_env(tmp_path, registry_basic)
    await check_image(registry_basic, env, fixtures_dir, "client/basic-config")


async def test_real_basic_registry_credential_helper(
    registry_basic: Registry, fixtures_dir: Path, tmp_path: Path
) -> None:
    env = helper_env(tmp_path, registry_basic)
    await check_image(registry_basic, env, fixtures_dir, "client/basic-helper")


async def test_real_token_registry_docker_config(
    registry_token: Registry, fixtures_dir: Path, tmp_path: Path
) -> None:
    env = docker_config_env(tmp_path, registry_token)
    await check_image(registry_token, env, fixtures_dir, "client/token-config")


async def test_real_token_registry_credential_helper(
    registry_token: Registry, fixtures_dir: Path, tmp_path: Path
) -> None:
    env = helper_env(tmp_path, registry_token)
    await check_image(registry_token, env, fixtures_dir, "client/token-helper")


async def test_real_registry_honours_proxy_environment(
    fixture_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = parse_reference(fixture_image)
    creds = CredentialResolver(env={}, use_files=False)
    # A proxy that does not exist: requests through it fail...
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    policy = RetryPolicy(max_attempts=1)
    async with RegistryClient(credentials=creds, registries=[], retry=policy) as client:
        with pytest.raises(RegistryError):
            await client.get_manifest(ref)
    # ...unless NO_PROXY exempts the registry.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with RegistryClient(credentials=creds, registries=[], retry=policy) as client:
        assert (await client.get_manifest(ref)).digest == FIXTURE_MANIFEST_DIGEST


async def test_plain_http_registry_never_builds_the_tls_transport(fixture_image: str) -> None:
    """Its CA bundle costs ~0.2 s of every command's start: a plain-HTTP registry (local,
    loopback) never needs it, so it is built only for the first https:// request."""
    from stargzfs.registry.client import _LazyTransport

    ref = parse_reference(fixture_image)
    creds = CredentialResolver(env={}, use_files=False)
    async with RegistryClient(credentials=creds, registries=[]) as client:
        assert (await client.get_manifest(ref)).digest == FIXTURE_MANIFEST_DIGEST
        lazy = [t for t in client._http._mounts.values() if isinstance(t, _LazyTransport)]
        assert len(lazy) == 1 and lazy[0]._inner is None


async def test_real_registry_errors(
    registry_basic: Registry, fixture_image: str, tmp_path: Path
) -> None:
    ref = parse_reference(fixture_image)
    bad = CredentialResolver({registry_basic.host: Credentials("stargzfs-tester", "wrong")}, env={})
    secret_ref = parse_reference(registry_basic.ref("nothing/here:v1"))
    async with RegistryClient(credentials=bad, registries=[]) as client:
        with pytest.raises(AuthError) as info:
            await client.get_manifest(secret_ref)
        assert "explicit credentials were not accepted" in str(info.value)
        assert "wrong" not in str(info.value)
    async with RegistryClient(credentials=CredentialResolver(env={}), registries=[]) as client:
        with pytest.raises(NotFoundError, match="MANIFEST_UNKNOWN"):
            await client.get_manifest(ref.with_tag("missing"))
        with pytest.raises(NotFoundError, match="BLOB_UNKNOWN"):
            await client.get_blob_range(ref.repo, sha256(b"nope"), 0, 1)


async def expiry_run(reg: Registry, fixtures_dir: Path, tmp_path: Path, pause: float) -> int:
    """Read a layer, pause past the token's life, read again; return tokens issued."""
    assert reg.token_server is not None
    ref = parse_reference(reg.push_oci(fixtures_dir / "oci-image", "v1", "client/expiry:v1"))
    env = docker_config_env(tmp_path, reg)
    async with RegistryClient(credentials=CredentialResolver(env=env), registries=[]) as client:
        image = await resolve_image(client, ref, Platform.parse("linux/amd64"))
        layer = image.manifest.layers[1]
        blob = fixture_blob(fixtures_dir, layer.digest)
        source = RegistryBlobSource(client, ref.repo, layer.digest, layer.size)
        issued = reg.token_server.issued
        assert await source.read_at(0, 100) == blob[:100]
        await trio.sleep(pause)
        assert await source.read_at(100, 100) == blob[100:200]
        return reg.token_server.issued - issued


@pytest.mark.slow
async def test_real_token_expiry_refreshes_before_use(
    registry_factory: RegistryFactory, fixtures_dir: Path, tmp_path: Path
) -> None:
    reg = registry_factory(auth="token", token_expires_in=2)
    assert await expiry_run(reg, fixtures_dir, tmp_path, 2.5) == 1


@pytest.mark.slow
async def test_real_token_revoked_early_is_refreshed_on_401(
    registry_factory: RegistryFactory, fixtures_dir: Path, tmp_path: Path
) -> None:
    reg = registry_factory(auth="token", token_expires_in=60)
    assert reg.token_server is not None
    # Advertise 60 s but let the registry refuse the token after ~2 s: only a 401 can tell.
    reg.token_server.registry_leeway = 60 + 60 - 2
    assert await expiry_run(reg, fixtures_dir, tmp_path, 3.5) == 1
