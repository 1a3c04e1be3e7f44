"""Lazy reads from a real registry through a misbehaving, byte-counting proxy: the right
bytes or the right error, and only the bytes a read needs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import Registry
from harness.oci import estargz_layer, make_tar, write_oci_layout
from harness.proxy import RegistryProxy

from stargzfs.errors import IntegrityError, RegistryError
from stargzfs.image import resolve_image
from stargzfs.index import load_index
from stargzfs.reference import parse_reference
from stargzfs.registry import RegistryBlobSource, RegistryClient, RetryPolicy
from stargzfs.view import ImageView, LayerView

BIG = os.urandom(12 << 20)
SMALL = {f"etc/small-{i}.conf": f"setting {i}\n".encode() * 20 for i in range(50)}


@pytest.fixture(scope="module")
def big_image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One eStargz layer: 12 MiB of random bytes (1 MiB chunks) plus 50 small files."""
    tar = make_tar({"opt/big.bin": BIG, **SMALL})
    layout = write_oci_layout(
        tmp_path_factory.mktemp("big"), [estargz_layer(tar, chunk_size=1 << 20)]
    )
    return registry.push_oci(layout, "v1", "lazy/big:v1").split("/", 1)[1]  # repo:tag


async def open_view(client: RegistryClient, ref: str) -> tuple[ImageView, int]:
    image = await resolve_image(client, parse_reference(ref))
    layers = []
    total = 0
    for desc in image.manifest.layers:
        source = RegistryBlobSource(client, image.ref.repo, desc.digest, desc.size)
        layers.append(LayerView(source, await load_index(source, desc.annotations), desc.digest))
        total += desc.size
    return ImageView(layers), total


def fast_retries() -> RetryPolicy:
    return RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05)


async def test_small_file_fetches_a_small_fraction(
    big_image: str, registry_proxy: RegistryProxy
) -> None:
    async with RegistryClient(retry=fast_retries()) as client:
        view, blob_size = await open_view(client, f"{registry_proxy.host}/{big_image}")
        registry_proxy.reset_counters()
        node = view.resolve("etc/small-7.conf")
        assert await view.read(node, 0, node.entry.size) == SMALL["etc/small-7.conf"]
        assert registry_proxy.bytes_sent < blob_size * 0.01
        node = view.resolve("opt/big.bin")
        piece = await view.read(node, (5 << 20) + 100, 1000)
        assert piece == BIG[(5 << 20) + 100 : (5 << 20) + 1100]
        assert registry_proxy.bytes_sent < blob_size * 0.15  # one 1 MiB chunk, not the layer


async def test_registry_answering_ranges_with_200(
    big_image: str, registry_proxy: RegistryProxy
) -> None:
    registry_proxy.ranges = "ignore"
    async with RegistryClient(retry=fast_retries()) as client:
        view, blob_size = await open_view(client, f"{registry_proxy.host}/{big_image}")
        for name, data in list(SMALL.items())[:10]:
            node = view.resolve(name)
            assert await view.read(node, 0, node.entry.size) == data
        node = view.resolve("opt/big.bin")
        assert (
            hashlib.sha256(await view.read(node, 0, len(BIG))).digest()
            == hashlib.sha256(BIG).digest()
        )
        # The whole blob travelled once (plus the manifest's HEADs), not once per range.
        assert registry_proxy.bytes_sent < blob_size * 2.5


async def test_transient_failures_are_retried(
    big_image: str, registry_proxy: RegistryProxy
) -> None:
    async with RegistryClient(retry=fast_retries()) as client:
        view, _ = await open_view(client, f"{registry_proxy.host}/{big_image}")
        node = view.resolve("etc/small-3.conf")
        registry_proxy.fail_next(503, count=2)
        assert await view.read(node, 0, 10) == SMALL["etc/small-3.conf"][:10]
        node = view.resolve("etc/small-4.conf")
        registry_proxy.fail_next(429, count=1, retry_after="0")
        assert await view.read(node, 0, 10) == SMALL["etc/small-4.conf"][:10]
        node = view.resolve("opt/big.bin")
        registry_proxy.drop_next(count=1, after=1000)
        assert await view.read(node, 3 << 20, 50000) == BIG[3 << 20 : (3 << 20) + 50000]


async def test_persistent_failure_is_a_registry_error(
    big_image: str, registry_proxy: RegistryProxy
) -> None:
    async with RegistryClient(retry=fast_retries()) as client:
        view, _ = await open_view(client, f"{registry_proxy.host}/{big_image}")
        node = view.resolve("etc/small-5.conf")
        registry_proxy.down = True
        with pytest.raises(RegistryError):
            await view.read(node, 0, 10)
        registry_proxy.down = False  # the registry is back: the same read works
        assert await view.read(node, 0, 10) == SMALL["etc/small-5.conf"][:10]


async def test_corrupted_byte_fails_that_file_only(
    big_image: str, registry_proxy: RegistryProxy
) -> None:
    async with RegistryClient(retry=fast_retries()) as client:
        view, _ = await open_view(client, f"{registry_proxy.host}/{big_image}")
        node = view.resolve("opt/big.bin")
        chunk = view.tree.layer_of(node).chunks_for(node.entry, 2 << 20, 1)[0]
        digest = view.layers[0].name
        registry_proxy.corrupt_blob(digest, (chunk.comp_offset + chunk.comp_end) // 2)
        with pytest.raises(IntegrityError, match=r"opt/big\.bin"):
            await view.read(node, 2 << 20, 100)
        small = view.resolve("etc/small-9.conf")
        assert await view.read(small, 0, small.entry.size) == SMALL["etc/small-9.conf"]


async def test_blob_redirects_to_storage_without_credentials(
    big_image: str, registry_proxy: RegistryProxy
) -> None:
    registry_proxy.redirect_blobs = True
    async with RegistryClient(retry=fast_retries()) as client:
        view, _ = await open_view(client, f"{registry_proxy.host}/{big_image}")
        node = view.resolve("etc/small-1.conf")
        assert await view.read(node, 0, node.entry.size) == SMALL["etc/small-1.conf"]
    assert registry_proxy.storage_requests
    assert not any(auth for _, auth in registry_proxy.storage_requests)


def test_layout_helper_round_trip(tmp_path: Path) -> None:
    layout = write_oci_layout(tmp_path, [estargz_layer(make_tar({"a": b"x"}))])
    assert (layout / "index.json").is_file()


def stargzfs(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "stargzfs", *argv], capture_output=True, timeout=120
    )


def cat(ref: str, path: str) -> subprocess.CompletedProcess[bytes]:
    return stargzfs("cat", ref, path)


def arm(proxy: RegistryProxy, fault: str, count: int = 1) -> None:
    """Make the proxy misbehave; the one-shot faults (429, 503, drop) hit the next ``count``
    requests only, so they are armed again before each command."""
    if fault == "ranges":
        proxy.ranges = "ignore"
    elif fault == "multirange":
        proxy.multirange = "refuse"
    elif fault in ("429", "503"):
        proxy.fail_next(int(fault), count=count, retry_after="0" if fault == "429" else None)
    elif fault == "drop":
        proxy.drop_next(count=1, after=2000)
    elif fault == "redirect":
        proxy.redirect_blobs = True


def ok(result: subprocess.CompletedProcess[bytes]) -> bytes:
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"Traceback" not in result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "fault", ["none", "ranges", "multirange", "429", "503", "drop", "redirect"]
)
def test_commands_through_faults(
    big_image: str, registry_proxy: RegistryProxy, fault: str, tmp_path: Path
) -> None:
    """cat, ls -R, get of a directory and layers: the right output through each fault."""
    import json

    ref = f"{registry_proxy.host}/{big_image}"
    arm(registry_proxy, fault, count=2)  # two in a row: the backoff goes on
    out = ok(cat(ref, "opt/big.bin"))
    assert hashlib.sha256(out).digest() == hashlib.sha256(BIG).digest()
    arm(registry_proxy, fault)
    assert ok(cat(ref, "etc/small-2.conf")) == SMALL["etc/small-2.conf"]

    arm(registry_proxy, fault)
    listed = ok(stargzfs("ls", "-R", ref)).decode().splitlines()
    assert listed == ["etc", *sorted(SMALL), "opt", "opt/big.bin"]

    arm(registry_proxy, fault)
    dest = tmp_path / "etc"
    ok(stargzfs("get", ref, "etc", str(dest)))
    assert {f"etc/{p.name}": p.read_bytes() for p in dest.iterdir()} == SMALL

    arm(registry_proxy, fault)
    (layer,) = json.loads(ok(stargzfs("layers", "--json", ref)))["layers"]
    assert (layer["format"], layer["lazy"], layer["verified"]) == ("estargz", True, True)
    assert layer["entries"] > len(SMALL)  # the 51 files (and directories): the TOC was read


def test_cat_fetches_only_what_it_needs(big_image: str, registry_proxy: RegistryProxy) -> None:
    out = cat(f"{registry_proxy.host}/{big_image}", "etc/small-7.conf")
    assert out.stdout == SMALL["etc/small-7.conf"]
    # TOC tail read + the file's chunk: a small fraction of the 12 MiB layer.
    assert registry_proxy.bytes_sent < len(BIG) * 0.1


@pytest.mark.slow  # the outage case spends the whole retry budget (~12 s)
def test_cat_exit_codes(big_image: str, registry_proxy: RegistryProxy) -> None:
    assert cat(f"{registry_proxy.host}/{big_image}", "etc/nope").returncode == 4
    registry_proxy.down = True
    out = cat(f"{registry_proxy.host}/{big_image}", "etc/small-1.conf")
    assert out.returncode == 5 and b"Traceback" not in out.stderr
