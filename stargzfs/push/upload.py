"""Writing to a registry: blob uploads, cross-repository mounts, manifests, deletes.

Built on :class:`~stargzfs.registry.RegistryClient`: it reuses the client's HTTP connection
pool, its authenticator (token cache, challenge memory), its per-host concurrency limit, its
retry policy and its error mapping, and adds the requests that carry a body.

Blob upload protocol (distribution spec "push"):

1. ``HEAD /v2/<repo>/blobs/<digest>``: present → nothing to do.
2. ``POST /v2/<repo>/blobs/uploads/?mount=<digest>&from=<other repo>`` (same registry, when
   a repository holding the blob is known): ``201`` → mounted, no bytes sent; ``202`` → the
   registry started a normal upload instead.
3. Otherwise ``POST /v2/<repo>/blobs/uploads/`` → ``202`` and a ``Location`` (often
   relative: resolved against the request URL).
4. Small blobs (≤ one chunk): one ``PUT <location>?digest=…`` with the bytes (monolithic).
   Larger ones: ``PATCH <location>`` per chunk with ``Content-Range``, each answer giving the
   next ``Location``, then an empty ``PUT …?digest=``. A chunk that fails (dropped connection,
   5xx) asks the session where it stands (``GET <location>`` → ``Range: 0-N``) and resumes
   from byte ``N+1``; the bytes already accepted are never sent again.

Bytes come from a :data:`ChunkSource` (``offset → async iterator of bytes``), so a blob is
streamed from disk or from another registry with memory bounded by the chunk size.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal

import httpx

from ..errors import NotFoundError, RegistryError, StargzfsError, UnsupportedError
from ..reference import Reference, Repository
from ..registry import RegistryClient
from ..registry.auth import AuthTarget
from ..registry.endpoints import Endpoint
from ..registry.retry import Failure, Transient, describe_transport_error, is_transient

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "BlobResult",
    "ChunkSource",
    "Uploader",
    "file_chunks",
]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 5 * 1024 * 1024
_READ = 1024 * 1024
_MANIFEST_MAX = 4 * 1024 * 1024

ChunkSource = Callable[[int], AsyncGenerator[bytes, None]]
"""Given a byte offset, the blob's bytes from there to its end."""

Outcome = Literal["exists", "mounted", "uploaded"]


@dataclass(frozen=True)
class BlobResult:
    digest: str
    size: int
    outcome: Outcome
    bytes_sent: int = 0


def file_chunks(path: str, read_size: int = _READ) -> ChunkSource:
    """A :data:`ChunkSource` reading ``path`` (reads in a worker thread)."""
    import trio

    async def chunks(offset: int) -> AsyncGenerator[bytes, None]:
        f = await trio.to_thread.run_sync(open, path, "rb")
        try:
            await trio.to_thread.run_sync(f.seek, offset)
            while True:
                data = await trio.to_thread.run_sync(f.read, read_size)
                if not data:
                    return
                yield data
        finally:
            f.close()

    return chunks


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def _range_end(value: str | None) -> int | None:
    """``Range: 0-N`` (or ``bytes=0-N``) of an upload session → bytes received (N+1)."""
    if not value:
        return None
    value = value.strip().removeprefix("bytes=")
    first, sep, last = value.partition("-")
    if not sep or not first.isdigit() or not last.isdigit():
        return None
    return int(last) + 1


class Uploader:
    """Push-side requests over a shared :class:`RegistryClient`.

    :param chunk_size: bytes per ``PATCH``; blobs no larger go up in one ``PUT``.
    :param progress: called with ``(digest, bytes_sent_so_far)`` as chunks are accepted.
    :param state_dir: where chunked upload sessions are remembered (location and offset after
        each accepted chunk), so that a later process pushing the same blob to the same
        repository resumes the session instead of starting over; ``None``: not remembered.
        (distribution signs the offset into the session URL: when a chunk was cut off midway,
        the part it stored makes the remembered URL stale, and the upload starts over.)
    """

    def __init__(
        self,
        client: RegistryClient,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: Callable[[str, int], None] | None = None,
        state_dir: str | None = None,
    ) -> None:
        if chunk_size <= 0:
            raise StargzfsError(f"upload chunk size must be positive, not {chunk_size}")
        self.client = client
        self.chunk_size = chunk_size
        self.progress = progress
        self.uploaded_bytes = 0
        self.restarts = 0
        self.state_dir = state_dir
        self.resumed = 0

    # ------------------------------------------------------------------ plumbing

    def endpoint(self, repo: Repository) -> Endpoint:
        return self.client._endpoints.upstream(repo)

    async def _request(
        self,
        ep: Endpoint,
        path: str,
        scopes: tuple[str, ...],
        method: str,
        url: httpx.URL,
        *,
        what: str,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        body: Callable[[], AsyncIterator[bytes]] | None = None,
        ok: tuple[int, ...],
    ) -> httpx.Response:
        """One request with a body (``content``, or streamed from ``body()``, called again
        for a re-sent request): registry auth, one re-auth on 401, the client's error
        mapping. Raises ``Transient`` for retryable failures."""
        c = self.client
        target = AuthTarget(ep.host, ep.registry, path)
        base = httpx.URL(ep.base_url)
        authorization = await c._auth.authorization(target, scopes)
        reauthed = False
        async with c._limiter(ep.host):
            while True:
                send = dict(headers or {})
                if authorization is not None and _same_origin(url, base):
                    send["Authorization"] = authorization
                request = c._http.build_request(
                    method, url, headers=send, content=body() if body is not None else content
                )
                response = await c._http.send(request, follow_redirects=False)
                # httpx ties a response and its stream in a reference cycle that lives until
                # the cyclic GC runs, and the request (with its chunk body) with it. The body
                # is read: break the cycle so memory stays bounded by the chunk size.
                response.stream = httpx.ByteStream(response.content)
                c.stats.requests += 1
                log.debug("%s %s → %d", method, url.copy_with(query=None), response.status_code)
                if (
                    response.status_code == 401
                    and not reauthed
                    and await c._auth.on_unauthorized(target, scopes, response, authorization)
                ):
                    authorization = await c._auth.authorization(target, scopes)
                    reauthed = True
                    continue
                await c._check(response, what, target, ok=ok)
                return response

    async def _retrying_request(
        self,
        ep: Endpoint,
        path: str,
        scopes: tuple[str, ...],
        method: str,
        url: httpx.URL,
        *,
        what: str,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        ok: tuple[int, ...],
    ) -> httpx.Response:
        async def attempt() -> httpx.Response:
            return await self._request(
                ep, path, scopes, method, url, what=what, headers=headers, content=content, ok=ok
            )

        return await self.client._retrying(what, attempt)

    @staticmethod
    def _location(response: httpx.Response, what: str) -> httpx.URL:
        location = response.headers.get("location")
        if not location:
            raise RegistryError(f"{what}: the registry answered without a Location header")
        return response.url.join(location)

    # ------------------------------------------------------------------ blobs

    async def blob_exists(self, repo: Repository, digest: str) -> bool:
        try:
            await self.client.head_blob(repo, digest)
        except NotFoundError:
            return False
        return True

    async def push_blob(
        self,
        repo: Repository,
        digest: str,
        size: int,
        source: ChunkSource,
        *,
        mount_from: Repository | None = None,
        check_exists: bool = True,
    ) -> BlobResult:
        """Make ``digest`` present in ``repo``: skip, mount, or upload from ``source``."""
        if check_exists and await self.blob_exists(repo, digest):
            log.info("blob %s already in %s", digest, repo)
            return BlobResult(digest, size, "exists")
        ep = self.endpoint(repo)
        path = ep.repo_path(repo.path)
        scopes: tuple[str, ...] = (f"repository:{path}:pull,push",)
        start = httpx.URL(f"{ep.base_url}/v2/{path}/blobs/uploads/")
        what = f"upload of blob {digest} to {repo}"
        if mount_from is not None and mount_from.registry == repo.registry and mount_from != repo:
            from_path = ep.repo_path(mount_from.path)
            scopes += (f"repository:{from_path}:pull",)
            url = start.copy_merge_params({"mount": digest, "from": from_path})
            resp = await self._retrying_request(
                ep, path, scopes, "POST", url, what=what, ok=(201, 202)
            )
            if resp.status_code == 201:
                log.info("blob %s mounted from %s into %s", digest, mount_from, repo)
                return BlobResult(digest, size, "mounted")
            location = self._location(resp, what)
        else:
            resumed = None
            if size > self.chunk_size:
                resumed = await self._resume_saved(ep, path, scopes, digest, size, what)
            if resumed is not None:
                offset, location = resumed
                sent = await self._put_chunked(
                    ep, path, scopes, location, digest, size, source, what, offset
                )
                return BlobResult(digest, size, "uploaded", sent)
            location = await self._new_session(ep, path, scopes, what)
        if size <= self.chunk_size:
            sent = await self._put_monolithic(
                ep, path, scopes, location, digest, size, source, what
            )
        else:
            sent = await self._put_chunked(ep, path, scopes, location, digest, size, source, what)
        return BlobResult(digest, size, "uploaded", sent)

    # ------------------------------------------------------------------ remembered sessions

    def _state_path(self, ep: Endpoint, path: str, digest: str) -> str | None:
        if self.state_dir is None:
            return None
        import os

        key = hashlib.sha256(f"{ep.base_url}/{path}@{digest}".encode()).hexdigest()
        return os.path.join(self.state_dir, key + ".json")

    def _save_state(
        self, ep: Endpoint, path: str, digest: str, location: httpx.URL, offset: int
    ) -> None:
        file = self._state_path(ep, path, digest)
        if file is None:
            return
        import json
        import os

        try:
            os.makedirs(self.state_dir or ".", mode=0o700, exist_ok=True)
            tmp = f"{file}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"location": str(location), "offset": offset}, f)
            os.replace(tmp, file)
        except OSError as e:
            log.debug("cannot remember the upload session of %s: %s", digest, e)

    def _drop_state(self, ep: Endpoint, path: str, digest: str) -> None:
        file = self._state_path(ep, path, digest)
        if file is not None:
            import contextlib
            import os

            with contextlib.suppress(OSError):
                os.unlink(file)

    async def _resume_saved(
        self, ep: Endpoint, path: str, scopes: tuple[str, ...], digest: str, size: int, what: str
    ) -> tuple[int, httpx.URL] | None:
        """A remembered session that the registry still knows: (its offset, its URL)."""
        file = self._state_path(ep, path, digest)
        if file is None:
            return None
        import json

        try:
            with open(file) as f:
                saved = json.load(f)
            location = httpx.URL(str(saved["location"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not _same_origin(location, httpx.URL(ep.base_url)):
            return None
        try:
            offset, location = await self._session_offset(ep, path, scopes, location, what)
        except StargzfsError as e:
            log.info("%s: remembered session is gone (%s)", what, e)
            self._drop_state(ep, path, digest)
            return None
        if offset > size:
            self._drop_state(ep, path, digest)
            return None
        log.info("%s: resuming a previous session at byte %d", what, offset)
        self.resumed += 1
        return offset, location

    async def _new_session(
        self, ep: Endpoint, path: str, scopes: tuple[str, ...], what: str
    ) -> httpx.URL:
        start = httpx.URL(f"{ep.base_url}/v2/{path}/blobs/uploads/")
        resp = await self._retrying_request(ep, path, scopes, "POST", start, what=what, ok=(202,))
        return self._location(resp, what)

    async def _put_monolithic(
        self,
        ep: Endpoint,
        path: str,
        scopes: tuple[str, ...],
        location: httpx.URL,
        digest: str,
        size: int,
        source: ChunkSource,
        what: str,
    ) -> int:
        body = bytearray()
        async with aclosing(source(0)) as chunks:
            async for chunk in chunks:
                body += chunk
        if len(body) != size:
            raise StargzfsError(f"{what}: source has {len(body)} bytes, expected {size}")
        url = location.copy_merge_params({"digest": digest})
        headers = {"Content-Type": "application/octet-stream"}
        await self._retrying_request(
            ep,
            path,
            scopes,
            "PUT",
            url,
            what=what,
            headers=headers,
            content=bytes(body),
            ok=(201, 204),
        )
        self.uploaded_bytes += size
        if self.progress is not None:
            self.progress(digest, size)
        return size

    async def _session_offset(
        self, ep: Endpoint, path: str, scopes: tuple[str, ...], location: httpx.URL, what: str
    ) -> tuple[int, httpx.URL]:
        """Where an upload session stands: bytes the registry has, and its current URL."""
        resp = await self._retrying_request(
            ep, path, scopes, "GET", location, what=f"{what} (status)", ok=(204, 200)
        )
        received = _range_end(resp.headers.get("range")) or 0
        new = resp.headers.get("location")
        return received, resp.url.join(new) if new else location

    async def _put_chunked(
        self,
        ep: Endpoint,
        path: str,
        scopes: tuple[str, ...],
        location: httpx.URL,
        digest: str,
        size: int,
        source: ChunkSource,
        what: str,
        offset: int = 0,
    ) -> int:
        import trio

        from ..registry.retry import RetryBudget

        sent = 0
        budget = RetryBudget(self.client._retry, what, self.client._rng)
        while offset < size:
            try:
                async with aclosing(source(offset)) as chunks:
                    buf = bytearray()
                    async for data in chunks:
                        buf += data
                        while len(buf) >= self.chunk_size or (buf and offset + len(buf) >= size):
                            piece = bytes(buf[: self.chunk_size])
                            location = await self._patch(
                                ep, path, scopes, location, offset, piece, what
                            )
                            del buf[: len(piece)]
                            offset += len(piece)
                            self._save_state(ep, path, digest, location, offset)
                            sent += len(piece)
                            self.uploaded_bytes += len(piece)
                            budget.reset()
                            if self.progress is not None:
                                self.progress(digest, offset)
                    if buf or offset < size:
                        raise StargzfsError(
                            f"{what}: source ended at byte {offset + len(buf)} of {size}"
                        )
            except (RegistryError, UnsupportedError) as e:
                status = e.status if isinstance(e, RegistryError) else 405
                if sent or offset or status not in (400, 405, 416):
                    raise
                # Some registries take no chunked uploads: one streamed PUT instead.
                log.info("%s: chunked upload refused (%s); uploading in one request", what, e)
                return await self._put_streamed(ep, path, scopes, digest, size, source, what)
            except Transient as t:
                failure = t.failure
            except httpx.TransportError as e:
                if not is_transient(e):
                    raise RegistryError(f"{what}: {describe_transport_error(e)}") from None
                failure = Failure(f"{type(e).__name__}: {e or 'connection dropped'}")
            else:
                break
            log.info(
                "%s: %s at byte %d; asking the session where it stands",
                what,
                failure.detail,
                offset,
            )
            await budget.wait(failure)
            self.client.stats.retries += 1
            try:
                before = offset
                offset, location = await self._session_offset(ep, path, scopes, location, what)
                # A chunk that was stored although its answer was an error still counts.
                sent += max(0, offset - before)
                self.uploaded_bytes += max(0, offset - before)
            except (NotFoundError, RegistryError) as e:
                # distribution keeps the session state in the Location's signed `_state`:
                # after a chunk whose answer was lost, the URL we hold is stale. Start over.
                log.info("%s: session lost (%s); starting a new one", what, e)
                location = await self._new_session(ep, path, scopes, what)
                offset = 0
                self.restarts += 1
            if offset > size:
                raise RegistryError(f"{what}: the registry holds {offset} bytes of {size}")
            await trio.lowlevel.checkpoint()
        url = location.copy_merge_params({"digest": digest})
        await self._retrying_request(
            ep,
            path,
            scopes,
            "PUT",
            url,
            what=what,
            headers={"Content-Length": "0"},
            content=b"",
            ok=(201, 204),
        )
        self._drop_state(ep, path, digest)
        return sent

    async def _put_streamed(
        self,
        ep: Endpoint,
        path: str,
        scopes: tuple[str, ...],
        digest: str,
        size: int,
        source: ChunkSource,
        what: str,
    ) -> int:
        """The whole blob in one ``PUT`` of a fresh session, streamed from ``source``."""

        async def attempt() -> httpx.Response:
            location = await self._new_session(ep, path, scopes, what)
            url = location.copy_merge_params({"digest": digest})

            async def body() -> AsyncIterator[bytes]:
                async with aclosing(source(0)) as chunks:
                    async for chunk in chunks:
                        yield chunk

            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            return await self._request(
                ep, path, scopes, "PUT", url, what=what, headers=headers, body=body, ok=(201, 204)
            )

        await self.client._retrying(what, attempt)
        self.uploaded_bytes += size
        if self.progress is not None:
            self.progress(digest, size)
        return size

    async def _patch(
        self,
        ep: Endpoint,
        path: str,
        scopes: tuple[str, ...],
        location: httpx.URL,
        offset: int,
        piece: bytes,
        what: str,
    ) -> httpx.URL:
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{offset}-{offset + len(piece) - 1}",
        }
        resp = await self._request(
            ep,
            path,
            scopes,
            "PATCH",
            location,
            what=what,
            headers=headers,
            content=piece,
            ok=(202, 204),
        )
        received = _range_end(resp.headers.get("range"))
        if received is not None and received != offset + len(piece):
            raise Transient(
                Failure(
                    f"registry holds {received} bytes after a chunk ending at {offset + len(piece)}"
                )
            )
        return self._location(resp, what) if resp.headers.get("location") else location

    # ------------------------------------------------------------------ manifests

    async def put_manifest(self, ref: Reference, data: bytes, media_type: str) -> str:
        """Upload a manifest or index under ``ref``'s tag (or digest); returns its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        ep = self.endpoint(ref.repo)
        path = ep.repo_path(ref.repository)
        selector = ref.tag if ref.tag is not None and ref.digest is None else digest
        url = httpx.URL(f"{ep.base_url}/v2/{path}/manifests/{selector}")
        await self._retrying_request(
            ep,
            path,
            (f"repository:{path}:pull,push",),
            "PUT",
            url,
            what=f"manifest {ref.repo}:{selector}",
            headers={"Content-Type": media_type},
            content=data,
            ok=(201, 200, 202),
        )
        return digest

    async def delete_manifest(self, repo: Repository, digest: str) -> None:
        """``DELETE`` a manifest by digest (every tag pointing at it goes with it).

        :raises UnsupportedError: the registry disallows deletes (its message quoted).
        """
        ep = self.endpoint(repo)
        path = ep.repo_path(repo.path)
        url = httpx.URL(f"{ep.base_url}/v2/{path}/manifests/{digest}")
        await self._retrying_request(
            ep,
            path,
            (f"repository:{path}:delete",),
            "DELETE",
            url,
            what=f"delete of {repo}@{digest}",
            ok=(202, 200, 204),
        )
