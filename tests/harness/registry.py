"""Real registry processes for tests: Debian's ``docker-registry`` (CNCF distribution 2.8).

Each :class:`Registry` is one ``docker-registry serve`` process on a free 127.0.0.1 port, with a
generated config, a private temp directory (config, log, storage, credentials) and one of three
auth modes:

* ``"none"``: open registry;
* ``"basic"``: htpasswd with a bcrypt hash (user :data:`TEST_USER`, random password);
* ``"token"``: distribution's token auth, backed by a :class:`~harness.token_server.TokenServer`
  thread in the test process.

With ``tls=True`` the registry serves HTTPS (HTTP/2 offered through ALPN, as distribution does
by default) with a server certificate for ``127.0.0.1`` and ``localhost`` issued by a fresh
test CA (:class:`TLSFiles`; the CA certificate is ``reg.tls.ca_path``). ``reg.url`` is then
``https://...``. stargzfs uses plain HTTP for loopback hosts unless told otherwise, so tests
reach a TLS registry through an explicit ``https://`` location (``--mirror`` or
``registries.conf``) and trust the CA through ``SSL_CERT_FILE``.

Credentials never appear on a command line: skopeo gets them through an auth file
(``--dest-authfile``), written with mode 0600 in the registry's temp directory.

Typical use is through the pytest fixtures in ``tests/conftest.py``; outside pytest::

    with running_registry(auth="basic") as reg:
        reg.push_oci(layout, "v1", "fixtures/two-layer:v1")
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import http.client
import ipaddress
import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Protocol

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .net import free_port, http_status
from .token_server import TokenServer

__all__ = [
    "OCI_MANIFEST",
    "TEST_USER",
    "AuthKind",
    "Registry",
    "RegistryFactory",
    "RegistryStartError",
    "TLSFiles",
    "find_registry_binary",
    "make_tls_files",
    "running_registry",
    "start_registry",
]

AuthKind = Literal["none", "basic", "token"]
TEST_USER = "stargzfs-tester"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_START_TIMEOUT = 10.0
_POLL = 0.005


class RegistryFactory(Protocol):
    """Type of the ``registry_factory`` fixture: starts a registry, closed after the test."""

    def __call__(
        self,
        auth: AuthKind = "none",
        delete_enabled: bool = True,
        token_expires_in: int = 60,
        tls: bool = False,
    ) -> Registry: ...


class RegistryStartError(RuntimeError):
    """The registry process did not come up (the message includes its log)."""


@dataclass(frozen=True)
class TLSFiles:
    """A test CA and a server certificate it issued (for IP ``127.0.0.1`` and DNS
    ``localhost``), as PEM files."""

    ca_path: Path  # the CA certificate: what clients trust (SSL_CERT_FILE=...)
    cert_path: Path  # the server certificate
    key_path: Path  # the server's private key (mode 0600)
    cert_dir: Path  # a containers-certs.d(5) directory holding ca.crt (skopeo --*-cert-dir)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_tls_files(directory: Path, *, common_name: str = "stargzfs test CA") -> TLSFiles:
    """Generate a CA (P-256, valid for two days) and a server certificate it signed, with the
    extensions strict verifiers want (key identifiers, serverAuth, SANs), into ``directory``."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = TLSFiles(
        ca_path=directory / "ca.pem",
        cert_path=directory / "server.pem",
        key_path=directory / "server.key",
        cert_dir=directory / "certs.d",
    )
    files.ca_path.write_bytes(ca.public_bytes(pem))
    files.cert_path.write_bytes(cert.public_bytes(pem))
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(files.key_path, key_pem.decode("ascii"))
    files.cert_dir.mkdir()
    shutil.copyfile(files.ca_path, files.cert_dir / "ca.crt")
    return files


def _https_status(port: int, ca_path: Path, path: str, timeout: float = 0.5) -> int | None:
    """:func:`~harness.net.http_status` over TLS, verifying the server against ``ca_path``."""
    ctx = ssl.create_default_context(cafile=str(ca_path))
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=ctx)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:  # ssl.SSLError included
        return None
    finally:
        conn.close()


def find_registry_binary() -> str | None:
    """Path of distribution's registry binary (Debian: ``/usr/bin/docker-registry``)."""
    for name in ("docker-registry", "registry"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class Registry:
    """A running (or stopped, see :meth:`stop`) registry process and how to reach it."""

    host: str  # "127.0.0.1:PORT"
    url: str  # "http://127.0.0.1:PORT" ("https://..." with TLS)
    port: int
    auth: AuthKind
    username: str | None  # None for an open registry
    password: str | None
    token_server: TokenServer | None  # only for auth="token"; has .issued, .expires_in, ...
    workdir: Path  # private temp dir: config, log, credentials, storage
    data_dir: Path  # the filesystem driver's root directory
    config_path: Path
    log_path: Path
    authfile: Path | None  # containers-auth.json with the credentials (None when open)
    delete_enabled: bool
    binary: str
    tls: TLSFiles | None = None  # set when the registry serves HTTPS
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    # -- references --------------------------------------------------------------------------
    def ref(self, repo_and_tag: str) -> str:
        """``"repo:tag"`` (or ``"repo@sha256:..."``) → ``"127.0.0.1:PORT/repo:tag"``."""
        return f"{self.host}/{repo_and_tag}"

    # -- content -----------------------------------------------------------------------------
    def push_oci(self, layout_dir: Path | str, tag: str, dest_repo_and_tag: str) -> str:
        """Copy ``oci:layout_dir:tag`` to ``dest_repo_and_tag`` here with skopeo, keeping every
        digest (the manifest is uploaded byte for byte). Returns the full reference."""
        dest = self.ref(dest_repo_and_tag)
        cmd = ["skopeo", "--insecure-policy", "copy", "--quiet", "--preserve-digests"]
        if self.tls is not None:
            # Verified against the test CA: the certificate is also fine for Go clients.
            cmd += ["--dest-tls-verify=true", "--dest-cert-dir", str(self.tls.cert_dir)]
        else:
            cmd += ["--dest-tls-verify=false"]
        if self.authfile is not None:
            cmd += ["--dest-authfile", str(self.authfile)]
        else:
            cmd += ["--dest-no-creds"]
        cmd += [f"oci:{Path(layout_dir).resolve()}:{tag}", f"docker://{dest}"]
        env = {k: v for k, v in os.environ.items() if k != "REGISTRY_AUTH_FILE"}
        res = subprocess.run(cmd, capture_output=True, env=env, timeout=120, check=False)
        if res.returncode != 0:
            raise RuntimeError(
                f"skopeo push to {dest} failed ({res.returncode}):\n"
                f"{res.stderr.decode(errors='replace')}\n--- registry log ---\n{self.log_tail()}"
            )
        return dest

    # -- process lifecycle -------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        """(Re)start the registry on the same port with the same data. Returns once ``/v2/``
        answers (200 open, 401 with auth)."""
        if self.running:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [self.binary, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise RegistryStartError(
                    f"registry on {self.host} exited with {code}:\n{self.log_tail()}"
                )
            if self.tls is not None:
                status = _https_status(self.port, self.tls.ca_path, "/v2/")
            else:
                status = http_status("127.0.0.1", self.port, "/v2/")
            if status in (200, 401):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RegistryStartError(
                    f"registry on {self.host} not ready after {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(_POLL)

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL). Port, config and data stay for
        :meth:`start`. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop everything and delete the temp directory (storage included)."""
        self.stop()
        if self.token_server is not None:
            self.token_server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _write_private(path: Path, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)


def _config(reg: Registry, auth: dict[str, object] | None) -> dict[str, object]:
    http: dict[str, object] = {"addr": reg.host, "secret": secrets.token_hex(16)}
    if reg.tls is not None:
        http["tls"] = {"certificate": str(reg.tls.cert_path), "key": str(reg.tls.key_path)}
    config: dict[str, object] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(reg.data_dir)},
            "delete": {"enabled": reg.delete_enabled},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": http,
    }
    if auth:
        config["auth"] = auth
    return config


def start_registry(
    auth: AuthKind = "none",
    *,
    delete_enabled: bool = True,
    token_expires_in: int = 60,
    tls: bool = False,
    binary: str | None = None,
    base_dir: Path | None = None,
) -> Registry:
    """Start a fresh registry (and its token server for ``auth="token"``); with ``tls`` it
    serves HTTPS with a certificate from a fresh test CA (``reg.tls``). The caller must
    :meth:`Registry.close` it; prefer :func:`running_registry` or the pytest fixtures."""
    if auth not in ("none", "basic", "token"):
        raise ValueError(f"unknown auth kind {auth!r}")
    binary = binary or find_registry_binary()
    if binary is None:
        raise RegistryStartError("docker-registry not found: run scripts/install-system-deps.sh")
    workdir = Path(tempfile.mkdtemp(prefix=f"stargzfs-registry-{auth}-", dir=base_dir))
    data_dir = workdir / "storage"
    data_dir.mkdir()
    username = password = None
    token_server: TokenServer | None = None
    authfile: Path | None = None
    auth_cfg: dict[str, object] | None = None
    try:
        tls_files = make_tls_files(workdir) if tls else None
        scheme = "https" if tls else "http"
        if auth != "none":
            username, password = TEST_USER, secrets.token_urlsafe(18)
        if auth == "basic":
            assert password is not None
            htpasswd = workdir / "htpasswd"
            # cost 4 (bcrypt's minimum) keeps every authenticated request fast.
            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
            _write_private(htpasswd, f"{username}:{hashed}\n")
            auth_cfg = {"htpasswd": {"realm": "stargzfs-test", "path": str(htpasswd)}}
        elif auth == "token":
            assert username is not None and password is not None
            token_server = TokenServer(
                workdir, users={username: password}, expires_in=token_expires_in
            ).start()
            auth_cfg = {
                "token": {
                    "realm": token_server.realm,
                    "service": token_server.service,
                    "issuer": token_server.issuer,
                    "rootcertbundle": str(token_server.cert_path),
                }
            }
        for attempt in range(5):
            port = free_port()
            host = f"127.0.0.1:{port}"
            if username is not None and password is not None:
                authfile = workdir / "auth.json"
                token = base64.b64encode(f"{username}:{password}".encode()).decode()
                _write_private(authfile, json.dumps({"auths": {host: {"auth": token}}}))
            reg = Registry(
                host=host,
                url=f"{scheme}://{host}",
                port=port,
                auth=auth,
                username=username,
                password=password,
                token_server=token_server,
                workdir=workdir,
                data_dir=data_dir,
                config_path=workdir / "config.yml",
                log_path=workdir / "registry.log",
                authfile=authfile,
                delete_enabled=delete_enabled,
                binary=binary,
                tls=tls_files,
            )
            # JSON is valid YAML, and needs no quoting rules of its own.
            reg.config_path.write_text(json.dumps(_config(reg, auth_cfg), indent=2))
            try:
                reg.start()
                return reg
            except RegistryStartError as exc:
                # Someone took the port between free_port() and the bind: try another one.
                if "address already in use" not in str(exc) or attempt == 4:
                    raise
        raise AssertionError("unreachable")
    except BaseException:
        if token_server is not None:
            token_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        raise


@contextlib.contextmanager
def running_registry(
    auth: AuthKind = "none",
    *,
    delete_enabled: bool = True,
    token_expires_in: int = 60,
    tls: bool = False,
) -> Iterator[Registry]:
    """:func:`start_registry` as a context manager that always cleans up."""
    reg = start_registry(
        auth, delete_enabled=delete_enabled, token_expires_in=token_expires_in, tls=tls
    )
    try:
        yield reg
    finally:
        reg.close()
