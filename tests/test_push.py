"""``stargzfs push``: OCI layouts, docker-archives and rootfs directories to real registries,
checked with skopeo; HEAD skips; resumable and interrupted uploads."""

from __future__ import annotations

import io
import json
import random
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from gated_proxy import GatedProxy
from harness import FIXTURE_MANIFEST_DIGEST, Registry, RegistryFactory
from harness.oci import gzip_layer, make_tar, write_oci_layout

from stargzfs.cli.main import main
from stargzfs.push.pusher import push_image
from stargzfs.push.sources import open_source, parse_source
from stargzfs.push.upload import _range_end
from stargzfs.reference import parse_reference
from stargzfs.registry import CredentialResolver, Credentials, RegistryClient


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Upload sessions are remembered under $XDG_CACHE_HOME: keep them per test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _auth_env(monkeypatch: pytest.MonkeyPatch, reg: Registry) -> None:
    if reg.authfile is not None:
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(reg.authfile))
    else:
        monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)


def _skopeo(reg: Registry, *args: str) -> str:
    pre = "src-" if args[0] == "copy" else ""
    auth = [f"--{pre}authfile", str(reg.authfile)] if reg.authfile else [f"--{pre}no-creds"]
    cmd = ["skopeo", "--insecure-policy", args[0], f"--{pre}tls-verify=false", *auth, *args[1:]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _client(reg: Registry, transport: httpx.AsyncBaseTransport | None = None) -> RegistryClient:
    creds = {}
    if reg.username is not None and reg.password is not None:
        creds[reg.host] = Credentials(reg.username, reg.password)
    return RegistryClient(
        credentials=CredentialResolver(creds, env={}), registries=[], transport=transport
    )


def _uploads(reg: Registry, digest: str, wait: bool = True) -> int:
    """Completed blob uploads of ``digest`` in the registry's access log."""
    pattern = re.compile(
        r'"PUT /v2/[^ ]*/blobs/uploads/[^ ]*digest=' + re.escape(digest.replace(":", "%3A"))
    )
    # The access log line may land just after the response: give it a moment.
    found = 0
    for _ in range(20 if wait else 1):
        found = len(pattern.findall(reg.log_path.read_text(errors="replace")))
        if found:
            break
        time.sleep(0.02)
    return found


def _big_layout(root: Path, sizes: list[int], seed: int = 1) -> Path:
    rng = random.Random(seed)
    layers = [gzip_layer(make_tar({f"f{i}.bin": rng.randbytes(n)})) for i, n in enumerate(sizes)]
    return write_oci_layout(root, layers)


def test_parse_source(tmp_path: Path) -> None:
    assert parse_source("oci:/x:v1") == ("oci", "/x", "v1")
    assert parse_source("oci:/x") == ("oci", "/x", None)
    assert parse_source("docker-archive:/a.tar:n:t") == ("docker-archive", "/a.tar", "n:t")
    assert parse_source("dir-rootfs:/r") == ("dir-rootfs", "/r", None)
    f = tmp_path / "a.tar"
    f.write_bytes(b"")
    assert parse_source(str(f)) == ("docker-archive", str(f), None)
    assert _range_end("0-99") == 100
    assert _range_end("bytes=0-0") == 1
    assert _range_end(None) is None


@pytest.mark.parametrize("kind", ["none", "basic", "token"])
def test_push_oci_layout(
    kind: str,
    request: pytest.FixtureRequest,
    oci_layout: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = {"none": "registry", "basic": "registry_basic", "token": "registry_token"}[kind]
    reg: Registry = request.getfixturevalue(name)
    _auth_env(monkeypatch, reg)
    ref = reg.ref(f"push-oci/{kind}:v1")
    assert main(["push", f"oci:{oci_layout}:v1", ref, "--chunk-size", "16k"]) == 0
    assert capsys.readouterr().out.strip() == FIXTURE_MANIFEST_DIGEST
    info = json.loads(_skopeo(reg, "inspect", f"docker://{ref}"))
    assert info["Digest"] == FIXTURE_MANIFEST_DIGEST
    # Re-push: every blob is found by HEAD and skipped.
    assert main(["push", f"oci:{oci_layout}:v1", ref]) == 0
    err = capsys.readouterr().err
    assert "0 blob(s) uploaded" in err and "3 already present" in err


def test_push_docker_archive_round_trip(
    registry: Registry, oci_layout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "image.tar"
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            f"oci:{oci_layout}:v1",
            f"docker-archive:{archive}:example/two:v1",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    ref = registry.ref("push-archive/two:v1")
    assert main(["push", f"docker-archive:{archive}", ref, "-j", "2"]) == 0
    digest = capsys.readouterr().out.strip()
    assert digest.startswith("sha256:")
    # Pull back with skopeo: same config bytes and diff_ids as the source layout.
    back = tmp_path / "back"
    _skopeo(registry, "copy", "--quiet", f"docker://{ref}", f"oci:{back}:v1")
    src_config = json.loads(
        _skopeo(registry, "inspect", "--raw", "--config", f"oci:{oci_layout}:v1")
    )
    got_config = json.loads(_skopeo(registry, "inspect", "--raw", "--config", f"oci:{back}:v1"))
    assert got_config["rootfs"]["diff_ids"] == src_config["rootfs"]["diff_ids"]
    assert got_config == src_config
    raw = json.loads(_skopeo(registry, "inspect", "--raw", f"docker://{ref}"))
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    # Same archive again: deterministic compression, so everything is skipped.
    assert main(["push", str(archive), ref]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == digest
    assert "0 blob(s) uploaded" in out.err


def test_push_docker_archive_tampered_layer_is_exit_6(
    registry: Registry, oci_layout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A byte changed inside an uncompressed layer of a ``docker save`` archive: the layer no
    longer matches the config's diff_id, so nothing is pushed (exit 6, the layer named)."""
    import tarfile

    archive = tmp_path / "image.tar"
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            f"oci:{oci_layout}:v1",
            f"docker-archive:{archive}:example/two:v1",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with tarfile.open(archive) as tar:
        listing = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        name = listing[0]["Layers"][1]
        member = tar.getmember(name)
        config = json.loads(tar.extractfile(listing[0]["Config"]).read())  # type: ignore[union-attr]
    with open(archive, "r+b") as f:
        at = member.offset_data + member.size // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    ref = registry.ref("push-archive/tampered:v1")
    assert main(["push", f"docker-archive:{archive}", ref]) == 6
    err = capsys.readouterr().err
    assert f"layer 1 ({name})" in err and "diff_id" in err
    assert config["rootfs"]["diff_ids"][1] in err
    listed = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--no-creds", f"docker://{ref}"],
        capture_output=True,
        timeout=60,
    )
    assert listed.returncode != 0  # no manifest was pushed


def test_push_rootfs_dir(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hello").write_text("hi\n")
    (root / "bin").mkdir()
    (root / "bin" / "link").symlink_to("../etc/hello")
    ref = registry.ref("push-rootfs/r:v1")
    assert main(["push", f"dir-rootfs:{root}", ref]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    _skopeo(registry, "copy", "--quiet", f"docker://{ref}", f"dir:{out}")
    manifest = json.loads((out / "manifest.json").read_text())
    layer = out / manifest["layers"][0]["digest"].split(":")[1]
    listing = subprocess.run(
        ["tar", "-tzvf", str(layer)], capture_output=True, text=True, check=True
    ).stdout
    assert "etc/hello" in listing and "bin/link -> ../etc/hello" in listing


@pytest.mark.parametrize("kind", ["none", "token"])
def test_push_mount_from_other_repo(
    kind: str,
    request: pytest.FixtureRequest,
    oci_layout: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    reg: Registry = request.getfixturevalue("registry" if kind == "none" else "registry_token")
    _auth_env(monkeypatch, reg)
    src = reg.ref("push-mount/src:v1")
    assert main(["push", f"oci:{oci_layout}:v1", src]) == 0
    dst = reg.ref("push-mount/dst:v1")
    from_repo = f"{reg.host}/push-mount/src"
    assert main(["push", f"oci:{oci_layout}", dst, "--mount-from", from_repo]) == 0
    err = capsys.readouterr().err
    assert "3 mounted" in err
    assert json.loads(_skopeo(reg, "inspect", f"docker://{dst}"))["Digest"] == (
        FIXTURE_MANIFEST_DIGEST
    )


class _Interfere(httpx.AsyncBaseTransport):
    """Forwards to the network. Counting PATCH requests: after ``crash_after`` of them, crash
    (not retryable); the ``fail_at``-th never reaches the registry (retryable); the
    ``drop_at``-th is sent but its answer is lost."""

    def __init__(
        self,
        *,
        crash_after: int | None = None,
        drop_at: int | None = None,
        fail_at: int | None = None,
    ) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.patches = 0
        self.patch_bytes = 0
        self.crash_after = crash_after
        self.drop_at = drop_at
        self.fail_at = fail_at

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PATCH":
            self.patches += 1
            self.patch_bytes += len(request.content)
            if self.crash_after is not None and self.patches > self.crash_after:
                raise RuntimeError("simulated crash")
            if self.fail_at is not None and self.patches == self.fail_at:
                raise httpx.ConnectError("simulated refused connection")
            if self.drop_at is not None and self.patches == self.drop_at:
                resp = await self.inner.handle_async_request(request)
                await resp.aread()
                raise httpx.ReadError("simulated dropped answer")
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _push(reg: Registry, layout: Path, ref: str, transport: Any = None, **kw: Any) -> Any:
    async def run() -> Any:
        with open_source(f"oci:{layout}") as image:
            async with _client(reg, transport) as client:
                return await push_image(client, image, parse_reference(ref), **kw)

    return trio.run(run)


def test_failed_chunk_resumes_session(registry: Registry, tmp_path: Path) -> None:
    layout = _big_layout(tmp_path / "l", [600_000], seed=3)
    ref = registry.ref("push-resume/session:v1")
    digest, report = _push(
        registry, layout, ref, _Interfere(fail_at=3), chunk_size=128 * 1024, jobs=1
    )
    layer = json.loads(_skopeo(registry, "inspect", "--raw", f"docker://{ref}"))["layers"][0]
    # The session said where it stood: no byte was sent twice.
    assert report.results[0].bytes_sent == layer["size"]
    _skopeo(registry, "copy", "--quiet", f"docker://{ref}", f"oci:{tmp_path / 'back'}:v1")
    assert digest == json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]


def test_lost_chunk_answer_restarts_upload(registry: Registry, tmp_path: Path) -> None:
    # distribution signs the offset into the session URL: after a lost answer the URL is
    # stale and the upload starts again (still correct).
    layout = _big_layout(tmp_path / "l", [600_000], seed=4)
    ref = registry.ref("push-resume/lost:v1")
    _push(registry, layout, ref, _Interfere(drop_at=2), chunk_size=128 * 1024, jobs=1)
    _skopeo(registry, "copy", "--quiet", f"docker://{ref}", f"oci:{tmp_path / 'back'}:v1")


def test_interrupted_push_rerun_skips_finished_blobs(
    registry_factory: RegistryFactory, tmp_path: Path
) -> None:
    reg = registry_factory()
    layout = _big_layout(tmp_path / "l", [700_000, 700_000], seed=5)
    manifest_digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs/sha256" / manifest_digest.split(":")[1]).read_text())
    first, second = (d["digest"] for d in manifest["layers"])
    ref = reg.ref("push/interrupted:v1")
    # jobs=1: one layer (6 chunks of 128 KiB) finishes, the other dies mid-upload. Which one
    # goes first is up to the scheduler.
    with pytest.raises(RuntimeError, match="simulated crash"):
        _push(reg, layout, ref, _Interfere(crash_after=8), chunk_size=128 * 1024, jobs=1)
    counts = {d: _uploads(reg, d) for d in (first, second)}
    assert sorted(counts.values()) == [0, 1]
    done = next(d for d, n in counts.items() if n == 1)
    rest = next(d for d, n in counts.items() if n == 0)
    digest, report = _push(reg, layout, ref, chunk_size=128 * 1024, jobs=1)
    assert digest == manifest_digest
    outcomes = {r.digest: r.outcome for r in report.results}
    assert outcomes[done] == "exists"
    assert outcomes[rest] == "uploaded"
    assert _uploads(reg, done) == 1 and _uploads(reg, rest) == 1
    _skopeo(reg, "copy", "--quiet", f"docker://{ref}", f"oci:{tmp_path / 'back'}:v1")


def test_interrupted_blob_resumes_its_session(
    registry_factory: RegistryFactory, tmp_path: Path
) -> None:
    """With a state directory, a blob cut off midway continues where the registry stands."""
    reg = registry_factory()
    layout = _big_layout(tmp_path / "l", [1_000_000], seed=6)
    state = str(tmp_path / "state")
    ref = reg.ref("push/resume-blob:v1")
    chunk = 128 * 1024
    with pytest.raises(RuntimeError, match="simulated crash"):
        _push(reg, layout, ref, _Interfere(crash_after=4), chunk_size=chunk, state_dir=state)
    assert len(list(Path(state).iterdir())) == 1
    t = _Interfere()
    digest, report = _push(reg, layout, ref, t, chunk_size=chunk, state_dir=state)
    size = report.results[0].size
    # Four chunks were in the registry already: only the rest went up again.
    assert t.patch_bytes == size - 4 * chunk
    assert report.results[0].bytes_sent == size - 4 * chunk
    assert list(Path(state).iterdir()) == []
    _skopeo(reg, "copy", "--quiet", f"docker://{ref}", f"oci:{tmp_path / 'back'}:v1")
    assert digest == json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]


def test_stale_remembered_session_starts_over(
    registry_factory: RegistryFactory, tmp_path: Path
) -> None:
    reg = registry_factory()
    layout = _big_layout(tmp_path / "l", [600_000], seed=7)
    state = tmp_path / "state"
    ref = reg.ref("push/stale:v1")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _push(
            reg, layout, ref, _Interfere(crash_after=2), chunk_size=128 * 1024, state_dir=str(state)
        )
    (saved,) = state.iterdir()
    doc = json.loads(saved.read_text())
    doc["location"] = doc["location"].replace("/uploads/", "/uploads/0000")
    saved.write_text(json.dumps(doc))
    t = _Interfere()
    _, report = _push(reg, layout, ref, t, chunk_size=128 * 1024, state_dir=str(state))
    assert t.patch_bytes == report.results[0].size
    _skopeo(reg, "copy", "--quiet", f"docker://{ref}", f"oci:{tmp_path / 'back'}:v1")


def test_push_creds_stdin(
    registry_basic: Registry,
    oci_layout: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import io

    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))  # no stored credentials
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    ref = registry_basic.ref("push-creds/stdin:v1")
    monkeypatch.setattr("sys.stdin", io.StringIO("stargzfs-tester:wrong\n"))
    assert main(["push", f"oci:{oci_layout}:v1", ref, "--creds-stdin"]) == 3
    monkeypatch.setattr(
        "sys.stdin", io.StringIO(f"{registry_basic.username}:{registry_basic.password}\n")
    )
    assert main(["push", f"oci:{oci_layout}:v1", ref, "--creds-stdin"]) == 0
    assert capsys.readouterr().out.strip() == FIXTURE_MANIFEST_DIGEST


def test_push_docker_save_v25_style_archive(
    registry: Registry, oci_layout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`docker save` since Docker 25 writes an OCI layout plus manifest.json, layers under
    blobs/sha256 (here gzip, kept as they are), some as symlinks to others."""
    import tarfile

    index = json.loads((oci_layout / "index.json").read_text())
    mdigest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((oci_layout / "blobs/sha256" / mdigest).read_text())
    layers = [d["digest"].split(":")[1] for d in manifest["layers"]]
    config = manifest["config"]["digest"].split(":")[1]
    archive = tmp_path / "saved.tar"
    with tarfile.open(archive, "w") as tar:
        for hexdigest in [config, *layers]:
            tar.add(oci_layout / "blobs/sha256" / hexdigest, f"blobs/sha256/{hexdigest}")
        link = tarfile.TarInfo("dup/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, f"../blobs/sha256/{layers[0]}"
        tar.addfile(link)
        entry = [
            {
                "Config": f"blobs/sha256/{config}",
                "RepoTags": ["example/saved:v1"],
                "Layers": ["dup/layer.tar", *[f"blobs/sha256/{h}" for h in layers[1:]]],
            }
        ]
        data = json.dumps(entry).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    ref = registry.ref("push-archive/saved:v1")
    assert main(["push", f"docker-archive:{archive}:example/saved:v1", ref]) == 0
    capsys.readouterr()
    raw = json.loads(_skopeo(registry, "inspect", "--raw", f"docker://{ref}"))
    assert raw["config"]["digest"] == manifest["config"]["digest"]
    assert [d["digest"] for d in raw["layers"]] == [d["digest"] for d in manifest["layers"]]
    # A complete image: skopeo pulls it back.
    _skopeo(registry, "copy", "--quiet", f"docker://{ref}", f"oci:{tmp_path / 'back'}:v1")


def test_bad_sources(tmp_path: Path, oci_layout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    dest = "127.0.0.1:1/never/used:v1"
    assert main(["push", f"oci:{tmp_path / 'missing'}", dest]) == 4
    assert main(["push", f"oci:{oci_layout}:nope", dest]) == 4
    assert "tags: v1" in capsys.readouterr().err
    assert main(["push", str(tmp_path), dest]) == 2  # a directory: say which kind
    bad = tmp_path / "bad"
    shutil.copytree(oci_layout, bad)
    blob = next(p for p in (bad / "blobs/sha256").iterdir() if p.stat().st_size > 10_000)
    blob.write_bytes(blob.read_bytes()[:-1])
    assert main(["push", f"oci:{bad}", dest]) == 6
    assert "descriptor says" in capsys.readouterr().err
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    assert main(["push", str(tmp_path / "junk.tar"), dest]) == 6
    assert main(["push", "oci-archive:/x.tar", dest]) == 2
    assert main(["push", f"oci:{oci_layout}", "127.0.0.1:1/never/used@sha256:" + "0" * 64]) == 2


@pytest.mark.slow
def test_killed_push_process_rerun(registry_factory: RegistryFactory, tmp_path: Path) -> None:
    """The CLI is killed (SIGKILL) once the first layer is in; the re-run skips that layer
    and uploads only the other one."""
    import os
    import signal
    import sys

    reg = registry_factory()
    layout = _big_layout(tmp_path / "l", [24_000_000, 24_000_000], seed=8)
    mdigest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs/sha256" / mdigest.split(":")[1]).read_text())
    first, second = (d["digest"] for d in manifest["layers"])
    ref = reg.ref("push/killed:v1")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("REGISTRY_AUTH_FILE", None)
    argv = [sys.executable, "-m", "stargzfs", "-v", "push", f"oci:{layout}:v1", ref]
    argv += ["--jobs", "1", "--chunk-size", "256k"]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 60
    started = None
    while time.monotonic() < deadline and proc.poll() is None:
        done = [d for d in (first, second) if _uploads(reg, d, wait=False)]
        if done:
            started = done[0]
            time.sleep(0.05)  # let the other layer get a few chunks in
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.communicate(timeout=30)
    if started is None or proc.returncode != -signal.SIGKILL:
        pytest.skip("the push finished before it could be interrupted")
    other = second if started == first else first
    if _uploads(reg, other, wait=False):
        pytest.skip("both layers finished before the kill")
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == mdigest
    assert f"exists  {started}" in res.stderr
    assert f"uploaded  {other}" in res.stderr
    # The cut-off layer's remembered session is tried first. distribution signs the offset
    # into the session URL, so a chunk cut off midway leaves it stale: it then starts over.
    assert "resuming a previous session" in res.stderr or "session is gone" in res.stderr
    assert _uploads(reg, started) == 1 and _uploads(reg, other) == 1
    _skopeo(reg, "copy", "--quiet", f"docker://{ref}", f"oci:{tmp_path / 'back'}:v1")


@pytest.mark.parametrize("jobs", [1, 3])
def test_push_jobs_blobs_in_flight(
    registry: Registry, tmp_path: Path, jobs: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every upload request (POST, PATCH, PUT) takes 0.2 s at a proxy: with --jobs 3 the
    three layers' uploads overlap there, with --jobs 1 they never do."""
    layout = _big_layout(tmp_path / "l", [200_000, 200_000, 200_000], seed=20 + jobs)
    mdigest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    with GatedProxy(registry.host) as proxy:
        proxy.delay["upload"] = 0.2
        ref = f"{proxy.host}/push-jobs/j{jobs}:v1"
        assert main(["push", f"oci:{layout}:v1", ref, "--jobs", str(jobs)]) == 0
        assert capsys.readouterr().out.strip() == mdigest
        puts = [r for r in proxy.requests if r[0] == "PUT" and "/blobs/uploads/" in r[1]]
        assert len(puts) == 4  # three layers and the config, each sent in one PUT
        if jobs == 1:
            assert proxy.max_in_flight["upload"] == 1
        else:
            assert proxy.max_in_flight["upload"] >= 2
    pushed = registry.ref(f"push-jobs/j{jobs}:v1")
    assert json.loads(_skopeo(registry, "inspect", f"docker://{pushed}"))["Digest"] == mdigest


def _gzip_layer_archive(path: Path, layer_tar: bytes, diff_id: str, *, zstd: bool = False) -> bytes:
    """A ``docker save``-style archive (manifest.json, config, one layer member) whose layer
    member is compressed (gzip, or zstd), as Docker 25 and ``stargzfs convert`` write them."""
    import gzip as gz
    import io
    import tarfile

    import zstandard

    blob = zstandard.ZstdCompressor().compress(layer_tar) if zstd else gz.compress(layer_tar, 6)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    listing = json.dumps(
        [{"Config": "config.json", "RepoTags": ["example/gz:v1"], "Layers": ["layer.tar"]}]
    ).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in (
            ("manifest.json", listing),
            ("config.json", config),
            ("layer.tar", blob),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return blob


def test_push_docker_archive_checks_compressed_layers_against_diff_ids(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A compressed layer member is pushed as it is, but only once what it decompresses to
    matches the config's diff_id: a swapped layer is exit 6 and nothing is pushed."""
    import hashlib
    import io
    import tarfile

    def tar_of(content: bytes) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("etc/motd")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        return buf.getvalue()

    good, evil = tar_of(b"hello\n"), tar_of(b"evil!\n")
    diff_id = "sha256:" + hashlib.sha256(good).hexdigest()

    ok = tmp_path / "ok.tar"
    blob = _gzip_layer_archive(ok, good, diff_id)
    ref = registry.ref("push-archive/gz:v1")
    assert main(["push", f"docker-archive:{ok}", ref]) == 0
    capsys.readouterr()
    raw = json.loads(_skopeo(registry, "inspect", "--raw", f"docker://{ref}"))
    assert raw["layers"][0]["digest"] == "sha256:" + hashlib.sha256(blob).hexdigest()

    swapped = tmp_path / "swapped.tar"
    _gzip_layer_archive(swapped, evil, diff_id)
    bad_ref = registry.ref("push-archive/gz-swapped:v1")
    assert main(["push", f"docker-archive:{swapped}", bad_ref]) == 6
    err = capsys.readouterr().err
    assert "layer 0 (layer.tar)" in err and diff_id in err
    listed = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--no-creds", f"docker://{bad_ref}"],
        capture_output=True,
        timeout=60,
    )
    assert listed.returncode != 0

    zst = tmp_path / "zstd.tar"
    _gzip_layer_archive(zst, good, diff_id, zstd=True)
    assert main(["push", f"docker-archive:{zst}", registry.ref("push-archive/zst:v1")]) == 7
    assert "zstd-compressed" in capsys.readouterr().err
