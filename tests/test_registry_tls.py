"""The registry client over TLS: a private CA trusted through ``SSL_CERT_FILE``, HTTP/2 with
one connection for many requests, and an untrusted certificate as a clear, fast failure.

The registry (``registry_tls``, distribution 2.8) serves HTTPS on 127.0.0.1 with a certificate
for ``127.0.0.1`` and ``localhost`` from a test CA. stargzfs talks plain HTTP to loopback hosts
by default, so these tests reach it through explicit ``https://`` locations: a registries.conf
``location`` and a ``--mirror``. Plain-HTTP loopback registries are what the rest of the suite
uses. What HTTP version and how many connections were used is observed on both ends, without
mocks: the client's ``--debug`` line for every response (``→ 206 (HTTP/2)``) and the registry's
access log (protocol, and the client's address and port per request).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Registry, RegistryFactory, make_tls_files

pytestmark = pytest.mark.registry

NAME = "tls.test"  # the registry name images are pulled by; registries.conf maps it
REPO_TAG = "fixtures/two-layer:v1"
_CLIENT_LINE = re.compile(r"^stargzfs: DEBUG: ([A-Z]+) (https?://\S+) → (\d{3}) \((HTTP/[\d.]+)\)$")
_SERVER_LINE = re.compile(
    r'msg="response completed.*http\.request\.remoteaddr="?([^" ]+)"?.*'
    r"http\.request\.useragent=stargzfs/"
)
_ACCESS_LINE = re.compile(r'"[A-Z]+ /v2/\S* (HTTP/[\d.]+)" \d{3} .*"stargzfs/')


def run(
    *args: str, env: dict[str, str], registries_conf: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    full_env |= env
    if registries_conf is not None:
        full_env["CONTAINERS_REGISTRIES_CONF"] = str(registries_conf)
    return subprocess.run(
        [sys.executable, "-m", "stargzfs", *args],
        capture_output=True,
        env=full_env,
        timeout=60,
        check=False,
    )


def _registries_conf(path: Path, location: str) -> Path:
    path.write_text(f'[[registry]]\nprefix = "{NAME}"\nlocation = "{location}"\n')
    return path


def _log_size(reg: Registry) -> int:
    return reg.log_path.stat().st_size


def _server_requests(reg: Registry, since: int) -> tuple[list[str], list[str]]:
    """(client address:port, protocol) of each stargzfs request the registry logged since
    byte ``since`` of its log."""
    with open(reg.log_path, "rb") as f:
        f.seek(since)
        lines = f.read().decode(errors="replace").splitlines()
    addrs = [m.group(1) for line in lines if (m := _SERVER_LINE.search(line))]
    protos = [m.group(1) for line in lines if (m := _ACCESS_LINE.search(line))]
    return addrs, protos


def _client_responses(stderr: bytes) -> list[tuple[str, str, int, str]]:
    """(method, url, status, http version) of every response the client's debug log shows."""
    out = []
    for line in stderr.decode(errors="replace").splitlines():
        if m := _CLIENT_LINE.match(line):
            out.append((m.group(1), m.group(2), int(m.group(3)), m.group(4)))
    return out


@pytest.fixture(scope="module")
def tls_registry(registry_tls: Registry, oci_layout: Path) -> Registry:
    """``registry_tls`` with the fixture image as ``fixtures/two-layer:v1`` (pushed by skopeo,
    which verifies the certificate against the test CA)."""
    registry_tls.push_oci(oci_layout, "v1", REPO_TAG)
    return registry_tls


@pytest.fixture
def trust(tls_registry: Registry) -> dict[str, str]:
    assert tls_registry.tls is not None
    return {"SSL_CERT_FILE": str(tls_registry.tls.ca_path)}


def _fixture_sha256(fixtures_dir: Path, path: str) -> str:
    entries: list[dict[str, Any]] = json.loads((fixtures_dir / "whiteout-merged.json").read_text())[
        "entries"
    ]
    return next(str(e["sha256"]) for e in entries if e["path"] == path)


def test_tls_harness_serves_https_and_http2(tls_registry: Registry) -> None:
    reg = tls_registry
    assert reg.tls is not None and reg.url == f"https://{reg.host}"
    ctx = ssl.create_default_context(cafile=str(reg.tls.ca_path))
    for host in (f"127.0.0.1:{reg.port}", f"localhost:{reg.port}"):  # both SANs
        with httpx.Client(verify=ctx, http2=True, trust_env=False, timeout=5) as client:
            resp = client.get(f"https://{host}/v2/")
        assert resp.status_code == 200 and resp.http_version == "HTTP/2", host
    with pytest.raises(httpx.ConnectError), httpx.Client(trust_env=False, timeout=5) as client:
        client.get(f"{reg.url}/v2/")  # the test CA is not a public one
    # Plain HTTP to the TLS port: Go's server answers 400 to that.
    assert httpx.get(f"http://{reg.host}/v2/", trust_env=False, timeout=5).status_code == 400


def test_layers_and_cat_over_https_location_use_http2_and_one_connection(
    tls_registry: Registry, trust: dict[str, str], fixtures_dir: Path, tmp_path: Path
) -> None:
    reg = tls_registry
    conf = _registries_conf(tmp_path / "registries.conf", f"https://{reg.host}")
    ref = f"{NAME}/{REPO_TAG}"
    since = _log_size(reg)
    out = run("--debug", "layers", "--json", ref, env=trust, registries_conf=conf)
    assert out.returncode == 0, out.stderr.decode()
    layers = json.loads(out.stdout)["layers"]
    assert [layer["format"] for layer in layers] == ["estargz", "estargz"]
    assert all(layer["verified"] and layer["lazy"] for layer in layers)

    # Client side: every response came over HTTPS to the registry, as HTTP/2.
    responses = _client_responses(out.stderr)
    assert len(responses) >= 4, out.stderr.decode()[-2000:]  # manifest, config, 2 layers
    assert {url.split("/v2/")[0] for _, url, _, _ in responses} == {reg.url}
    assert {version for *_, version in responses} == {"HTTP/2"}
    # Server side: the same requests, HTTP/2 too, all multiplexed on one connection.
    addrs, protos = _server_requests(reg, since)
    assert len(addrs) == len(protos) == len(responses)
    assert set(protos) == {"HTTP/2.0"}
    assert len(set(addrs)) == 1, addrs

    since = _log_size(reg)
    out = run("cat", ref, "etc/passwd", env=trust, registries_conf=conf)
    assert out.returncode == 0, out.stderr.decode()
    assert hashlib.sha256(out.stdout).hexdigest() == _fixture_sha256(fixtures_dir, "etc/passwd")
    addrs, protos = _server_requests(reg, since)
    assert len(addrs) >= 3 and set(protos) == {"HTTP/2.0"} and len(set(addrs)) == 1, addrs


def test_https_mirror_by_dns_name(tls_registry: Registry, trust: dict[str, str]) -> None:
    # The upstream (tls.test) does not exist; the https mirror, named by its DNS SAN, serves.
    reg = tls_registry
    mirror = f"{NAME}=https://localhost:{reg.port}"
    out = run("ls", f"{NAME}/{REPO_TAG}", "/etc", "--mirror", mirror, env=trust)
    assert out.returncode == 0, out.stderr.decode()
    assert "passwd" in out.stdout.decode().split()


def test_untrusted_certificate_is_one_clear_line_and_exit_5(
    registry_factory: RegistryFactory, tmp_path: Path
) -> None:
    reg = registry_factory(tls=True)
    conf = _registries_conf(tmp_path / "registries.conf", f"https://{reg.host}")
    other_ca = make_tls_files(tmp_path, common_name="some other CA").ca_path
    for env in ({}, {"SSL_CERT_FILE": str(other_ca)}):  # no CA configured; the wrong CA
        start = time.monotonic()
        out = run("layers", f"{NAME}/{REPO_TAG}", env=env, registries_conf=conf)
        elapsed = time.monotonic() - start
        err = out.stderr.decode()
        assert out.returncode == 5, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith("stargzfs: error: "), err
        assert f"TLS certificate of {reg.host} not trusted" in err, err
        assert "SSL_CERT_FILE" in err, err  # says how to fix it
        # Not retried: asking again does not make a certificate trusted.
        assert "attempts" not in err and elapsed < 5, f"{elapsed:.1f} s: {err}"
