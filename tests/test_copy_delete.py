"""``stargzfs copy``, ``delete`` and ``prune`` against real registries (deletes enabled and
disabled)."""

from __future__ import annotations

import builtins
import gzip
import hashlib
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from harness import FIXTURE_MANIFEST_DIGEST, AuthKind, Registry, RegistryFactory
from harness.oci import make_tar
from test_convert_image import _index_layout

from stargzfs.cli.main import main


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _inspect(reg: Registry, ref: str, *extra: str) -> subprocess.CompletedProcess[str]:
    auth = ["--authfile", str(reg.authfile)] if reg.authfile else ["--no-creds"]
    cmd = ["skopeo", "inspect", "--tls-verify=false", *auth, *extra, f"docker://{ref}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def _tags(reg: Registry, repo: str) -> list[str]:
    res = subprocess.run(
        ["skopeo", "list-tags", "--tls-verify=false", f"docker://{reg.ref(repo)}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return sorted(json.loads(res.stdout)["Tags"])


# --------------------------------------------------------------------------- copy


def test_copy_same_registry_mounts(
    registry: Registry, fixture_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = registry.ref("copy-test/same:v1")
    assert main(["copy", fixture_image, dst]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == FIXTURE_MANIFEST_DIGEST
    assert "3 mounted" in out.err
    assert json.loads(_inspect(registry, dst).stdout)["Digest"] == FIXTURE_MANIFEST_DIGEST


def test_copy_across_registries_streams(
    registry: Registry,
    registry_basic: Registry,
    fixture_image: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert registry_basic.authfile is not None
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(registry_basic.authfile))
    dst = registry_basic.ref("copy-test/other:v1")
    assert main(["copy", fixture_image, dst]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == FIXTURE_MANIFEST_DIGEST
    assert "3 blob(s) uploaded" in out.err
    assert json.loads(_inspect(registry_basic, dst).stdout)["Digest"] == FIXTURE_MANIFEST_DIGEST
    # Again: everything is already there.
    assert main(["copy", fixture_image, dst]) == 0
    assert "3 already present" in capsys.readouterr().err


def test_copy_index(registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = _index_layout(tmp_path / "idx")
    src = registry.ref("copy-test/multi:v1")
    assert main(["push", f"oci:{layout}:v1", src]) == 0
    index_digest = capsys.readouterr().out.strip()
    index = json.loads(_inspect(registry, src, "--raw").stdout)
    arm = next(m for m in index["manifests"] if m["platform"]["architecture"] == "arm64")
    dst = registry.ref("copy-test/multi-all:v1")
    assert main(["copy", src, dst, "--all-platforms"]) == 0
    assert capsys.readouterr().out.strip() == index_digest
    assert _sha(_inspect(registry, dst, "--raw").stdout.encode()) == index_digest
    one = registry.ref("copy-test/multi-arm:v1")
    assert main(["copy", src, one, "--platform", "linux/arm64"]) == 0
    assert capsys.readouterr().out.strip() == arm["digest"]


# --------------------------------------------------------------------------- delete


def test_delete_enabled(
    registry_factory: RegistryFactory, oci_layout: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = registry_factory(delete_enabled=True)
    ref = reg.push_oci(oci_layout, "v1", "del/me:v1")
    assert main(["delete", ref, "--yes"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == FIXTURE_MANIFEST_DIGEST
    assert "garbage collection" in out.err
    assert _inspect(reg, ref).returncode != 0
    # The tag is gone: deleting again is "not found".
    assert main(["delete", ref, "--yes"]) == 4


def test_delete_asks_on_a_terminal(
    registry_factory: RegistryFactory,
    oci_layout: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    reg = registry_factory(delete_enabled=True)
    ref = reg.push_oci(oci_layout, "v1", "del/ask:v1")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    asked: list[str] = []

    def no(prompt: str = "") -> str:
        asked.append(prompt)
        return "n"

    monkeypatch.setattr(builtins, "input", no)
    assert main(["delete", ref]) == 1
    assert asked and "delete" in asked[0]
    assert _inspect(reg, ref).returncode == 0
    monkeypatch.setattr(builtins, "input", lambda prompt="": "y")
    assert main(["delete", ref]) == 0
    assert _inspect(reg, ref).returncode != 0


def test_delete_disabled_is_exit_7(
    registry_factory: RegistryFactory, oci_layout: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = registry_factory(delete_enabled=False)
    ref = reg.push_oci(oci_layout, "v1", "del/no:v1")
    assert main(["delete", ref, "--yes"]) == 7
    err = capsys.readouterr().err
    assert "UNSUPPORTED" in err and "not supported" in err
    assert _inspect(reg, ref).returncode == 0


# --------------------------------------------------------------------------- prune


def _dated_layout(root: Path, created: str, salt: str) -> Path:
    """A one-layer image whose config says ``created``."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
        return {"digest": _sha(data), "size": len(data)}

    tar = make_tar({"which": salt.encode()})
    layer = gzip.compress(tar, mtime=0)
    config = json.dumps(
        {
            "created": created,
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [_sha(tar)]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(layer)}],
        }
    ).encode()
    top = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **put(manifest),
        "annotations": {"org.opencontainers.image.ref.name": "v1"},
    }
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return root


def _populate(reg: Registry, tmp_path: Path, repo: str) -> dict[str, str]:
    """t2020..t2023 (one per year), ``stable`` = same digest as t2020, ``now`` = created now."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    digests = {}
    for tag, created in [
        ("t2020", "2020-01-01T00:00:00Z"),
        ("t2021", "2021-01-01T00:00:00Z"),
        ("t2022", "2022-01-01T00:00:00Z"),
        ("t2023", "2023-01-01T00:00:00Z"),
        ("now", now),
    ]:
        layout = _dated_layout(tmp_path / tag, created, tag)
        reg.push_oci(layout, "v1", f"{repo}:{tag}")
        digests[tag] = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    reg.push_oci(tmp_path / "t2020", "v1", f"{repo}:stable")
    return digests


def test_prune_keep_exclude_shared_digest(
    registry_factory: RegistryFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = registry_factory(delete_enabled=True)
    digests = _populate(reg, tmp_path, "prune/app")
    repo = reg.ref("prune/app")
    all_tags = ["now", "stable", "t2020", "t2021", "t2022", "t2023"]
    # Dry run: the plan, nothing deleted.
    assert main(["prune", repo, "--keep", "2", "--exclude", "^stable$", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out
    assert _tags(reg, "prune/app") == all_tags
    delete_lines = [line for line in out.splitlines() if line.strip().startswith("delete ")]
    assert sorted(line.split()[1] for line in delete_lines) == ["t2021", "t2022"]
    # t2020 is old, but `stable` (excluded, so kept) shares its digest.
    assert "same digest as kept tag stable" in out
    assert main(["prune", repo, "--keep", "2", "--exclude", "^stable$", "--yes"]) == 0
    out = capsys.readouterr().out
    assert f"deleted {reg.host}/prune/app@{digests['t2021']}" in out
    assert _tags(reg, "prune/app") == ["now", "stable", "t2020", "t2023"]


def test_prune_never_deletes_a_digest_kept_by_keep(
    registry_factory: RegistryFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``older-alias`` points at t2023's digest and ranks below it (same created time, tag
    name second), past the --keep 2 boundary: deleting it would delete t2023, which --keep
    keeps (no --exclude involved). Both stay."""
    reg = registry_factory(delete_enabled=True)
    digests = _populate(reg, tmp_path, "prune/keep")
    reg.push_oci(tmp_path / "t2023", "v1", "prune/keep:older-alias")
    repo = reg.ref("prune/keep")
    assert main(["prune", repo, "--keep", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    keep_lines = [line.split() for line in out.splitlines() if line.strip().startswith("keep ")]
    assert {line[1] for line in keep_lines} == {"now", "t2023", "older-alias"}
    assert "same digest as kept tag t2023" in out
    delete_lines = [line.split() for line in out.splitlines() if line.strip().startswith("delete ")]
    assert {line[1] for line in delete_lines} == {"t2020", "t2021", "t2022", "stable"}
    assert digests["t2023"] not in {line[2] for line in delete_lines}
    assert main(["prune", repo, "--keep", "2", "--yes"]) == 0
    deleted = [line for line in capsys.readouterr().out.splitlines() if line.startswith("deleted")]
    assert sorted(deleted) == sorted(
        f"deleted {reg.host}/prune/keep@{digests[t]}" for t in ("t2020", "t2021", "t2022")
    )
    assert _tags(reg, "prune/keep") == ["now", "older-alias", "t2023"]
    for tag in ("t2023", "older-alias"):
        info = json.loads(_inspect(reg, reg.ref(f"prune/keep:{tag}")).stdout)
        assert info["Digest"] == digests["t2023"]


def test_prune_older_than(
    registry_factory: RegistryFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = registry_factory(delete_enabled=True)
    _populate(reg, tmp_path, "prune/old")
    assert main(["prune", reg.ref("prune/old"), "--older-than", "30", "--yes"]) == 0
    capsys.readouterr()
    assert _tags(reg, "prune/old") == ["now"]


def test_prune_deletes_disabled(
    registry_factory: RegistryFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = registry_factory(delete_enabled=False)
    _populate(reg, tmp_path, "prune/nodel")
    assert main(["prune", reg.ref("prune/nodel"), "--keep", "1", "--yes"]) == 7
    assert "UNSUPPORTED" in capsys.readouterr().err
    assert len(_tags(reg, "prune/nodel")) == 6


@pytest.mark.parametrize("auth", ["basic", "token"])
def test_delete_with_auth(
    auth: AuthKind,
    registry_factory: RegistryFactory,
    oci_layout: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    reg = registry_factory(auth=auth, delete_enabled=True)
    assert reg.authfile is not None
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(reg.authfile))
    ref = reg.push_oci(oci_layout, "v1", "del/auth:v1")
    assert main(["delete", ref, "--yes"]) == 0
    assert _inspect(reg, ref).returncode != 0
