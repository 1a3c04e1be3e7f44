"""inspect, tags, catalog, login, logout against real registries."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from harness import Registry
from harness.oci import OCI_CONFIG, OCI_MANIFEST, estargz_layer, make_tar

from stargzfs.reference import Platform

pytestmark = pytest.mark.registry


def run(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stargzfs", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_inspect_registry_and_layout(fixture_image: str, oci_layout: Path) -> None:
    for ref in (fixture_image, f"oci:{oci_layout}:v1"):
        out = run("inspect", ref, "--json")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert (
            doc["digest"]
            == "sha256:73d2de179c7e746a5848c6899b9a34d5cb7bf3e557e4227dfcebc1ebcfd324b1"
        )
        assert doc["platform"].startswith("linux/amd64")
        assert [layer["format"] for layer in doc["layers"]] == ["estargz", "estargz"]
        assert all(layer["verified"] for layer in doc["layers"])
        assert doc["platforms"] is None  # a plain manifest: no index
        human = run("inspect", ref)
        assert "Layers:" in human.stdout and "estargz (lazy, verified)" in human.stdout


def test_tags_and_catalog(registry: Registry, oci_layout: Path) -> None:
    for tag in ("a", "b", "c"):
        registry.push_oci(oci_layout, "v1", f"tagged/repo:{tag}")
    out = run("tags", f"{registry.host}/tagged/repo", "--json")
    assert out.returncode == 0, out.stderr
    assert sorted(json.loads(out.stdout)) == ["a", "b", "c"]
    cat = run("catalog", registry.host)
    assert "tagged/repo" in cat.stdout.split()
    assert run("tags", f"{registry.host}/no/such").returncode == 4


OCI_INDEX = "application/vnd.oci.image.index.v1+json"
PLATFORMS = (("amd64", ""), ("arm64", "v8"))


def _multi_platform_layout(root: Path) -> tuple[Path, dict[str, str]]:
    """An OCI layout whose tag v1 is an index of two eStargz images (linux/amd64 and
    linux/arm64/v8); returns it and each platform's manifest digest by platform name."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    entries, digests = [], {}
    for arch, variant in PLATFORMS:
        layer = estargz_layer(make_tar({"arch.txt": arch.encode()}))
        platform = {
            "architecture": arch,
            "os": "linux",
            **({"variant": variant} if variant else {}),
        }
        config = json.dumps({**platform, "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}})
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, **put(config.encode())},
                "layers": [
                    {
                        "mediaType": layer.media_type,
                        **put(layer.data),
                        "annotations": layer.annotations,
                    }
                ],
            }
        ).encode()
        desc = {"mediaType": OCI_MANIFEST, **put(manifest), "platform": platform}
        entries.append(desc)
        # Keyed as stargzfs shows platforms: normalized like containerd (arm64/v8 → arm64).
        digests[str(Platform.parse("/".join(p for p in ("linux", arch, variant) if p)))] = desc[
            "digest"
        ]
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    top = {
        "mediaType": OCI_INDEX,
        **put(index.encode()),
        "annotations": {"org.opencontainers.image.ref.name": "v1"},
    }
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return root, digests


def test_inspect_index_lists_its_platforms(registry: Registry, tmp_path: Path) -> None:
    layout, digests = _multi_platform_layout(tmp_path / "multi")
    ref = registry.ref("inspect/multi:v1")
    pushed = run("push", f"oci:{layout}:v1", ref)
    assert pushed.returncode == 0, pushed.stderr
    for image in (ref, f"oci:{layout}:v1"):
        out = run("inspect", "--json", "--platform", "linux/arm64", image)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["index_digest"].startswith("sha256:")
        assert doc["digest"] == digests["linux/arm64"]
        assert [(p["platform"], p["digest"]) for p in doc["platforms"]] == list(digests.items())
        assert all(p["media_type"] == OCI_MANIFEST for p in doc["platforms"])
        human = run("inspect", "--platform", "linux/amd64", image)
        assert human.returncode == 0, human.stderr
        lines = human.stdout.splitlines()
        assert "Platforms:  2 in the index" in lines
        assert f"  linux/amd64  {digests['linux/amd64']}  (this one)" in lines
        assert f"  linux/arm64  {digests['linux/arm64']}" in lines


@pytest.mark.parametrize("kind", ["registry_basic", "registry_token"])
def test_login_logout(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, oci_layout: Path
) -> None:
    reg: Registry = request.getfixturevalue(kind)
    assert reg.username and reg.password
    env = {"DOCKER_CONFIG": str(tmp_path), "REGISTRY_AUTH_FILE": str(tmp_path / "none.json")}
    bad = run("login", reg.host, "-u", reg.username, "--password-stdin", env=env, stdin="wrong\n")
    assert bad.returncode == 3, bad.stderr
    assert "wrong" not in bad.stderr and not (tmp_path / "config.json").exists()
    good = run(
        "login",
        reg.host,
        "-u",
        reg.username,
        "--password-stdin",
        env=env,
        stdin=reg.password + "\n",
    )
    assert good.returncode == 0, good.stderr
    config = json.loads((tmp_path / "config.json").read_text())
    assert reg.host in config["auths"]
    assert reg.password not in good.stdout + good.stderr
    # The stored credentials now work for reading.
    ref = reg.push_oci(oci_layout, "v1", "login/test:v1")
    assert run("layers", ref, env=env).returncode == 0
    assert run("logout", reg.host, env=env).returncode == 0
    assert reg.host not in json.loads((tmp_path / "config.json").read_text()).get("auths", {})
    assert run("layers", ref, env=env).returncode == 3


def _no_credential_files(tmp_path: Path) -> dict[str, str]:
    return {
        "HOME": str(tmp_path),
        "DOCKER_CONFIG": str(tmp_path / "docker"),
        "REGISTRY_AUTH_FILE": str(tmp_path / "none.json"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
    }


@pytest.mark.parametrize("kind", ["registry_basic", "registry_token"])
def test_tags_and_catalog_with_creds_stdin(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, oci_layout: Path
) -> None:
    reg: Registry = request.getfixturevalue(kind)
    reg.push_oci(oci_layout, "v1", "listing/creds:v1")
    env = _no_credential_files(tmp_path)
    creds = f"{reg.username}:{reg.password}\n"
    repo = f"{reg.host}/listing/creds"
    assert run("tags", repo, env=env).returncode == 3  # no credentials anywhere
    out = run("tags", "--creds-stdin", "--insecure", repo, env=env, stdin=creds)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["v1"]
    out = run("catalog", "--json", "--creds-stdin", reg.host, env=env, stdin=creds)
    assert out.returncode == 0, out.stderr
    assert "listing/creds" in json.loads(out.stdout)
    bad = run("tags", "--creds-stdin", repo, env=env, stdin=f"{reg.username}:wrong\n")
    assert bad.returncode == 3 and "wrong" not in bad.stderr
    assert run("catalog", "--creds-stdin", reg.host, env=env, stdin="no colon\n").returncode == 2


def test_login_usage_errors_and_creds_stdin(registry_basic: Registry, tmp_path: Path) -> None:
    reg = registry_basic
    env = {**_no_credential_files(tmp_path), "DOCKER_CONFIG": str(tmp_path)}
    config = tmp_path / "config.json"
    # Like docker: --password-stdin needs -u (stdin is the password, not the user name).
    out = run("login", reg.host, "--password-stdin", env=env, stdin=f"{reg.password}\n")
    assert out.returncode == 2 and "-u" in out.stderr and not config.exists()
    creds = f"{reg.username}:{reg.password}\n"
    for argv in (["-u", reg.username, "--creds-stdin"], ["--password-stdin", "--creds-stdin"]):
        out = run("login", reg.host, *argv, env=env, stdin=creds)
        assert out.returncode == 2, out.stderr
        assert not config.exists()
    out = run("login", reg.host, "--creds-stdin", "--insecure", env=env, stdin=creds)
    assert out.returncode == 0, out.stderr
    assert reg.host in json.loads(config.read_text())["auths"]
    assert run("logout", reg.host, env=env).returncode == 0


@pytest.mark.slow  # the no-mirror half spends the retry budget on the unreachable host
def test_mirror_serves_a_registry_that_is_unreachable(
    fixture_image: str, registry: Registry
) -> None:
    # The upstream name does not resolve; the mirror (our registry) has the image.
    repo_tag = fixture_image.split("/", 1)[1]
    ref = f"upstream.invalid:5000/{repo_tag}"
    out = run("ls", ref, "/etc", "--mirror", f"upstream.invalid:5000={registry.host}")
    assert out.returncode == 0, out.stderr
    assert "passwd" in out.stdout.split()
    assert run("ls", ref, "/etc").returncode == 5  # without the mirror: network failure
