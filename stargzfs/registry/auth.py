"""Registry authentication: ``WWW-Authenticate`` challenges, Basic, and bearer tokens.

The distribution token flow: a request answered ``401`` with
``WWW-Authenticate: Bearer realm="…",service="…",scope="…"`` is retried with a token got by
``GET realm?service=…&scope=…`` (HTTP Basic with the user's credentials if any, anonymous
otherwise). The answer's ``token`` (or OAuth2 ``access_token``) is valid ``expires_in``
seconds (60 when absent). ``Basic`` challenges take the credentials directly.

:class:`Authenticator` remembers each host's challenge, so later requests carry an
``Authorization`` header from the start, and caches tokens per (host, scope set) until they
expire by trio's clock (tests drive it with ``trio.testing.MockClock``). A ``401`` on a request
that carried a token drops that token; the client then retries once with a fresh one: long
mounts outlive their tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import trio

from ..errors import AuthError
from .credentials import CredentialResolver, Credentials

__all__ = [
    "DEFAULT_TOKEN_LIFETIME",
    "AuthTarget",
    "Authenticator",
    "Challenge",
    "parse_www_authenticate",
]

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = 60.0
# Refresh a little before the server's deadline so a request does not leave with a token
# that dies in flight; never more than this many seconds early.
_MAX_EARLY_REFRESH = 10.0
_CLIENT_ID = "stargzfs"

Send = Callable[[httpx.Request], Awaitable[httpx.Response]]


# --------------------------------------------------------------------------- challenges


@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header; ``scheme`` and param names lowercase."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scopes(self) -> tuple[str, ...]:
        # Several scopes may be space-separated in one parameter (RFC 6749 §3.3).
        return tuple(self.params.get("scope", "").split())


_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip(self, chars: str = " \t") -> None:
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def token(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _TOKEN_CHARS:
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str:
        # RFC 7230 quoted-string with backslash escapes; tolerate a missing closing quote.
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            self.pos += 1
            if c == "\\" and self.pos < len(self.text):
                out.append(self.text[self.pos])
                self.pos += 1
            elif c == '"':
                break
            else:
                out.append(c)
        return "".join(out)

    def value(self) -> str:
        if self.peek() == '"':
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ", \t":
            self.pos += 1
        return self.text[start : self.pos]


def parse_www_authenticate(headers: str | Iterable[str]) -> list[Challenge]:
    """Parse one or more ``WWW-Authenticate`` values (RFC 7235) into challenges.

    Handles several challenges in one header (``Basic realm="x", Bearer realm="y"``), quoted
    values containing commas (``scope="repository:a:pull,push"``) and escapes.
    """
    values = [headers] if isinstance(headers, str) else list(headers)
    challenges: list[Challenge] = []
    for text in values:
        s = _Scanner(text)
        while True:
            s.skip(" \t,")
            scheme = s.token()
            if not scheme:
                break
            params: dict[str, str] = {}
            while True:
                s.skip(" \t,")
                mark = s.pos
                name = s.token()
                s.skip()
                if not name or s.peek() != "=":
                    # Not "name=": the next challenge's scheme (or garbage): stop here.
                    s.pos = mark
                    break
                s.pos += 1
                s.skip()
                params[name.lower()] = s.value()
            challenges.append(Challenge(scheme.lower(), params))
    return challenges


def _pick(challenges: list[Challenge]) -> Challenge | None:
    """Bearer wins over Basic (it is what the registry wants when it offers both)."""
    for scheme in ("bearer", "basic"):
        for c in challenges:
            if c.scheme == scheme:
                return c
    return None


# --------------------------------------------------------------------------- tokens


@dataclass
class _Token:
    header: str
    expires_at: float


@dataclass
class _HostState:
    challenge: Challenge | None = None
    tokens: dict[frozenset[str], _Token] = field(default_factory=dict)
    locks: dict[frozenset[str], trio.Lock] = field(default_factory=dict)
    # Scopes a 401 for requests needing `key` asked for beyond `key` itself (usually none).
    extra_scopes: dict[frozenset[str], frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class AuthTarget:
    """Who we talk to: the network host, the registry name for credentials, the repository."""

    host: str
    registry: str
    repository: str | None = None


class Authenticator:
    """Challenge memory and a token cache, shared by every request of one client.

    ``send`` sends a request without registry auth (the client's retrying sender), used for
    token endpoints.
    """

    def __init__(self, credentials: CredentialResolver, send: Send) -> None:
        self._credentials = credentials
        self._send = send
        self._hosts: dict[str, _HostState] = {}
        self.tokens_fetched = 0

    def _state(self, host: str) -> _HostState:
        return self._hosts.setdefault(host, _HostState())

    async def authorization(self, target: AuthTarget, scopes: Iterable[str]) -> str | None:
        """The ``Authorization`` value to send, or ``None`` (anonymous, or no challenge yet)."""
        state = self._state(target.host)
        challenge = state.challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = await self._credentials.lookup(target.registry, target.repository)
            return creds.basic_header() if creds is not None else None
        key = frozenset(scopes)
        lock = state.locks.setdefault(key, trio.Lock())
        # Single flight: concurrent requests needing the same token wait for one fetch.
        async with lock:
            token = state.tokens.get(key)
            if token is not None and trio.current_time() < token.expires_at:
                return token.header
            wanted = key | state.extra_scopes.get(key, frozenset())
            token = await self._fetch_token(target, challenge, wanted)
            state.tokens[key] = token
            return token.header

    async def on_unauthorized(
        self,
        target: AuthTarget,
        scopes: Iterable[str],
        response: httpx.Response,
        sent: str | None,
    ) -> bool:
        """Learn from a 401; ``True`` if retrying with fresh authorization may succeed.

        ``sent`` is the ``Authorization`` value the failed request carried (``None`` if none).
        """
        state = self._state(target.host)
        challenge = _pick(parse_www_authenticate(response.headers.get_list("www-authenticate")))
        if challenge is None:
            return False
        changed = challenge != state.challenge
        state.challenge = challenge
        key = frozenset(scopes)
        if challenge.scheme == "bearer" and not set(challenge.scopes) <= key:
            state.extra_scopes[key] = frozenset(challenge.scopes) - key
        if challenge.scheme == "bearer":
            token = state.tokens.get(key)
            if token is not None and token.header == sent:
                # Revoked or expired early: fetch a new one. (If another request already
                # replaced it, the retry simply uses the newer token.)
                del state.tokens[key]
            return True
        if sent is None:
            creds = await self._credentials.lookup(target.registry, target.repository)
            return creds is not None
        # Basic credentials were sent and refused: retrying the same ones is pointless.
        return changed

    async def describe_failure(self, target: AuthTarget) -> str:
        """Why auth failed, for an error message: which credential source, never the secret."""
        creds = await self._credentials.lookup(target.registry, target.repository)
        if creds is None:
            return "no credentials found (use `stargzfs login` or set REGISTRY_AUTH_FILE)"
        return f"credentials from {creds.source} were not accepted"

    async def _fetch_token(
        self, target: AuthTarget, challenge: Challenge, scopes: frozenset[str]
    ) -> _Token:
        realm = challenge.realm
        if not realm:
            raise AuthError(f"{target.host}: bearer challenge without a realm")
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise AuthError(f"{target.host}: bearer realm {realm!r} is not an http(s) URL")
        all_scopes = sorted(scopes)
        creds = await self._credentials.lookup(target.registry, target.repository)
        request = _token_request(realm, challenge.service, all_scopes, creds)
        response = await self._send(request)
        who = creds.source if creds is not None else "anonymous"
        if response.status_code in (401, 403):
            raise AuthError(
                f"token server {parts.netloc} refused {who} access to "
                f"{' '.join(all_scopes) or target.host} (HTTP {response.status_code})"
            )
        if response.status_code != 200:
            raise AuthError(
                f"token server {parts.netloc} answered HTTP {response.status_code} for {who}"
            )
        header, lifetime = _parse_token_response(response.content, parts.netloc)
        self.tokens_fetched += 1
        log.debug(
            "token for %s scopes %s from %s (%s), valid %.0f s",
            target.host,
            " ".join(all_scopes) or "-",
            parts.netloc,
            who,
            lifetime,
        )
        early = min(_MAX_EARLY_REFRESH, lifetime / 10)
        return _Token(header, trio.current_time() + lifetime - early)


def _token_request(
    realm: str, service: str | None, scopes: list[str], creds: Credentials | None
) -> httpx.Request:
    if creds is not None and creds.identity_token:
        # OAuth2 refresh-token grant (docker's identity tokens).
        form = {
            "grant_type": "refresh_token",
            "refresh_token": creds.identity_token,
            "client_id": _CLIENT_ID,
        }
        if service:
            form["service"] = service
        if scopes:
            form["scope"] = " ".join(scopes)
        return httpx.Request("POST", realm, data=form)
    params: list[tuple[str, str | int | float | bool | None]] = []
    if service:
        params.append(("service", service))
    params += [("scope", s) for s in scopes]
    headers = {}
    if creds is not None:
        if creds.username:
            params.append(("account", creds.username))
        headers["Authorization"] = creds.basic_header()
    url = httpx.URL(realm)
    return httpx.Request("GET", url.copy_merge_params(params), headers=headers)


def _parse_token_response(body: bytes, server: str) -> tuple[str, float]:
    try:
        data = json.loads(body)
    except ValueError:
        raise AuthError(f"token server {server} answered with invalid JSON") from None
    if not isinstance(data, dict):
        raise AuthError(f"token server {server} answered with unexpected JSON")
    token = data.get("token") or data.get("access_token")
    if not isinstance(token, str) or not token:
        raise AuthError(f"token server {server} answered without a token")
    lifetime = data.get("expires_in")
    if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    return f"Bearer {token}", float(lifetime)
