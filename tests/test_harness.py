"""The harness itself: real registries (open, Basic, token), the token server, the mount runner.

The registry checks use a deliberately minimal httpx client that does the Basic and Bearer
flows by hand, so they prove the fixtures behave like real registries, independently of
stargzfs's own client.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import (
    FIXTURE_MANIFEST_DIGEST,
    OCI_MANIFEST,
    MountedProcess,
    MountError,
    Registry,
    RegistryFactory,
    hellofs,
    is_mounted,
    mounted,
)

LAYER_DIGEST = "sha256:0ffa2fec3c500b308c2f5a54214d095314301a3c552a2a1e379b8c89fa65c694"


# -- a minimal registry client ------------------------------------------------------------------
def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


def fetch_token(
    challenge: dict[str, str], scope: str, creds: tuple[str, str] | None
) -> dict[str, Any]:
    resp = httpx.get(
        challenge["realm"],
        params={"service": challenge["service"], "scope": scope},
        auth=httpx.BasicAuth(*creds) if creds else None,
        timeout=10,
    )
    resp.raise_for_status()
    body: dict[str, Any] = resp.json()
    return body


@contextlib.contextmanager
def login(reg: Registry, repo: str, actions: str = "pull") -> Iterator[httpx.Client]:
    """A client authorized for ``repo`` the way a registry client must do it: ask ``/v2/``,
    follow the challenge."""
    with httpx.Client(base_url=reg.url, timeout=10) as client:
        authorize(client, reg, repo, actions)
        yield client


def authorize(client: httpx.Client, reg: Registry, repo: str, actions: str) -> None:
    resp = client.get("/v2/")
    if resp.status_code == 200:
        assert reg.auth == "none"
        return
    assert resp.status_code == 401, resp.text
    scheme, params = parse_challenge(resp.headers["WWW-Authenticate"])
    assert reg.username is not None and reg.password is not None
    if scheme == "basic":
        assert reg.auth == "basic"
        client.auth = httpx.BasicAuth(reg.username, reg.password)
    else:
        assert (scheme, reg.auth) == ("bearer", "token")
        body = fetch_token(params, f"repository:{repo}:{actions}", (reg.username, reg.password))
        client.headers["Authorization"] = f"Bearer {body['token']}"
    assert client.get("/v2/").status_code == 200


def blob_bytes(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def check_image(client: httpx.Client, repo: str, layout: Path) -> None:
    """Manifest byte for byte, then a blob range (206 with exactly those bytes)."""
    resp = client.get(f"/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == OCI_MANIFEST
    assert resp.headers["Docker-Content-Digest"] == FIXTURE_MANIFEST_DIGEST
    assert resp.content == blob_bytes(layout, FIXTURE_MANIFEST_DIGEST)
    assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == FIXTURE_MANIFEST_DIGEST
    layer_digests = [layer["digest"] for layer in json.loads(resp.content)["layers"]]
    assert LAYER_DIGEST in layer_digests

    blob = blob_bytes(layout, LAYER_DIGEST)
    start, end = 1000, 40_999  # inclusive, like the header
    resp = client.get(
        f"/v2/{repo}/blobs/{LAYER_DIGEST}",
        headers={"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"},
        follow_redirects=True,
    )
    assert resp.status_code == 206, resp.text
    assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{len(blob)}"
    assert resp.content == blob[start : end + 1]


# -- registries ---------------------------------------------------------------------------------
@pytest.mark.registry
@pytest.mark.parametrize("which", ["registry", "registry_basic", "registry_token"])
def test_registry_variant_serves_pushed_image(
    which: str, request: pytest.FixtureRequest, oci_layout: Path
) -> None:
    reg: Registry = request.getfixturevalue(which)
    repo = f"harness/{which.replace('_', '-')}"
    assert reg.push_oci(oci_layout, "v1", f"{repo}:v1") == f"{reg.host}/{repo}:v1"
    assert reg.url == f"http://{reg.host}" and reg.host == f"127.0.0.1:{reg.port}"
    with login(reg, repo) as client:
        check_image(client, repo, oci_layout)
    if reg.auth != "none":
        # Without credentials, and with wrong ones, nothing is readable.
        anon = httpx.get(f"{reg.url}/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert anon.status_code == 401
        bad = httpx.get(f"{reg.url}/v2/", auth=httpx.BasicAuth(reg.username or "", "wrong"))
        assert bad.status_code == 401
    if reg.auth == "token":
        assert reg.token_server is not None and reg.token_server.issued >= 2  # skopeo + us


@pytest.mark.registry
def test_fixture_image(fixture_image: str, registry: Registry, oci_layout: Path) -> None:
    assert fixture_image == f"{registry.host}/fixtures/two-layer:v1"
    with login(registry, "fixtures/two-layer") as client:
        check_image(client, "fixtures/two-layer", oci_layout)


@pytest.mark.registry
def test_token_server_policy(registry_token: Registry, oci_layout: Path) -> None:
    reg = registry_token
    ts = reg.token_server
    assert ts is not None
    repo = "harness/token-policy"
    reg.push_oci(oci_layout, "v1", f"{repo}:v1")
    challenge = parse_challenge(httpx.get(f"{reg.url}/v2/").headers["WWW-Authenticate"])[1]
    assert challenge["realm"] == ts.realm and challenge["service"] == ts.service

    # Anonymous: a token with no access; the registry says 401 (insufficient scope).
    before = ts.issued
    anon = fetch_token(challenge, f"repository:{repo}:pull", None)
    assert ts.issued == before + 1
    assert ts.requests[-1].account is None and not ts.requests[-1].granted
    resp = httpx.get(
        f"{reg.url}/v2/{repo}/manifests/v1",
        headers={"Accept": OCI_MANIFEST, "Authorization": f"Bearer {anon['token']}"},
    )
    assert resp.status_code == 401
    assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]

    # Wrong password: the token server refuses, no token issued.
    bad = httpx.get(
        challenge["realm"],
        params={"service": ts.service, "scope": f"repository:{repo}:pull"},
        auth=httpx.BasicAuth(reg.username or "", "wrong"),
    )
    assert bad.status_code == 401 and ts.issued == before + 1

    # Anonymous pull can be allowed (reset before the next test by conftest).
    ts.anonymous_actions = {"pull"}
    anon = fetch_token(challenge, f"repository:{repo}:pull,push", None)
    assert list(ts.requests[-1].granted) == [
        {"type": "repository", "name": repo, "actions": ["pull"]}
    ]
    resp = httpx.get(
        f"{reg.url}/v2/{repo}/manifests/v1",
        headers={"Accept": OCI_MANIFEST, "Authorization": f"Bearer {anon['access_token']}"},
    )
    assert resp.status_code == 200
    assert resp.headers["Docker-Content-Digest"] == FIXTURE_MANIFEST_DIGEST

    # An outage of the token server: no token, nothing counted.
    ts.fail_status = 503
    count = ts.issued
    down = httpx.get(challenge["realm"], params={"service": ts.service, "scope": "x"})
    assert down.status_code == 503 and ts.issued == count
    ts.fail_status = None

    # A token for another repository does not open this one.
    creds = (reg.username or "", reg.password or "")
    other = fetch_token(challenge, "repository:elsewhere:pull", creds)
    resp = httpx.get(
        f"{reg.url}/v2/{repo}/manifests/v1",
        headers={"Accept": OCI_MANIFEST, "Authorization": f"Bearer {other['token']}"},
    )
    assert resp.status_code == 401


@pytest.mark.registry
@pytest.mark.slow
def test_token_expiry(registry_factory: RegistryFactory, oci_layout: Path) -> None:
    reg = registry_factory("token", token_expires_in=2)
    ts = reg.token_server
    assert ts is not None and reg.username and reg.password
    repo = "harness/expiry"
    reg.push_oci(oci_layout, "v1", f"{repo}:v1")
    challenge = parse_challenge(httpx.get(f"{reg.url}/v2/").headers["WWW-Authenticate"])[1]
    creds = (reg.username, reg.password)
    url = f"{reg.url}/v2/{repo}/manifests/v1"

    def get_with(token: str) -> int:
        headers = {"Accept": OCI_MANIFEST, "Authorization": f"Bearer {token}"}
        return httpx.get(url, headers=headers).status_code

    issued_at = time.time()
    body = fetch_token(challenge, f"repository:{repo}:pull", creds)
    assert body["expires_in"] == 2
    assert get_with(body["token"]) == 200
    # The registry compares whole seconds: 2 s after the issuing second has ended, it is dead.
    time.sleep(max(0.0, int(issued_at) + 3.2 - time.time()))
    assert get_with(body["token"]) == 401
    before = ts.issued
    fresh = fetch_token(challenge, f"repository:{repo}:pull", creds)
    assert ts.issued == before + 1
    assert get_with(fresh["token"]) == 200


@pytest.mark.registry
def test_stop_start_keeps_port_and_data(
    registry_factory: RegistryFactory, oci_layout: Path
) -> None:
    reg = registry_factory("basic")
    repo = "harness/outage"
    reg.push_oci(oci_layout, "v1", f"{repo}:v1")
    host, data_dir = reg.host, reg.data_dir
    reg.stop()
    assert not reg.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{reg.url}/v2/", timeout=2)
    reg.start()
    assert reg.running and reg.host == host and reg.data_dir == data_dir
    with login(reg, repo) as client:
        check_image(client, repo, oci_layout)


@pytest.mark.registry
@pytest.mark.parametrize("delete_enabled", [True, False])
def test_delete_enabled_or_not(
    registry_factory: RegistryFactory, oci_layout: Path, delete_enabled: bool
) -> None:
    reg = registry_factory("none", delete_enabled=delete_enabled)
    repo = "harness/delete"
    reg.push_oci(oci_layout, "v1", f"{repo}:v1")
    resp = httpx.delete(f"{reg.url}/v2/{repo}/manifests/{FIXTURE_MANIFEST_DIGEST}")
    assert resp.status_code == (202 if delete_enabled else 405)
    after = httpx.get(f"{reg.url}/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert after.status_code == (404 if delete_enabled else 200)


@pytest.mark.registry
def test_close_removes_data_and_process(registry_factory: RegistryFactory) -> None:
    reg = registry_factory("token")
    assert reg.token_server is not None
    realm = reg.token_server.realm
    reg.close()
    assert not reg.running and not reg.workdir.exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{reg.url}/v2/", timeout=2)
    with pytest.raises(httpx.ConnectError):
        httpx.get(realm, timeout=2)


@pytest.mark.registry
def test_credentials_stay_off_command_lines(
    registry_basic: Registry, oci_layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    real_run = subprocess.run

    def spy(cmd: list[str], *args: Any, **kwargs: Any) -> Any:
        seen.append(list(cmd))
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", spy)
    registry_basic.push_oci(oci_layout, "v1", "harness/argv:v1")
    assert seen and registry_basic.password
    assert not any(registry_basic.password in arg for cmd in seen for arg in cmd)
    assert registry_basic.authfile is not None
    assert registry_basic.authfile.stat().st_mode & 0o077 == 0
    config = registry_basic.config_path.read_text()
    assert registry_basic.password not in config


# -- FUSE mounts --------------------------------------------------------------------------------
def hello_argv(mnt: Path, *extra: str) -> list[str]:
    return [sys.executable, hellofs.__file__, str(mnt), *extra]


@pytest.mark.fuse
def test_mounter_fixture_mounts_and_reads(
    mounter: Callable[..., MountedProcess], mountpoint: Path
) -> None:
    fs = mounter(hello_argv(mountpoint), mountpoint, timeout=15)
    assert fs.is_mounted() and os.path.ismount(mountpoint)
    assert os.listdir(mountpoint) == ["hello"]
    assert (mountpoint / "hello").read_bytes() == hellofs.DEFAULT_CONTENT
    with pytest.raises(OSError) as exc:
        (mountpoint / "hello").write_bytes(b"x")
    assert exc.value.errno in (errno.EROFS, errno.EACCES)


@pytest.mark.fuse
def test_mounted_unmounts_and_reaps(fuse_available: None, mountpoint: Path) -> None:
    with mounted(hello_argv(mountpoint, "--content", "hi"), mountpoint) as fs:
        assert (mountpoint / "hello").read_text() == "hi"
    assert fs.unmounted_by == "-u" and not is_mounted(mountpoint)
    assert fs.proc.returncode == 0  # it exited by itself after fusermount3 -u


@pytest.mark.fuse
def test_mounted_fails_fast_with_stderr(fuse_available: None, mountpoint: Path) -> None:
    argv = [sys.executable, "-c", "import sys; sys.stderr.write('boom: no image'); sys.exit(4)"]
    started = time.monotonic()
    with (
        pytest.raises(MountError, match=r"exited with 4(.|\n)*boom: no image"),
        mounted(argv, mountpoint),
    ):
        pass
    assert time.monotonic() - started < 5
    assert not is_mounted(mountpoint)


@pytest.mark.fuse
def test_mounted_times_out_and_kills(fuse_available: None, mountpoint: Path) -> None:
    pid_file = mountpoint.parent / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    argv = [sys.executable, "-c", code]
    started = time.monotonic()
    with pytest.raises(MountError, match="not mounted after"), mounted(argv, mountpoint, 0.5):
        pass
    assert time.monotonic() - started < 8
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.fuse
def test_killed_daemon_leaves_no_stale_mount(fuse_available: None, mountpoint: Path) -> None:
    with mounted(hello_argv(mountpoint), mountpoint) as fs:
        fs.kill(signal.SIGKILL)
        fs.proc.wait(timeout=5)
        assert is_mounted(mountpoint)  # stale: the kernel still has it
        with pytest.raises(OSError) as exc:
            os.listdir(mountpoint)
        assert exc.value.errno == errno.ENOTCONN
    assert fs.unmounted_by == "-u" and not is_mounted(mountpoint)
    assert os.listdir(mountpoint) == []


@pytest.mark.fuse
def test_busy_mount_is_lazily_detached(fuse_available: None, mountpoint: Path) -> None:
    started = time.monotonic()
    with mounted(hello_argv(mountpoint), mountpoint) as fs:
        busy = open(mountpoint / "hello", "rb")  # noqa: SIM115 - held across the teardown
    try:
        assert fs.unmounted_by == "-uz"
        assert not is_mounted(mountpoint)
        assert fs.proc.poll() is not None
        assert time.monotonic() - started < 8
    finally:
        busy.close()


@pytest.mark.fuse
def test_sigterm_unmounts_cleanly(fuse_available: None, mountpoint: Path) -> None:
    with mounted(hello_argv(mountpoint), mountpoint) as fs:
        fs.kill(signal.SIGTERM)
        assert fs.proc.wait(timeout=10) == 0
        assert not is_mounted(mountpoint)
    assert fs.unmounted_by is None


@pytest.mark.fuse
def test_refuses_existing_mount(fuse_available: None, mountpoint: Path) -> None:
    with (
        mounted(hello_argv(mountpoint), mountpoint),
        pytest.raises(MountError, match="already"),
        mounted(hello_argv(mountpoint), mountpoint),
    ):
        pass
