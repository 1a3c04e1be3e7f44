"""Fixtures shared by the whole suite (the harness itself lives in ``tests/harness``).

Registries (real ``docker-registry`` processes, see ``harness/registry.py``):

* ``registry``, ``registry_basic``, ``registry_token``: session-scoped open / htpasswd / token
  registries. Shared by many tests: push to your own repository names, don't delete what others
  pushed, and use ``registry_factory`` for anything destructive (outages, deletes, policies).
  If a test leaves one stopped or changes its token policy, it is restarted / reset before
  the next test.
* ``registry_tls``: session-scoped open registry over HTTPS (HTTP/2 offered), its certificate
  issued by a test CA (``.tls.ca_path``); ``.url`` is ``https://...``. stargzfs needs an
  explicit ``https://`` location (``--mirror``, registries.conf) to use TLS on loopback.
* ``registry_factory(auth="none"|"basic"|"token", delete_enabled=True, token_expires_in=60,
  tls=False)``: function-scoped; every registry it starts is closed after the test.
* ``fixtures_dir``: ``../shared/fixtures`` (or ``$STARGZFS_FIXTURES``); ``fixture_image``: the
  ``oci-image`` fixture pushed to ``registry`` as ``fixtures/two-layer:v1`` (its reference).

FUSE (``harness/mount.py``): ``mountpoint`` (an empty directory), ``mounter(argv,
mountpoint, timeout=15.0)``, which starts a filesystem process, waits for its mount and always
unmounts and reaps it after the test, and ``fuse_available`` (skip unless FUSE works here).

Tests using registry fixtures get the ``registry`` marker, tests using ``mounter`` or
``fuse_available`` the ``fuse`` marker, automatically. Missing system tools skip those tests,
except under CI (``CI`` set), where they fail: CI must never pass by skipping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from harness import (
    AuthKind,
    MountedProcess,
    Registry,
    RegistryFactory,
    find_registry_binary,
    mounted,
    start_registry,
    unmount,
)
from harness.mount import mount_entries
from harness.proxy import RegistryProxy

REPO_ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")

_REGISTRY_FIXTURES = frozenset(
    {
        "registry",
        "registry_basic",
        "registry_token",
        "registry_tls",
        "registry_factory",
        "fixture_image",
    }
)
_FUSE_FIXTURES = frozenset({"mounter", "fuse_available"})
_session_registries: list[Registry] = []
_fuse_mounts_at_start: set[str] = set()


def require(condition: bool, reason: str) -> None:
    """Skip the test when ``condition`` is false (fail instead under CI)."""
    if not condition:
        if IN_CI:
            pytest.fail(f"{reason} (CI: missing requirements fail instead of skipping)")
        pytest.skip(reason)


def _fuse_mountpoints() -> set[str]:
    return {mp for mp, fstype in mount_entries() if fstype == "fuse" or fstype.startswith("fuse.")}


# -- hooks --------------------------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    _fuse_mounts_at_start.update(_fuse_mountpoints())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _REGISTRY_FIXTURES:
            item.add_marker(pytest.mark.registry)
        if names & _FUSE_FIXTURES:
            item.add_marker(pytest.mark.fuse)


def pytest_runtest_setup(item: pytest.Item) -> None:
    # A test that stopped a shared registry or changed its token policy must not break the next.
    for reg in _session_registries:
        if not reg.running:
            reg.start()
        if reg.token_server is not None:
            reg.token_server.reset_policy()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Only this session's own mounts (under its temp dir): another pytest run on the same
    # machine (a developer's, in parallel) may have live mounts of its own.
    base = str(session.config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    leaked = sorted(
        mp for mp in _fuse_mountpoints() - _fuse_mounts_at_start if mp.startswith(base + os.sep)
    )
    if not leaked:
        return
    for mnt in leaked:
        with contextlib.suppress(RuntimeError):
            unmount(mnt)
    print(f"\nERROR: tests left FUSE mounts behind (now unmounted): {', '.join(leaked)}")
    if session.exitstatus == 0:
        session.exitstatus = 1


# -- shared data --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``../shared/fixtures`` relative to the repository (override: ``$STARGZFS_FIXTURES``)."""
    path = Path(os.environ.get("STARGZFS_FIXTURES") or REPO_ROOT.parent / "shared" / "fixtures")
    if not (path / "oci-image").is_dir():
        pytest.skip(f"shared fixtures not found at {path} (set STARGZFS_FIXTURES)")
    return path


@pytest.fixture(scope="session")
def oci_layout(fixtures_dir: Path) -> Path:
    """The 2-layer OCI image layout of the shared fixtures (tag ``v1``)."""
    return fixtures_dir / "oci-image"


# -- registries ---------------------------------------------------------------------------------
def _require_registry_tools() -> None:
    require(
        find_registry_binary() is not None and shutil.which("skopeo") is not None,
        "docker-registry and skopeo are needed: run scripts/install-system-deps.sh",
    )


@contextlib.contextmanager
def _session_registry(auth: AuthKind, tls: bool = False) -> Iterator[Registry]:
    _require_registry_tools()
    reg = start_registry(auth, tls=tls)
    _session_registries.append(reg)
    try:
        yield reg
    finally:
        _session_registries.remove(reg)
        reg.close()


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    """An open registry (no auth), shared by the session."""
    with _session_registry("none") as reg:
        yield reg


@pytest.fixture(scope="session")
def registry_basic() -> Iterator[Registry]:
    """A registry with htpasswd (Basic) auth; credentials in ``.username``/``.password``."""
    with _session_registry("basic") as reg:
        yield reg


@pytest.fixture(scope="session")
def registry_token() -> Iterator[Registry]:
    """A registry with token auth (tokens valid 60 s); ``.token_server`` counts tokens."""
    with _session_registry("token") as reg:
        yield reg


@pytest.fixture(scope="session")
def registry_tls() -> Iterator[Registry]:
    """An open registry serving HTTPS; trust ``.tls.ca_path`` (e.g. ``SSL_CERT_FILE``)."""
    with _session_registry("none", tls=True) as reg:
        yield reg


@pytest.fixture
def registry_factory() -> Iterator[RegistryFactory]:
    """Start registries with custom settings; each is stopped and deleted after the test."""
    _require_registry_tools()
    started: list[Registry] = []

    def factory(
        auth: AuthKind = "none",
        delete_enabled: bool = True,
        token_expires_in: int = 60,
        tls: bool = False,
    ) -> Registry:
        reg = start_registry(
            auth, delete_enabled=delete_enabled, token_expires_in=token_expires_in, tls=tls
        )
        started.append(reg)
        return reg

    yield factory
    for reg in started:
        reg.close()


@pytest.fixture(scope="session")
def fixture_image(registry: Registry, oci_layout: Path) -> str:
    """``oci-image`` pushed to ``registry`` as ``fixtures/two-layer:v1``; returns the reference
    (``127.0.0.1:PORT/fixtures/two-layer:v1``). Read-only: don't delete or overwrite it."""
    return registry.push_oci(oci_layout, "v1", "fixtures/two-layer:v1")


# -- FUSE -----------------------------------------------------------------------------------------
@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    """An empty directory to mount on."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return mnt


@pytest.fixture
def fuse_available() -> None:
    """Skips (fails under CI) unless this process can mount FUSE filesystems. For tests that
    use ``harness.mounted`` directly; ``mounter`` includes it."""
    require(os.path.exists("/dev/fuse"), "/dev/fuse is missing")
    require(shutil.which("fusermount3") is not None, "fusermount3 missing (apt install fuse3)")
    require(os.access("/dev/fuse", os.R_OK | os.W_OK), "/dev/fuse not accessible (run as root)")


@pytest.fixture
def mounter(fuse_available: None) -> Iterator[Callable[..., MountedProcess]]:
    """``mounter(argv, mountpoint, timeout=15.0, env=None)`` → :class:`MountedProcess`, mounted;
    unmounted and reaped after the test whatever happens."""
    with contextlib.ExitStack() as stack:

        def mount(
            argv: Sequence[str | os.PathLike[str]],
            mountpoint: str | os.PathLike[str],
            timeout: float = 15.0,
            env: Mapping[str, str] | None = None,
        ) -> MountedProcess:
            return stack.enter_context(mounted(argv, mountpoint, timeout, env=env))

        yield mount


@pytest.fixture
def registry_proxy(registry: Registry) -> Iterator[RegistryProxy]:
    """A misbehaving, byte-counting proxy in front of the open registry (harness/proxy.py)."""
    proxy = RegistryProxy(registry.host)
    try:
        yield proxy
    finally:
        proxy.close()
