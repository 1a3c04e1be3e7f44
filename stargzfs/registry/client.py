"""The async registry client: manifests, tags, catalog, and blobs read whole or by range.

One :class:`RegistryClient` per process (per ``trio.run``) and share it: it owns one
``httpx.AsyncClient`` (HTTP/2 over TLS, pooled connections), the token cache, and what it has
learnt about each blob (its redirect target, whether ranges work, a local copy).

Behaviour worth knowing (see ``formats.md`` "Registry protocol quirks"):

- **Retries**: connection errors, timeouts, bodies cut short, ``429`` (after ``Retry-After``)
  and ``5xx`` are retried with exponential backoff and jitter (:class:`RetryPolicy`); other
  ``4xx`` never are. Errors map onto :mod:`stargzfs.errors`; the registry's JSON error code
  and message are quoted; credentials never are.
- **Redirects** are followed by hand: the registry's ``Authorization`` header goes to the
  registry's own origin only, never to the object store a blob GET redirects to. A blob's
  redirect target is cached for ``redirect_ttl`` seconds; a ``401/403/404/410`` from it means
  "expired": the registry is asked again, once.
- **Ranges**: every range GET sends ``Accept-Encoding: identity``. When a registry answers a
  partial range with ``200`` and the whole blob, the client remembers that for the blob and
  downloads it **once** (verified) through the ``spill`` hook (default: memory for small blobs,
  an unlinked temp file for big ones); every later range of that blob is served locally. With
  ``spill=None`` it instead streams each read from the start, discarding up to the offset.
  Multi-range requests are only tried once single ranges are proven for the blob, and never
  again on a host that refused one (``400``/``416``/``200``): single ranges are used then.
- **Concurrency** per registry host is bounded by a ``trio.CapacityLimiter`` (one slot per
  request, held while its body is read; an open :meth:`RegistryClient.stream_blob` holds one).
- **Endpoints**: plain HTTP only for loopback hosts or hosts in ``insecure``; proxies from the
  environment (``HTTP(S)_PROXY``, ``NO_PROXY``); mirrors tried in order before the upstream for
  pulls (see :mod:`.endpoints`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import urllib.request
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import httpx
import trio

from .. import __version__
from .._groups import first_error
from ..errors import (
    AuthError,
    DigestMismatchError,
    FormatError,
    IntegrityError,
    NotFoundError,
    RegistryError,
    StargzfsError,
    UnsupportedError,
    UsageError,
)
from ..reference import Reference, Repository, new_hasher, validate_digest
from ..source import ByteSource, check_range
from .auth import Authenticator, AuthTarget
from .credentials import CredentialResolver, Credentials
from .endpoints import Endpoint, EndpointResolver, RegistryConfig, load_registries_conf
from .ranges import (
    Part,
    boundary_of,
    parse_content_range,
    parse_multipart_byteranges,
    range_header,
    slice_from_parts,
)
from .retry import (
    Failure,
    RetryBudget,
    RetryPolicy,
    Transient,
    describe_transport_error,
    is_transient,
    parse_retry_after,
)
from .spill import SpillFactory, TempSpill

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MANIFEST_MEDIA_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "BlobStats",
    "ClientStats",
    "ManifestHead",
    "ManifestResponse",
    "RegistryClient",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_MEDIA_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)

# containers/image and containerd refuse manifests above 4 MiB; so do we.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MAX_ERROR_BODY = 64 * 1024
MAX_JSON_PAGE = 16 * 1024 * 1024
MAX_REDIRECTS = 10
MAX_RANGES_PER_REQUEST = 16
MAX_PAGES = 100_000
# Hash inline below this; above, a worker thread (hashlib releases the GIL for big inputs).
_THREAD_HASH_MIN = 1024 * 1024
# Chunk size when replaying a spilled (local) blob as a stream.
_STREAM_CHUNK = 256 * 1024

DEFAULT_TIMEOUT = httpx.Timeout(connect=30.0, read=60.0, write=60.0, pool=120.0)
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_NOT_FOUND_CODES = frozenset({"MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN"})
# What an expired presigned URL (or a storage node that lost the object) answers.
_STALE_REDIRECT_STATUSES = frozenset({401, 403, 404, 410})


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ManifestResponse:
    """A manifest or index as served: its exact bytes, media type, and digest of the bytes."""

    data: bytes
    media_type: str
    digest: str


@dataclass(frozen=True)
class ManifestHead:
    """What a ``HEAD`` on a manifest tells (registries may omit the digest header)."""

    media_type: str | None
    digest: str | None
    size: int | None


@dataclass
class BlobStats:
    """Network traffic for one blob: HTTP requests sent and body bytes received."""

    requests: int = 0
    bytes: int = 0


@dataclass
class ClientStats:
    requests: int = 0
    bytes: int = 0
    retries: int = 0


@dataclass
class _Blob:
    """What the client has learnt about one blob of one repository."""

    repo: Repository
    digest: str
    endpoint: Endpoint | None = None
    redirect_url: str | None = None
    redirect_expires: float = 0.0
    ranges: bool | None = None  # None: unknown; True: a 206 was seen; False: 200 instead
    size: int | None = None
    local: ByteSource | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)
    stats: BlobStats = field(default_factory=BlobStats)


class _NoRanges(Exception):
    """The blob's registry answered a partial range with the whole blob."""


class _RangeRefused(Exception):
    """400/416 to a range request (for multi-range: fall back to single ranges)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


# --------------------------------------------------------------------------- helpers


def _redact(url: httpx.URL | str) -> str:
    """A URL for messages: presigned object-store URLs carry signatures in the query."""
    u = httpx.URL(str(url))
    return f"{u.scheme}://{u.netloc.decode('ascii')}{u.path}"


class _RedactQueries(logging.Filter):
    """httpx logs every request's full URL at INFO: drop query strings (presigned object-store
    URLs carry their signatures there) before ``--verbose`` prints them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) for a in record.args):
            record.args = tuple(_redact(a) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


logging.getLogger("httpx").addFilter(_RedactQueries())


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.scheme, url.host, port


def _media_type(headers: httpx.Headers) -> str | None:
    value = headers.get("content-type")
    return value.split(";", 1)[0].strip().lower() if value else None


def _registry_error(body: bytes) -> tuple[str | None, str]:
    """The registry's ``{"errors": [{"code", "message"}]}`` as (first code, one line)."""
    try:
        data = json.loads(body)
        errors = data["errors"]
        items = [e for e in errors if isinstance(e, dict)]
    except (ValueError, KeyError, TypeError):
        text = body.decode(errors="replace").strip().splitlines()
        return None, text[0][:200] if text else ""
    code = next((str(e["code"]) for e in items if e.get("code")), None)
    lines = []
    for e in items:
        msg = str(e.get("message", "")).strip()
        lines.append(f"{e.get('code', 'ERROR')}: {msg}" if msg else str(e.get("code", "ERROR")))
    return code, "; ".join(lines)[:500]


async def _read_limited(resp: httpx.Response, limit: int, what: str) -> bytes:
    body = bytearray()
    async for chunk in resp.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise FormatError(f"{what}: response larger than {limit} bytes")
    return bytes(body)


def _check_digest(hasher: hashlib._Hash, digest: str, what: str) -> None:
    actual = f"{hasher.name}:{hasher.hexdigest()}"
    if actual != digest:
        raise DigestMismatchError(what, digest, actual)


class _StreamHasher:
    """Hashes a body as it streams. Network chunks are small; they are batched so the hashing
    runs in a worker thread a megabyte at a time instead of on the event loop."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self._hasher = new_hasher(digest)
        self._pending: list[bytes] = []
        self._size = 0

    async def update(self, data: bytes) -> None:
        self._pending.append(data)
        self._size += len(data)
        if self._size >= _THREAD_HASH_MIN:
            await self._flush()

    async def _flush(self) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        self._size = 0
        if len(data) >= _THREAD_HASH_MIN:
            await trio.to_thread.run_sync(self._hasher.update, data)
        else:
            self._hasher.update(data)

    async def verify(self, what: str) -> None:
        """Raise :class:`DigestMismatchError` unless everything fed matches the digest."""
        await self._flush()
        _check_digest(self._hasher, self.digest, what)


# --------------------------------------------------------------------------- the client


class _LazyTransport(httpx.AsyncBaseTransport):
    """A transport built on its first request (see :class:`RegistryClient`'s TLS mount)."""

    def __init__(self, make: Callable[[], httpx.AsyncBaseTransport]) -> None:
        self._make = make
        self._inner: httpx.AsyncBaseTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._inner is None:
            self._inner = self._make()
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        if self._inner is not None:
            await self._inner.aclose()


class RegistryClient:
    """Talks to OCI distribution registries. Use as ``async with RegistryClient() as c``.

    :param credentials: a :class:`CredentialResolver`, or explicit credentials per registry
        name (``docker.io`` for Hub) looked up before the usual files.
    :param insecure: registry hosts to reach over plain HTTP (loopback hosts always are).
    :param mirrors: registry name → mirror locations (``host[/path]``), tried before it.
    :param registries: ``registries.conf`` tables; ``None`` reads the system's file.
    :param spill: where a blob goes when its registry cannot serve ranges (see module doc);
        ``"temp"`` is :class:`TempSpill`, ``None`` streams-and-discards instead.
    :param redirect_ttl: seconds a blob's redirect target is reused.
    :param transport: an ``httpx`` transport (tests use ``httpx.MockTransport``).
    """

    def __init__(
        self,
        *,
        credentials: CredentialResolver | Mapping[str, Credentials] | None = None,
        insecure: Iterable[str] = (),
        mirrors: Mapping[str, Sequence[str]] | None = None,
        registries: Sequence[RegistryConfig] | None = None,
        retry: RetryPolicy | None = None,
        max_per_host: int = 8,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        spill: SpillFactory | Literal["temp"] | None = "temp",
        redirect_ttl: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if isinstance(credentials, CredentialResolver):
            self.credentials = credentials
        else:
            self.credentials = CredentialResolver(credentials)
        self._endpoints = EndpointResolver(
            mirrors=mirrors,
            insecure=insecure,
            registries=load_registries_conf() if registries is None else registries,
        )
        self._retry = retry or RetryPolicy()
        self._rng = rng or random.Random()
        self._max_per_host = max_per_host
        self._limiters: dict[str, trio.CapacityLimiter] = {}
        self._temp_spill: TempSpill | None = None
        self._spill: SpillFactory | None
        if spill == "temp":
            self._temp_spill = self._spill = TempSpill()
        else:
            self._spill = spill
        self._redirect_ttl = redirect_ttl
        self._blobs: dict[tuple[Repository, str], _Blob] = {}
        self._multirange: dict[str, bool] = {}
        self.stats = ClientStats()
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        mounts: dict[str, httpx.AsyncBaseTransport] | None = None
        if transport is None and not urllib.request.getproxies():
            # Without proxies to honour, plain HTTP and TLS get transports of their own, and
            # the TLS one is built on first use: its CA bundle costs ~0.2 s of every start,
            # which a plain-HTTP (local) registry never needs.
            transport = httpx.AsyncHTTPTransport(limits=limits, verify=False)
            mounts = {
                "https://": _LazyTransport(
                    lambda: httpx.AsyncHTTPTransport(
                        http2=True, limits=limits, verify=True, trust_env=True
                    )
                )
            }
        self._http = httpx.AsyncClient(
            http2=True,
            timeout=timeout,
            follow_redirects=False,
            limits=limits,
            headers={"User-Agent": f"stargzfs/{__version__}", "Accept-Encoding": "identity"},
            transport=transport,
            mounts=mounts,
            trust_env=True,
        )
        self._auth = Authenticator(self.credentials, self._send_unauthenticated)

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._temp_spill is not None:
            self._temp_spill.close()

    @property
    def tokens_fetched(self) -> int:
        return self._auth.tokens_fetched

    # ------------------------------------------------------------------ plumbing

    def _limiter(self, host: str) -> trio.CapacityLimiter:
        limiter = self._limiters.get(host)
        if limiter is None:
            limiter = self._limiters[host] = trio.CapacityLimiter(self._max_per_host)
        return limiter

    async def _send_once(
        self, method: str, url: httpx.URL | str, headers: Mapping[str, str], stats: BlobStats | None
    ) -> httpx.Response:
        request = self._http.build_request(method, url, headers=dict(headers))
        response = await self._http.send(request, stream=True, follow_redirects=False)
        self.stats.requests += 1
        if stats is not None:
            stats.requests += 1
        log.debug(
            "%s %s → %d (%s)",
            method,
            _redact(request.url),
            response.status_code,
            response.http_version,
        )
        return response

    async def _send_unauthenticated(self, request: httpx.Request) -> httpx.Response:
        """For token endpoints: retried like everything else, body read, no registry auth."""

        async def attempt() -> httpx.Response:
            response = await self._http.send(request, follow_redirects=True)
            self.stats.requests += 1
            if response.status_code == 429 or response.status_code >= 500:
                _, detail = _registry_error(response.content)
                raise Transient(
                    Failure(
                        f"HTTP {response.status_code} {detail}".strip(),
                        response.status_code,
                        retry_after=parse_retry_after(response.headers.get("retry-after")),
                    )
                )
            return response

        return await self._retrying(f"token request to {_redact(request.url)}", attempt)

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        budget = RetryBudget(self._retry, what, self._rng)
        while True:
            try:
                return await attempt()
            except Transient as t:
                failure = t.failure
            except httpx.TransportError as e:
                if not is_transient(e):
                    raise RegistryError(f"{what}: {describe_transport_error(e)}") from None
                failure = Failure(f"{type(e).__name__}: {e or 'connection failed'}")
            log.debug("%s: %s; retrying", what, failure.detail)
            await budget.wait(failure)
            self.stats.retries += 1

    async def _exchange(
        self,
        target: AuthTarget,
        base: httpx.URL,
        scopes: tuple[str, ...],
        method: str,
        url: httpx.URL,
        headers: Mapping[str, str],
        stats: BlobStats | None = None,
    ) -> httpx.Response:
        """One logical request: registry auth, redirects by hand, one re-auth on 401.

        The response is open (streaming); the caller closes it.
        """
        authorization = await self._auth.authorization(target, scopes)
        reauthed = False
        hops = 0
        current, current_method = url, method
        while True:
            send_headers = dict(headers)
            same_origin = _origin(current) == _origin(base)
            # The registry's credentials stay with the registry: never to an object store.
            if authorization is not None and same_origin:
                send_headers["Authorization"] = authorization
            response = await self._send_once(current_method, current, send_headers, stats)
            location = response.headers.get("location")
            if response.status_code in _REDIRECT_STATUSES and location:
                await response.aclose()
                hops += 1
                if hops > MAX_REDIRECTS:
                    raise RegistryError(f"{_redact(url)}: more than {MAX_REDIRECTS} redirects")
                current = response.url.join(location)
                if response.status_code == 303 and current_method != "HEAD":
                    current_method = "GET"
                continue
            if (
                response.status_code == 401
                and same_origin
                and not reauthed
                and await self._auth.on_unauthorized(target, scopes, response, authorization)
            ):
                await response.aclose()
                authorization = await self._auth.authorization(target, scopes)
                reauthed = True
                current, current_method, hops = url, method, 0
                continue
            return response

    async def _check(
        self,
        response: httpx.Response,
        what: str,
        target: AuthTarget | None,
        *,
        ok: Iterable[int] = (200,),
        range_request: bool = False,
    ) -> None:
        """Return if the status is in ``ok``; else close the response and raise."""
        status = response.status_code
        if status in ok:
            return
        try:
            body = await _read_limited(response, MAX_ERROR_BODY, what)
        except (FormatError, httpx.TransportError):
            body = b""
        finally:
            await response.aclose()
        code, message = _registry_error(body)
        # Say so when the object store behind a redirect failed, not the registry; and do
        # not quote its free-form errors (S3 echoes the signature it rejected).
        netloc = response.url.netloc.decode("ascii")
        foreign = target is not None and netloc != target.host
        where = f" from {netloc}" if foreign else ""
        if foreign and code is None:
            message = ""
        detail = f"HTTP {status}" + (f" ({message})" if message else "")
        if status == 429 or status >= 500:
            raise Transient(
                Failure(
                    detail + where,
                    status,
                    code,
                    parse_retry_after(response.headers.get("retry-after")),
                )
            )
        if range_request and status in (400, 416):
            raise _RangeRefused(status)
        if status == 404 or code in _NOT_FOUND_CODES:
            raise NotFoundError(f"{what} not found ({detail}{where})")
        if status == 403 or (status == 401 and foreign):
            raise AuthError(f"{what}: access denied ({detail}{where})")
        if status == 401:
            why = await self._auth.describe_failure(target) if target is not None else ""
            raise AuthError(f"{what}: authentication required ({detail}{where}); {why}".rstrip())
        if status == 405 or code == "UNSUPPORTED":
            raise UnsupportedError(f"{what}: not supported by the registry ({detail})")
        raise RegistryError(f"{what}: {detail}{where}", status=status, code=code)

    @asynccontextmanager
    async def _open_api(
        self,
        ep: Endpoint,
        repo_path: str | None,
        scopes: tuple[str, ...],
        method: str,
        url: httpx.URL,
        headers: Mapping[str, str],
        what: str,
        ok: Iterable[int] = (200,),
    ) -> AsyncIterator[httpx.Response]:
        """One attempt at an API request, holding a host slot until the body is read."""
        target = AuthTarget(ep.host, ep.registry, repo_path)
        async with self._limiter(ep.host):
            response = await self._exchange(
                target, httpx.URL(ep.base_url), scopes, method, url, headers
            )
            try:
                await self._check(response, what, target, ok=ok)
                yield response
            finally:
                await response.aclose()

    async def _pull(
        self, repo: Repository, by_digest: bool, what: str, fn: Callable[[Endpoint], Awaitable[T]]
    ) -> T:
        """Try ``fn`` at each mirror, then the upstream (whose error is the one raised)."""
        for ep in self._endpoints.pull_endpoints(repo, by_digest=by_digest):
            try:
                return await fn(ep)
            except (StargzfsError, _NoRanges) as e:
                if not ep.mirror or isinstance(e, _NoRanges | UsageError):
                    raise
                log.info("mirror %s could not serve %s (%s); trying the next", ep, what, e)
        raise AssertionError("unreachable: the upstream endpoint comes last")

    # ------------------------------------------------------------------ manifests

    def _manifest_url(self, ep: Endpoint, ref: Reference) -> httpx.URL:
        path = ep.repo_path(ref.repository)
        return httpx.URL(f"{ep.base_url}/v2/{path}/manifests/{ref.selector}")

    async def get_manifest(
        self, ref: Reference, *, accept: Sequence[str] = MANIFEST_MEDIA_TYPES
    ) -> ManifestResponse:
        """Fetch a manifest or index by tag or digest.

        Verifies the bytes against ``ref.digest`` when there is one (the
        ``Docker-Content-Digest`` header is not trusted: too many registries get it wrong).

        :raises NotFoundError: no such repository, tag or digest.
        :raises AuthError: credentials missing or refused.
        :raises DigestMismatchError: the bytes do not match ``ref.digest``.
        :raises FormatError: larger than 4 MiB.
        :raises RegistryError: network or server failure after retries.
        """
        what = f"manifest {ref}"

        async def at(ep: Endpoint) -> ManifestResponse:
            path = ep.repo_path(ref.repository)
            scopes = (f"repository:{path}:pull",)
            url = self._manifest_url(ep, ref)

            async def attempt() -> tuple[bytes, str | None]:
                headers = {"Accept": ", ".join(accept)}
                async with self._open_api(ep, path, scopes, "GET", url, headers, what) as resp:
                    data = await _read_limited(resp, MAX_MANIFEST_SIZE, what)
                    return data, _media_type(resp.headers)

            data, media_type = await self._retrying(what, attempt)
            if ref.digest is not None:
                hasher = new_hasher(ref.digest)
                hasher.update(data)
                _check_digest(hasher, ref.digest, what)
                digest = ref.digest
            else:
                digest = "sha256:" + hashlib.sha256(data).hexdigest()
            return ManifestResponse(data, _sniff_media_type(data, media_type), digest)

        return await self._pull(ref.repo, ref.digest is not None, what, at)

    async def head_manifest(
        self, ref: Reference, *, accept: Sequence[str] = MANIFEST_MEDIA_TYPES
    ) -> ManifestHead:
        """``HEAD`` a manifest: does it exist, and its digest if the registry says."""
        what = f"manifest {ref}"

        async def at(ep: Endpoint) -> ManifestHead:
            path = ep.repo_path(ref.repository)
            scopes = (f"repository:{path}:pull",)

            async def attempt() -> ManifestHead:
                headers = {"Accept": ", ".join(accept)}
                url = self._manifest_url(ep, ref)
                async with self._open_api(ep, path, scopes, "HEAD", url, headers, what) as resp:
                    digest = resp.headers.get("docker-content-digest")
                    length = resp.headers.get("content-length")
                    return ManifestHead(
                        _media_type(resp.headers),
                        digest or ref.digest,
                        int(length) if length and length.isdigit() else None,
                    )

            return await self._retrying(what, attempt)

        return await self._pull(ref.repo, ref.digest is not None, what, at)

    # ------------------------------------------------------------------ listings

    async def check_login(self, registry: str) -> None:
        """``GET /v2/`` with the credentials for ``registry`` (what ``docker login`` checks):
        returns if they are accepted, raises :class:`AuthError` if not."""
        ep = self._endpoints.upstream(Repository(registry, "_"))
        url = httpx.URL(f"{ep.base_url}/v2/")

        async def attempt() -> None:
            async with self._open_api(ep, None, (), "GET", url, {}, f"login to {registry}"):
                pass

        await self._retrying(f"login to {registry}", attempt)

    async def _paginate(
        self, ep: Endpoint, repo_path: str | None, scope: str, first: httpx.URL, key: str, what: str
    ) -> list[str]:
        """Follow ``Link: <…>; rel="next"`` pages, collecting ``key`` lists."""
        items: list[str] = []
        url: httpx.URL | None = first
        seen: set[str] = set()
        while url is not None and len(seen) < MAX_PAGES:
            seen.add(str(url))
            body, resp = await self._retrying(
                what, functools.partial(self._get_page, ep, repo_path, scope, url, what)
            )
            try:
                data = json.loads(body)
                page = data.get(key) or []  # some registries send null for "none"
            except (ValueError, AttributeError):
                raise FormatError(f"{what}: the registry answered with invalid JSON") from None
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise FormatError(f"{what}: '{key}' is not a list of strings")
            items += page
            nxt = resp.links.get("next", {}).get("url")
            url = resp.url.join(nxt) if nxt else None
            if url is not None and str(url) in seen:
                break  # a registry that links a page to itself: stop rather than loop
        return items

    async def _get_page(
        self, ep: Endpoint, repo_path: str | None, scope: str, url: httpx.URL, what: str
    ) -> tuple[bytes, httpx.Response]:
        headers = {"Accept": "application/json"}
        async with self._open_api(ep, repo_path, (scope,), "GET", url, headers, what) as resp:
            return await _read_limited(resp, MAX_JSON_PAGE, what), resp

    async def list_tags(self, repo: Repository, *, page_size: int | None = None) -> list[str]:
        """All tags of ``repo`` (upstream only, not mirrors), following pagination."""
        ep = self._endpoints.upstream(repo)
        path = ep.repo_path(repo.path)
        url = httpx.URL(f"{ep.base_url}/v2/{path}/tags/list")
        if page_size is not None:
            url = url.copy_add_param("n", str(page_size))
        scope = f"repository:{path}:pull"
        return await self._paginate(ep, path, scope, url, "tags", f"tags of {repo}")

    async def catalog(self, registry: str, *, page_size: int | None = None) -> list[str]:
        """Repository names in ``registry`` (``/v2/_catalog``; many registries refuse it)."""
        ep = self._endpoints.upstream(Repository(registry, "_"))
        url = httpx.URL(f"{ep.base_url}/v2/_catalog")
        if page_size is not None:
            url = url.copy_add_param("n", str(page_size))
        return await self._paginate(
            ep, None, "registry:catalog:*", url, "repositories", f"catalog of {registry}"
        )

    # ------------------------------------------------------------------ blobs: plumbing

    def _blob(self, repo: Repository, digest: str) -> _Blob:
        key = (repo, digest)
        blob = self._blobs.get(key)
        if blob is None:
            blob = self._blobs[key] = _Blob(repo, validate_digest(digest))
        return blob

    def blob_stats(self, repo: Repository, digest: str) -> BlobStats:
        """Requests and bytes fetched for one blob so far."""
        return self._blob(repo, digest).stats

    async def _blob_pull(self, blob: _Blob, what: str, fn: Callable[[Endpoint], Awaitable[T]]) -> T:
        """Like :meth:`_pull`, starting with the endpoint that served this blob last."""
        if blob.endpoint is not None:
            try:
                return await fn(blob.endpoint)
            except (NotFoundError, AuthError, RegistryError, IntegrityError):
                if not blob.endpoint.mirror:
                    raise
                blob.endpoint = None

        async def remember(ep: Endpoint) -> T:
            result = await fn(ep)
            if blob.endpoint != ep:
                blob.endpoint, blob.redirect_url = ep, None
            return result

        return await self._pull(blob.repo, True, what, remember)

    @asynccontextmanager
    async def _open_blob(
        self,
        blob: _Blob,
        ep: Endpoint,
        headers: Mapping[str, str],
        what: str,
        *,
        method: str = "GET",
        ok: Iterable[int] = (200, 206),
        range_request: bool = False,
    ) -> AsyncIterator[httpx.Response]:
        """One attempt at a blob request; yields an open 2xx response (closed on exit)."""
        path = ep.repo_path(blob.repo.path)
        target = AuthTarget(ep.host, ep.registry, path)
        base = httpx.URL(ep.base_url)
        url = httpx.URL(f"{ep.base_url}/v2/{path}/blobs/{blob.digest}")
        scopes = (f"repository:{path}:pull",)
        async with self._limiter(ep.host):
            response: httpx.Response | None = None
            cached = blob.redirect_url
            # Presigned URLs are signed for one method: only GETs reuse the cached target.
            if cached is not None and blob.endpoint == ep and method == "GET":
                if trio.current_time() < blob.redirect_expires:
                    response = await self._send_once("GET", cached, headers, blob.stats)
                    if response.status_code in _STALE_REDIRECT_STATUSES:
                        log.debug(
                            "cached redirect for %s answered %d: resolving again",
                            blob.digest,
                            response.status_code,
                        )
                        await response.aclose()
                        response = None
                if response is None:
                    blob.redirect_url = None
            if response is None:
                response = await self._exchange(
                    target, base, scopes, method, url, headers, blob.stats
                )
                redirected = _origin(response.url) != _origin(base)
                if redirected and response.status_code == 403:
                    # A presigned URL that is already stale: one fresh redirect.
                    await response.aclose()
                    response = await self._exchange(
                        target, base, scopes, method, url, headers, blob.stats
                    )
                    redirected = _origin(response.url) != _origin(base)
                if redirected and method == "GET" and response.status_code in (200, 206):
                    blob.endpoint = ep
                    blob.redirect_url = str(response.url)
                    blob.redirect_expires = trio.current_time() + self._redirect_ttl
            try:
                await self._check(response, what, target, ok=ok, range_request=range_request)
                yield response
            finally:
                await response.aclose()

    async def _iter_body(self, blob: _Blob, resp: httpx.Response) -> AsyncGenerator[bytes, None]:
        # As received: a re-chunking buffer would lose what arrived before a dropped
        # connection, and resuming could not start from there.
        async for chunk in resp.aiter_bytes():
            blob.stats.bytes += len(chunk)
            self.stats.bytes += len(chunk)
            yield chunk

    async def _read_exact(self, blob: _Blob, resp: httpx.Response, length: int, what: str) -> bytes:
        # Joined once at the end: growing a bytearray and copying it out copied every byte
        # two or three times on the event loop's thread (a cold read's bottleneck).
        pieces: list[bytes] = []
        got = 0
        async for chunk in self._iter_body(blob, resp):
            pieces.append(chunk)
            got += len(chunk)
            if got > length:
                raise RegistryError(f"{what}: the registry sent more bytes than announced")
        if got < length:
            raise Transient(Failure(f"body cut short after {got} of {length} bytes"))
        return b"".join(pieces)

    # ------------------------------------------------------------------ blobs: public

    async def head_blob(self, repo: Repository, digest: str) -> int:
        """The size of a blob in bytes.

        :raises NotFoundError: no such blob (or repository).
        """
        blob = self._blob(repo, digest)
        what = f"blob {digest} in {repo}"

        async def at(ep: Endpoint) -> int:
            async def attempt() -> int:
                async with self._open_blob(blob, ep, {}, what, method="HEAD", ok=(200,)) as resp:
                    length = resp.headers.get("content-length", "")
                    if not length.isdigit():
                        raise RegistryError(f"{what}: HEAD answered without a Content-Length")
                    return int(length)

            return await self._retrying(what, attempt)

        blob.size = await self._blob_pull(blob, what, at)
        return blob.size

    async def _iter_blob(
        self, blob: _Blob, offset: int, stop: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The blob's bytes from ``offset`` to the end (or to ``stop``: then every request
        is a bounded ``Range: bytes=POS-LAST``), resuming after dropped connections.

        Resumes with ``Range: bytes=POS-``; a registry that answers ``200`` instead has the
        first ``POS`` bytes skipped. The caller stops reading at ``stop``.
        """
        what = f"blob {blob.digest} in {blob.repo}"
        pos = offset
        budget = RetryBudget(self._retry, what, self._rng)
        endpoints = self._endpoints.pull_endpoints(blob.repo, by_digest=True)
        if blob.endpoint is not None and blob.endpoint in endpoints:
            endpoints.remove(blob.endpoint)
            endpoints.insert(0, blob.endpoint)
        index = 0
        end: int | None = None
        while True:
            ep = endpoints[index]
            headers = {}
            if stop is not None and blob.ranges is not False:
                headers = {"Range": f"bytes={pos}-{stop - 1}"}
            elif pos > 0 and blob.ranges is not False:
                headers = {"Range": f"bytes={pos}-"}
            started = pos
            try:
                async with self._open_blob(blob, ep, headers, what) as resp:
                    blob.endpoint = ep
                    skip, end = self._body_window(blob, resp, pos, what)
                    async for chunk in self._iter_body(blob, resp):
                        if skip:
                            dropped = min(skip, len(chunk))
                            skip -= dropped
                            chunk = chunk[dropped:]
                            if not chunk:
                                continue
                        pos += len(chunk)
                        budget.reset()
                        yield chunk
                    if end is not None and pos < end:
                        raise Transient(Failure(f"connection closed at byte {pos} of {end}"))
                    return
            except (NotFoundError, AuthError, RegistryError, IntegrityError):
                if not ep.mirror or pos != started or index + 1 >= len(endpoints):
                    raise
                index += 1
                continue
            except Transient as t:
                failure = t.failure
            except httpx.TransportError as e:
                if not is_transient(e):
                    raise RegistryError(f"{what}: {describe_transport_error(e)}") from None
                if end is not None and pos >= end:
                    return  # every byte arrived; only the connection's goodbye was lost
                failure = Failure(f"{type(e).__name__}: {e or 'connection dropped'}")
            log.debug("%s: %s at byte %d; resuming", what, failure.detail, pos)
            await budget.wait(failure)
            self.stats.retries += 1

    def _body_window(
        self, blob: _Blob, resp: httpx.Response, pos: int, what: str
    ) -> tuple[int, int | None]:
        """For a response to "bytes from ``pos``": (bytes to skip, expected end offset)."""
        length = resp.headers.get("content-length", "")
        if resp.status_code == 206:
            cr = parse_content_range(resp.headers.get("content-range"))
            if cr is None or cr.first != pos:
                raise RegistryError(f"{what}: asked for bytes from {pos}, got a different range")
            blob.ranges = True
            if cr.total is not None:
                blob.size = cr.total
            return 0, cr.last + 1
        if pos > 0 and blob.ranges is not False and "range" in resp.request.headers:
            log.info("%s: registry ignores byte ranges (200 instead of 206)", what)
            blob.ranges = False
        if length.isdigit():
            blob.size = int(length)
            return pos, int(length)
        return pos, blob.size

    async def stream_blob(
        self, repo: Repository, digest: str, *, offset: int = 0, verify: bool | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The blob's bytes from ``offset``, in chunks. An async generator: use it as
        ``async with contextlib.aclosing(client.stream_blob(...)) as chunks:``.

        With ``verify`` (the default when ``offset`` is 0) the digest is checked as the bytes
        stream and :class:`DigestMismatchError` is raised **after the last chunk**: drain the
        iterator, and discard what you wrote if it raises. Dropped connections resume.
        """
        if offset < 0:
            raise UsageError(f"negative blob offset {offset}")
        if verify is None:
            verify = offset == 0
        if verify and offset:
            raise UsageError("a blob read from an offset cannot be verified: pass verify=False")
        blob = self._blob(repo, digest)
        if blob.local is not None:  # verified when it was spilled
            for start in range(offset, blob.local.size, _STREAM_CHUNK):
                yield await blob.local.read_at(start, min(_STREAM_CHUNK, blob.local.size - start))
            return
        hasher = _StreamHasher(digest) if verify else None
        async with aclosing(self._iter_blob(blob, offset)) as chunks:
            async for chunk in chunks:
                if hasher is not None:
                    await hasher.update(chunk)
                yield chunk
        if hasher is not None:
            await hasher.verify(f"blob {digest} in {repo}")

    async def stream_blob_range(
        self, repo: Repository, digest: str, offset: int, length: int
    ) -> AsyncGenerator[bytes, None]:
        """Bytes ``[offset, offset+length)`` of the blob in pieces as they arrive: one range
        request (resumed after a dropped connection), never held whole. Not verified (the
        caller checks chunk digests). Use it as ``async with aclosing(...)``.

        :raises FormatError: the range is outside the blob.
        """
        if offset < 0 or length < 0:
            raise UsageError(f"invalid blob range {offset}+{length}")
        blob = self._blob(repo, digest)
        if blob.size is not None:
            check_range(blob.size, offset, length, f"blob {digest}")
        end = offset + length
        if blob.local is None and blob.ranges is False and self._spill is not None:
            await self._ensure_local(blob)
        if blob.local is not None:
            for start in range(offset, end, _STREAM_CHUNK):
                yield await blob.local.read_at(start, min(_STREAM_CHUNK, end - start))
            return
        pos = offset
        if length:
            async with aclosing(self._iter_blob(blob, offset, end)) as chunks:
                async for chunk in chunks:
                    piece = chunk[: end - pos]
                    pos += len(piece)
                    yield piece
                    if pos >= end:
                        break
        if pos < end:
            raise FormatError(
                f"range {offset}+{length} is outside blob {blob.digest} ({blob.size} bytes)"
            )

    async def get_blob(
        self, repo: Repository, digest: str, *, max_size: int | None = None
    ) -> bytes:
        """A whole blob in memory, verified (configs, TOCs of small layers).

        :raises FormatError: the blob is larger than ``max_size``.
        """
        body = bytearray()
        async with aclosing(self.stream_blob(repo, digest)) as chunks:
            async for chunk in chunks:
                body += chunk
                if max_size is not None and len(body) > max_size:
                    raise FormatError(f"blob {digest} in {repo} is larger than {max_size} bytes")
        return bytes(body)

    async def get_blob_range(
        self, repo: Repository, digest: str, offset: int, length: int
    ) -> bytes:
        """Exactly ``length`` bytes of the blob at ``offset`` (one HTTP range request).

        Not verified (a range cannot be): the caller checks chunk digests.

        :raises FormatError: the range is outside the blob.
        :raises NotFoundError, AuthError, RegistryError: as for :meth:`get_manifest`.
        """
        if offset < 0 or length < 0:
            raise UsageError(f"invalid blob range {offset}+{length}")
        if length == 0:
            return b""
        blob = self._blob(repo, digest)
        if blob.size is not None:
            check_range(blob.size, offset, length, f"blob {digest}")
        if blob.local is None and blob.ranges is not False:
            what = f"bytes {offset}+{length} of blob {digest} in {repo}"

            async def at(ep: Endpoint) -> bytes:
                return await self._retrying(
                    what, functools.partial(self._range_once, blob, ep, offset, length)
                )

            try:
                return await self._blob_pull(blob, what, at)
            except _NoRanges:
                pass
        return await self._read_without_ranges(blob, offset, length)

    async def _range_once(self, blob: _Blob, ep: Endpoint, offset: int, length: int) -> bytes:
        what = f"bytes {offset}+{length} of blob {blob.digest} in {blob.repo}"
        headers = {"Range": range_header([(offset, length)])}
        try:
            async with self._open_blob(blob, ep, headers, what, range_request=True) as resp:
                if resp.status_code == 206:
                    cr = parse_content_range(resp.headers.get("content-range"))
                    if cr is None:
                        raise RegistryError(f"{what}: 206 without a valid Content-Range")
                    if cr.total is not None:
                        blob.size = cr.total
                        check_range(cr.total, offset, length, f"blob {blob.digest}")
                    if cr.first > offset or cr.last < offset + length - 1:
                        raise RegistryError(
                            f"{what}: the registry sent bytes {cr.first}-{cr.last} instead"
                        )
                    blob.ranges = True
                    data = await self._read_exact(blob, resp, cr.length, what)
                    return data[offset - cr.first : offset - cr.first + length]
                # 200: the whole blob. Fine if that is what we asked for, else remember that
                # this blob's registry ignores ranges and take the no-range path.
                size = resp.headers.get("content-length", "")
                if offset == 0 and size.isdigit() and int(size) == length:
                    blob.size = length
                    return await self._read_exact(blob, resp, length, what)
                log.info("%s: registry ignores byte ranges (200 instead of 206)", what)
                blob.ranges = False
                if size.isdigit():
                    blob.size = int(size)
                raise _NoRanges()
        except _RangeRefused as e:
            raise FormatError(
                f"{what}: the registry refused the range (HTTP {e.status}): outside the blob?"
            ) from None

    async def _read_without_ranges(self, blob: _Blob, offset: int, length: int) -> bytes:
        if blob.local is None and self._spill is not None:
            await self._ensure_local(blob)
        if blob.local is not None:
            return await blob.local.read_at(offset, length)
        # No spill: read from the start, discard up to offset (O(offset) per read).
        data = bytearray()
        async with aclosing(self._iter_blob(blob, offset)) as chunks:
            async for chunk in chunks:
                data += chunk
                if len(data) >= length:
                    break
        if len(data) < length:
            raise FormatError(
                f"range {offset}+{length} is outside blob {blob.digest} ({blob.size} bytes)"
            )
        return bytes(data[:length])

    async def _ensure_local(self, blob: _Blob) -> None:
        """Download the whole blob once, verified, into the spill (single flight)."""
        assert self._spill is not None
        async with blob.lock:
            if blob.local is not None:
                return
            log.info(
                "downloading blob %s of %s once to serve its ranges locally", blob.digest, blob.repo
            )
            writer = await self._spill(blob.digest, blob.size)
            try:
                hasher = _StreamHasher(blob.digest)
                async with aclosing(self._iter_blob(blob, 0)) as chunks:
                    async for chunk in chunks:
                        await hasher.update(chunk)
                        await writer.write(chunk)
                await hasher.verify(f"blob {blob.digest} in {blob.repo}")
                blob.local = await writer.finish()
            except BaseException:
                await writer.discard()
                raise

    async def get_blob_ranges(
        self, repo: Repository, digest: str, ranges: Sequence[tuple[int, int]]
    ) -> list[bytes]:
        """Several ``(offset, length)`` ranges of one blob, in the order given.

        Uses multi-range requests (``multipart/byteranges``) once the blob has proven single
        range support and the host has not refused them; otherwise concurrent single ranges.
        """
        blob = self._blob(repo, digest)
        for offset, length in ranges:
            if offset < 0 or length < 0:
                raise UsageError(f"invalid blob range {offset}+{length}")
            if blob.size is not None:
                # A bad range must not make a host look unable to do multi-range requests.
                check_range(blob.size, offset, length, f"blob {digest}")
        results: list[bytes | None] = [b"" if n == 0 else None for _, n in ranges]
        todo = [i for i, (_, n) in enumerate(ranges) if n > 0]
        ep = blob.endpoint
        if (
            len(todo) > 1
            and blob.local is None
            and blob.ranges is True
            and ep is not None
            and self._multirange.get(ep.host) is not False
        ):
            for start in range(0, len(todo), MAX_RANGES_PER_REQUEST):
                batch = todo[start : start + MAX_RANGES_PER_REQUEST]
                spans = [ranges[i] for i in batch]
                what = f"{len(spans)} ranges of blob {digest} in {repo}"
                got = await self._retrying(
                    what, functools.partial(self._multi_once, blob, ep, spans, what)
                )
                if got is None:
                    break
                for i, data in zip(batch, got, strict=True):
                    results[i] = data
        missing = [i for i in todo if results[i] is None]

        async def one(i: int) -> None:
            results[i] = await self.get_blob_range(repo, digest, *ranges[i])

        if len(missing) == 1:
            await one(missing[0])
        elif missing:
            try:
                async with trio.open_nursery() as nursery:
                    for i in missing:
                        nursery.start_soon(one, i)
            except BaseExceptionGroup as group:
                raise first_error(group) from None
        return [r if r is not None else b"" for r in results]

    async def _multi_once(
        self, blob: _Blob, ep: Endpoint, spans: Sequence[tuple[int, int]], what: str
    ) -> list[bytes] | None:
        """One multi-range request; ``None`` if the host cannot do them (remembered)."""
        headers = {"Range": range_header(spans)}
        expected = sum(n for _, n in spans)
        try:
            async with self._open_blob(blob, ep, headers, what, range_request=True) as resp:
                if resp.status_code != 206:
                    raise _RangeRefused(resp.status_code)
                # Generous: each part adds its own headers and boundary lines.
                body = bytearray()
                limit = expected + 1024 * (len(spans) + 1)
                async for chunk in self._iter_body(blob, resp):
                    body += chunk
                    if len(body) > limit:
                        raise _RangeRefused(206)  # merged into something huge: not worth it
                boundary = boundary_of(resp.headers.get("content-type"))
                parts: list[Part]
                if boundary is not None:
                    parts = parse_multipart_byteranges(bytes(body), boundary)
                else:
                    # The server merged our ranges into one (RFC 7233 allows it).
                    cr = parse_content_range(resp.headers.get("content-range"))
                    if cr is None or cr.length != len(body):
                        raise Transient(Failure("206 body does not match its Content-Range"))
                    parts = [Part(cr.first, bytes(body))]
                out = [slice_from_parts(parts, off, n) for off, n in spans]
        except _RangeRefused as e:
            log.info(
                "%s refuses multi-range requests (HTTP %d): using single ranges", ep.host, e.status
            )
            self._multirange[ep.host] = False
            return None
        except FormatError as e:
            log.info("%s sent a multi-range answer we cannot use (%s): single ranges", ep.host, e)
            self._multirange[ep.host] = False
            return None
        self._multirange[ep.host] = True
        return out


def _sniff_media_type(data: bytes, header: str | None) -> str:
    """The manifest's own ``mediaType`` wins; then a specific header; then its shape."""
    try:
        doc = json.loads(data)
    except ValueError:
        return header or "application/octet-stream"
    if isinstance(doc, dict):
        declared = doc.get("mediaType")
        if isinstance(declared, str) and declared:
            return declared
        if header and header not in ("application/json", "text/plain", "application/octet-stream"):
            return header
        if "manifests" in doc:
            return OCI_INDEX
        if "layers" in doc or "config" in doc:
            return OCI_MANIFEST
    return header or "application/octet-stream"
