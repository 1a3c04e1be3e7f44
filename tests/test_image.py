"""Image model: manifest/index/config parsing, platform selection, resolving references."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from fake_registry import REGISTRY, FakeRegistry, sha256
from harness import FIXTURE_MANIFEST_DIGEST
from layer_helpers import FIXTURES

from stargzfs.errors import (
    DigestMismatchError,
    FormatError,
    NotFoundError,
    UnsupportedError,
)
from stargzfs.image import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    layer_compression,
    parse_config,
    parse_manifest,
    resolve_image,
    select_platform,
)
from stargzfs.reference import Platform, parse_reference
from stargzfs.registry import CredentialResolver, RegistryClient

OCI_DIR = FIXTURES / "oci-image"
pytestmark = pytest.mark.skipif(not OCI_DIR.is_dir(), reason="../shared/fixtures is absent")


def blob(digest: str) -> bytes:
    return (OCI_DIR / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()


MANIFEST_BYTES = blob(FIXTURE_MANIFEST_DIGEST) if OCI_DIR.is_dir() else b"{}"
MANIFEST_DOC: dict[str, Any] = json.loads(MANIFEST_BYTES)
CONFIG_DIGEST = MANIFEST_DOC.get("config", {}).get("digest", "")


# --------------------------------------------------------------------------- parsing


def test_fixture_manifest() -> None:
    manifest = parse_manifest(MANIFEST_BYTES, OCI_MANIFEST)
    assert isinstance(manifest, Manifest)
    assert manifest.media_type == OCI_MANIFEST
    assert manifest.config.digest == CONFIG_DIGEST and manifest.config.size == 683
    assert [layer.size for layer in manifest.layers] == [53283, 1680]
    lower = manifest.layers[0]
    assert lower.compression == "gzip"
    assert lower.toc_digest == (
        "sha256:ef6f7375466159d252ff6deecd902a5cd8413c341e82fdf507cd98ee509fb315"
    )
    assert lower.uncompressed_size == 139776
    assert manifest.raw == MANIFEST_BYTES


def test_fixture_index_and_platform_selection() -> None:
    index = parse_manifest((OCI_DIR / "index.json").read_bytes())
    assert isinstance(index, Index) and index.media_type == OCI_INDEX
    [entry] = index.manifests
    assert entry.ref_name == "v1" and entry.platform == Platform("linux", "amd64")
    assert select_platform(index, Platform.parse("linux/x86_64")) is entry
    with pytest.raises(NotFoundError, match=r"linux/arm64 \(available: linux/amd64\)"):
        select_platform(index, Platform.parse("linux/arm64"), "img")


def test_fixture_config() -> None:
    config = parse_config(blob(CONFIG_DIGEST))
    assert (config.os, config.architecture) == ("linux", "amd64")
    assert config.platform == Platform.parse("linux/amd64")
    assert config.env == ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    assert config.cmd == ("/bin/sh",) and config.entrypoint is None
    assert len(config.diff_ids) == 2
    assert [h.created_by for h in config.history] == [
        "mkfixtures: basic.esgz",
        "mkfixtures: whiteout-upper.esgz",
    ]
    assert config.created_at is not None and config.created_at.year == 2025


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


def index_of(entries: list[dict[str, Any]], media_type: str = OCI_INDEX) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries}).encode()


def plat(spec: str) -> dict[str, str]:
    parts = spec.split("/")
    out = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        out["variant"] = parts[2]
    return out


def test_platform_selection_normalizes_and_prefers() -> None:
    entries = [
        descriptor(OCI_MANIFEST, b"amd", platform=plat("linux/amd64")),
        descriptor(OCI_MANIFEST, b"arm64", platform=plat("linux/aarch64/v8")),
        descriptor(OCI_MANIFEST, b"armv6", platform=plat("linux/arm/v6")),
        descriptor(OCI_MANIFEST, b"att", platform=plat("unknown/unknown"),
                   annotations={"vnd.docker.reference.type": "attestation-manifest"}),
        descriptor("application/vnd.example.sbom", b"sbom", platform=plat("linux/amd64")),
    ]  # fmt: skip
    index = parse_manifest(index_of(entries, DOCKER_MANIFEST_LIST))
    assert isinstance(index, Index)

    def chosen(spec: str) -> str:
        return select_platform(index, Platform.parse(spec)).digest

    assert chosen("linux/arm64") == sha256(b"arm64")
    assert chosen("linux/arm64/v8") == sha256(b"arm64")
    assert chosen("linux/armhf") == sha256(b"armv6")  # arm/v7 runs arm/v6
    assert chosen("linux/amd64") == sha256(b"amd")
    with pytest.raises(NotFoundError) as info:
        select_platform(index, Platform.parse("linux/s390x"))
    # Attestations and non-image artifacts are not offered as platforms.
    assert str(info.value).endswith("(available: linux/amd64, linux/arm/v6, linux/arm64)")


def test_entries_without_platform_are_the_fallback() -> None:
    entries = [
        descriptor(OCI_MANIFEST, b"x", platform=plat("linux/ppc64le")),
        descriptor(OCI_MANIFEST, b"anything"),
    ]
    index = parse_manifest(index_of(entries))
    assert isinstance(index, Index)
    assert select_platform(index, Platform.parse("linux/amd64")).digest == sha256(b"anything")


def test_media_type_from_shape_and_header() -> None:
    doc = copy.deepcopy(MANIFEST_DOC)
    del doc["mediaType"]
    data = json.dumps(doc).encode()
    assert parse_manifest(data).media_type == OCI_MANIFEST
    assert parse_manifest(data, DOCKER_MANIFEST).media_type == DOCKER_MANIFEST
    assert isinstance(
        parse_manifest(index_of([]).replace(b'"mediaType": "' + OCI_INDEX.encode() + b'", ', b"")),
        Index,
    )


def test_layer_media_types() -> None:
    assert layer_compression("application/vnd.oci.image.layer.v1.tar") == "none"
    assert layer_compression("application/vnd.oci.image.layer.v1.tar+gzip") == "gzip"
    assert layer_compression("application/vnd.oci.image.layer.v1.tar+zstd") == "zstd"
    assert layer_compression("application/vnd.docker.image.rootfs.diff.tar.gzip") == "gzip"
    with pytest.raises(UnsupportedError, match="layer media type"):
        layer_compression("application/vnd.cncf.helm.chart.content.v1.tar+gzip")
    assert Descriptor("text/plain", sha256(b""), 0).compression is None


def mutated(path: str, value: Any) -> bytes:
    """The fixture manifest with one field replaced (``None`` deletes it)."""
    doc = copy.deepcopy(MANIFEST_DOC)
    *parents, last = path.split(".")
    target: Any = doc
    for key in parents:
        target = target[int(key)] if key.isdigit() else target[key]
    key: Any = int(last) if last.isdigit() else last
    if value is None:
        del target[key]
    else:
        target[key] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"not json", FormatError, "manifest: not valid JSON"),
        (b"[1, 2]", FormatError, "expected a JSON object, got list"),
        (mutated("config", None), FormatError, "manifest.config: missing"),
        (mutated("layers.1.digest", "sha256:xyz"), FormatError,
         "manifest.layers[1].digest: expected a digest like sha256:<64 hex>, got \"sha256:xyz\""),
        (mutated("layers.0.size", -1), FormatError,
         "manifest.layers[0].size: expected a non-negative integer, got -1"),
        (mutated("layers.0.size", True), FormatError, "manifest.layers[0].size"),
        (mutated("layers.0.mediaType", 5), FormatError, "manifest.layers[0].mediaType"),
        (mutated("layers.0.annotations", {"a": 1}), FormatError,
         "manifest.layers[0].annotations: expected an object of strings"),
        (mutated("layers", {}), FormatError, "manifest.layers: expected a list"),
        (mutated("schemaVersion", 3), FormatError, "schemaVersion: expected 2, got 3"),
        (mutated("schemaVersion", 1), UnsupportedError, "schema 1"),
        (mutated("mediaType", "application/vnd.docker.distribution.manifest.v1+prettyjws"),
         UnsupportedError, "schema 1"),
        (b'{"schemaVersion": 2, "mediaType": "text/html"}', FormatError, "unknown media type"),
        (index_of([{"mediaType": OCI_MANIFEST, "size": 1}]), FormatError,
         "manifest.manifests[0].digest: expected a string, got nothing"),
    ],
)  # fmt: skip
def test_malformed_manifests(data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        parse_manifest(data)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"os": None}, "config.os: expected a string, got nothing"),
        ({"config": []}, "config.config: expected an object"),
        ({"config": {"Env": "PATH=/bin"}}, "config.config.Env: expected a list of strings"),
        ({"config": {"Labels": {"a": 1}}}, "config.config.Labels: expected an object of strings"),
        ({"rootfs": {"diff_ids": ["nope"]}}, "config.rootfs.diff_ids[0]: 'nope' is not a digest"),
        ({"history": [1]}, "config.history[0]: expected an object"),
    ],
)
def test_malformed_configs(change: dict[str, Any], message: str) -> None:
    doc = json.loads(blob(CONFIG_DIGEST))
    for key, value in change.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    with pytest.raises(FormatError) as info:
        parse_config(json.dumps(doc).encode())
    assert message in str(info.value)


def test_config_optional_fields() -> None:
    config = parse_config(
        json.dumps(
            {
                "os": "linux",
                "architecture": "arm64",
                "variant": "v8",
                "config": {
                    "Entrypoint": ["/init"],
                    "Cmd": None,
                    "WorkingDir": "/srv",
                    "User": "1000:1000",
                    "Labels": {"org.opencontainers.image.title": "t"},
                    "StopSignal": "SIGTERM",
                },
                "history": [{"empty_layer": True, "comment": "c"}],
            }
        ).encode()
    )
    assert config.platform == Platform.parse("linux/arm64")
    assert (config.entrypoint, config.cmd, config.working_dir) == (("/init",), None, "/srv")
    assert config.labels == {"org.opencontainers.image.title": "t"}
    assert config.history[0].empty_layer and config.created_at is None and config.diff_ids == ()


# --------------------------------------------------------------------------- resolution


def fake_image() -> tuple[FakeRegistry, dict[str, str]]:
    """The fixture image under an index that also has an arm64 manifest."""
    fake = FakeRegistry()
    for digest in [CONFIG_DIGEST] + [layer["digest"] for layer in MANIFEST_DOC["layers"]]:
        fake.add_blob(blob(digest))
    amd = fake.add_manifest("img", MANIFEST_BYTES)
    arm_doc = copy.deepcopy(MANIFEST_DOC)
    arm_doc["annotations"] = {"arch": "arm64"}
    arm_bytes = json.dumps(arm_doc).encode()
    arm = fake.add_manifest("img", arm_bytes)
    index = index_of(
        [
            descriptor(OCI_MANIFEST, MANIFEST_BYTES, platform=plat("linux/amd64")),
            descriptor(OCI_MANIFEST, arm_bytes, platform=plat("linux/arm64")),
        ]
    )
    idx = fake.add_manifest("img", index, OCI_INDEX, tag="multi")
    fake.add_manifest("img", MANIFEST_BYTES, tag="single")
    return fake, {"amd": amd, "arm": arm, "index": idx}


async def test_resolve_through_an_index() -> None:
    fake, digests = fake_image()
    ref = parse_reference(f"{REGISTRY}/img:multi")
    async with fake.client() as client:
        image = await resolve_image(client, ref, Platform.parse("linux/amd64"))
        assert image.digest == digests["amd"] == FIXTURE_MANIFEST_DIGEST
        assert image.index is not None and image.index_digest == digests["index"]
        assert image.config.diff_ids == tuple(json.loads(blob(CONFIG_DIGEST))["rootfs"]["diff_ids"])
        assert str(image.pinned) == f"{REGISTRY}/img:multi@{digests['amd']}"
        arm = await resolve_image(client, ref, Platform.parse("linux/aarch64"))
        assert arm.digest == digests["arm"] and arm.manifest.annotations == {"arch": "arm64"}
        with pytest.raises(NotFoundError, match="available: linux/amd64, linux/arm64"):
            await resolve_image(client, ref, Platform.parse("linux/riscv64"))
        single = await resolve_image(client, parse_reference(f"{REGISTRY}/img:single"))
        assert single.index is None and single.digest == FIXTURE_MANIFEST_DIGEST


async def test_resolve_detects_tampering() -> None:
    fake, digests = fake_image()
    # The registry serves other bytes for the amd64 manifest than the index promised.
    fake.manifests[("img", digests["amd"])] = (MANIFEST_BYTES + b" ", OCI_MANIFEST)
    async with fake.client() as client:
        with pytest.raises(DigestMismatchError):
            await resolve_image(
                client, parse_reference(f"{REGISTRY}/img:multi"), Platform.parse("linux/amd64")
            )
    fake, _ = fake_image()
    fake.blobs[CONFIG_DIGEST] = b'{"os": "linux"}'
    async with fake.client() as client:
        with pytest.raises(DigestMismatchError, match=CONFIG_DIGEST):
            await resolve_image(client, parse_reference(f"{REGISTRY}/img:single"))


async def test_resolve_rejects_non_images_and_inconsistent_configs() -> None:
    fake, _ = fake_image()
    artifact = copy.deepcopy(MANIFEST_DOC)
    artifact["config"]["mediaType"] = "application/vnd.cncf.helm.config.v1+json"
    fake.add_manifest("img", json.dumps(artifact).encode(), tag="chart")
    one_layer = copy.deepcopy(MANIFEST_DOC)
    one_layer["layers"] = one_layer["layers"][:1]
    fake.add_manifest("img", json.dumps(one_layer).encode(), tag="short")
    odd = copy.deepcopy(MANIFEST_DOC)
    odd["layers"][1]["mediaType"] = "application/x-unknown"
    fake.add_manifest("img", json.dumps(odd).encode(), tag="odd")
    async with fake.client() as client:
        with pytest.raises(UnsupportedError, match="not a container image"):
            await resolve_image(client, parse_reference(f"{REGISTRY}/img:chart"))
        with pytest.raises(FormatError, match="2 diff_ids for 1 layers"):
            await resolve_image(client, parse_reference(f"{REGISTRY}/img:short"))
        with pytest.raises(UnsupportedError, match="layer 1 has unsupported media type"):
            await resolve_image(client, parse_reference(f"{REGISTRY}/img:odd"))


async def test_resolve_fixture_image_from_real_registry(fixture_image: str) -> None:
    creds = CredentialResolver(env={}, use_files=False)
    async with RegistryClient(credentials=creds, registries=[]) as client:
        image = await resolve_image(client, parse_reference(fixture_image))
    assert image.digest == FIXTURE_MANIFEST_DIGEST
    assert image.manifest.raw == MANIFEST_BYTES
    assert [layer.toc_digest is not None for layer in image.manifest.layers] == [True, True]
    assert image.config.raw == blob(CONFIG_DIGEST)
