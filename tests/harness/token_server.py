"""A small Docker-registry token server (the ``auth: token`` half of distribution's auth).

It speaks the protocol of https://distribution.github.io/distribution/spec/auth/token/:
``GET /token?service=...&scope=repository:NAME:ACTIONS[&scope=...]``, with or without Basic
credentials, answers ``{"token", "access_token", "expires_in", "issued_at"}``. Tokens are JWTs
signed with ES256 by a fresh P-256 key whose self-signed certificate travels in the ``x5c``
header; the registry trusts it because the same certificate is its ``rootcertbundle``.

Policy (mutable at runtime, e.g. ``server.anonymous_actions = {"pull"}``):

* Basic credentials that match ``users`` get the requested actions that are in
  ``user_actions``; wrong credentials get 401 (no token).
* Anonymous requests get the requested actions that are in ``anonymous_actions`` (nothing by
  default): like Docker Hub, they still receive a token, with an empty ``access`` list, and the
  registry then answers 401 ``insufficient_scope``.
* ``fail_status`` (e.g. 503) makes every request fail with that status, to simulate an outage.

Every issued token is counted (``issued``) and every request recorded (``requests``) so tests
can assert refreshes.

Expiry: distribution 2.8 accepts a token until 60 s *after* its ``exp`` claim (clock-skew
leeway, ``token.Leeway``). So that ``expires_in`` means what it says, the server subtracts
``registry_leeway`` (60 s by default) from ``exp``: a token advertised with ``expires_in=2`` is
really refused by the registry about 2 s after it was issued. The JWT's own ``exp`` claim
therefore lies 60 s in the past: clients must go by ``expires_in`` (tokens are opaque to
clients, as the spec says). Set ``registry_leeway = 0`` for honest claims.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

__all__ = ["ALL_ACTIONS", "DISTRIBUTION_LEEWAY", "TokenRequest", "TokenServer"]

#: Clock-skew leeway distribution 2.8 adds to ``exp`` (registry/auth/token/token.go).
DISTRIBUTION_LEEWAY = 60
ALL_ACTIONS = frozenset({"pull", "push", "delete", "*"})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered (or refused)."""

    account: str | None  # the Basic user name, None when anonymous
    scopes: tuple[str, ...]
    service: str | None
    status: int
    granted: tuple[dict[str, object], ...] = ()


@dataclass
class _Grant:
    type: str
    name: str
    actions: list[str] = field(default_factory=list)


class TokenServer:
    """A threaded token server on a free 127.0.0.1 port. Use as a context manager or call
    :meth:`start` / :meth:`stop`."""

    def __init__(
        self,
        workdir: Path,
        *,
        service: str = "stargzfs-test-registry",
        issuer: str = "stargzfs-test-issuer",
        users: dict[str, str] | None = None,
        expires_in: int = 60,
        anonymous_actions: set[str] | None = None,
        user_actions: set[str] | None = None,
        registry_leeway: int = DISTRIBUTION_LEEWAY,
    ) -> None:
        self.workdir = workdir
        self.service = service
        self.issuer = issuer
        self.users: dict[str, str] = dict(users or {})
        self.expires_in = expires_in
        self.anonymous_actions: set[str] = set(anonymous_actions or ())
        self.user_actions: set[str] = set(user_actions if user_actions is not None else ALL_ACTIONS)
        self.registry_leeway = registry_leeway
        self.fail_status: int | None = None
        self._initial_policy = (
            expires_in,
            set(self.anonymous_actions),
            set(self.user_actions),
            registry_leeway,
        )
        self.requests: list[TokenRequest] = []
        self._issued = 0
        self._lock = threading.Lock()
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = self._make_cert()
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()
        self.cert_path = workdir / "token-signer.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> TokenServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server._handle(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset_policy(self) -> None:
        """Restore ``expires_in``, ``anonymous_actions``, ``user_actions``, ``registry_leeway``
        and ``fail_status`` to their initial values (the counters stay)."""
        expires_in, anonymous, user, leeway = self._initial_policy
        self.expires_in = expires_in
        self.anonymous_actions = set(anonymous)
        self.user_actions = set(user)
        self.registry_leeway = leeway
        self.fail_status = None

    @property
    def port(self) -> int:
        assert self._httpd is not None, "token server not started"
        port: int = self._httpd.server_address[1]
        return port

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def issued(self) -> int:
        """How many tokens were issued so far."""
        with self._lock:
            return self._issued

    # -- tokens ----------------------------------------------------------------------------
    def issue(self, account: str | None, scopes: list[str]) -> tuple[str, list[dict[str, object]]]:
        """Sign a token for ``account`` (None = anonymous) granting what policy allows of
        ``scopes``. Public so tests can mint tokens directly."""
        allowed = self.user_actions if account is not None else self.anonymous_actions
        grants: dict[tuple[str, str], _Grant] = {}
        for scope in scopes:
            parsed = self._parse_scope(scope)
            if parsed is None:
                continue
            typ, name, actions = parsed
            grant = grants.setdefault((typ, name), _Grant(typ, name))
            for action in actions:
                if (action in allowed or "*" in allowed) and action not in grant.actions:
                    grant.actions.append(action)
        access: list[dict[str, object]] = [
            {"type": g.type, "name": g.name, "actions": g.actions}
            for g in grants.values()
            if g.actions
        ]
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": account or "",
            "aud": self.service,
            "exp": now + self.expires_in - self.registry_leeway,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._x5c]}
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        der = self._key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # JWS wants r||s, not DER
        with self._lock:
            self._issued += 1
        return signing_input + "." + _b64url(raw), access

    @staticmethod
    def _parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
        # repository:name/with/slashes:pull,push  (a name may contain ':' only for a port,
        # which registry scopes never carry, so split from the right)
        typ, sep, rest = scope.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not sep or not sep2 or not name:
            return None
        return typ, name, [a for a in actions.split(",") if a]

    # -- HTTP ------------------------------------------------------------------------------
    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(req.path)
        query = urllib.parse.parse_qs(url.query)
        scopes: list[str] = []
        for value in query.get("scope", []):
            scopes.extend(value.split(" "))  # scopes may also be space-separated in one value
        service = query.get("service", [None])[0]
        account: str | None = None

        def answer(
            status: int,
            body: dict[str, object],
            extra: dict[str, str] | None = None,
            granted: list[dict[str, object]] | None = None,
        ) -> None:
            with self._lock:
                self.requests.append(
                    TokenRequest(account, tuple(scopes), service, status, tuple(granted or ()))
                )
            data = json.dumps(body).encode()
            req.send_response(status)
            req.send_header("Content-Type", "application/json")
            req.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                req.send_header(k, v)
            req.end_headers()
            req.wfile.write(data)

        if url.path != "/token":
            answer(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
            return
        if self.fail_status is not None:
            answer(self.fail_status, {"errors": [{"code": "UNAVAILABLE", "message": "down"}]})
            return
        authz = req.headers.get("Authorization")
        if authz is not None:
            user = self._check_basic(authz)
            if user is None:
                answer(
                    401,
                    {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                    {"WWW-Authenticate": 'Basic realm="stargzfs-test-token"'},
                )
                return
            account = user
        if service is not None and service != self.service:
            answer(400, {"errors": [{"code": "UNSUPPORTED", "message": "unknown service"}]})
            return
        token, access = self.issue(account, scopes)
        answer(
            200,
            {
                "token": token,
                "access_token": token,
                "expires_in": self.expires_in,
                "issued_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
            granted=access,
        )

    def _check_basic(self, authz: str) -> str | None:
        scheme, _, value = authz.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        expected = self.users.get(user)
        if not sep or expected is None or not secrets.compare_digest(expected, password):
            return None
        return user

    # -- key material ----------------------------------------------------------------------
    def _make_cert(self) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
