"""The chunk reader against a real registry: a large prefetch is one streamed range request,
decoded as it arrives (never held whole), and survives a dropped connection or a registry
that ignores ranges."""

from __future__ import annotations

import hashlib
import os

import pytest
from harness import Registry
from harness.oci import estargz_layer, make_tar, write_oci_layout
from harness.proxy import RegistryProxy

from stargzfs.image import resolve_image
from stargzfs.index import load_index
from stargzfs.reference import parse_reference
from stargzfs.registry import RegistryBlobSource, RegistryClient, RetryPolicy
from stargzfs.source import TailCachedSource
from stargzfs.view import ImageView, LayerView

PRIO = {f"app/lib/lib{i}.so": os.urandom(150_000) for i in range(4)}
REST = {"app/data/rest.bin": os.urandom(2 << 20)}


@pytest.fixture(scope="module")
def prio_image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    tar = make_tar({**PRIO, **REST})
    layer = estargz_layer(tar, chunk_size=65536, prioritized=sorted(PRIO))
    layout = write_oci_layout(tmp_path_factory.mktemp("prio"), [layer])
    return registry.push_oci(layout, "v1", "reader/prio:v1").split("/", 1)[1]


async def open_view(client: RegistryClient, ref: str) -> ImageView:
    image = await resolve_image(client, parse_reference(ref))
    layers = []
    for desc in image.manifest.layers:
        source = TailCachedSource(
            RegistryBlobSource(client, image.ref.repo, desc.digest, desc.size)
        )
        layers.append(LayerView(source, await load_index(source, desc.annotations), desc.digest))
    return ImageView(layers)


async def check_prefetched(view: ImageView, proxy: RegistryProxy) -> None:
    before = len(proxy.requests)
    for path, data in PRIO.items():
        node = view.resolve(path)
        got = await view.read(node, 0, node.entry.size)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert len(proxy.requests) == before  # all served from the cache


@pytest.mark.parametrize("fault", ["none", "drop", "ranges"])
async def test_big_prefetch_is_one_streamed_request(
    prio_image: str, registry_proxy: RegistryProxy, fault: str
) -> None:
    async with RegistryClient(retry=RetryPolicy(max_attempts=4, base_delay=0.01)) as client:
        view = await open_view(client, f"{registry_proxy.host}/{prio_image}")
        reader = view.readers[0]
        reader.PIECE = 64 << 10  # the ~600 KB prioritized range counts as large
        index = view.layers[0].index
        assert index.prefetch_end is not None and index.prefetch_end > 4 * reader.PIECE
        registry_proxy.reset_counters()
        if fault == "drop":
            registry_proxy.drop_next(1, after=200_000)
        if fault == "ranges":
            registry_proxy.ranges = "ignore"
        assert await view.prefetch(0) == sum(len(index.chunks(view.resolve(p).entry)) for p in PRIO)
        gets = [r for r in registry_proxy.requests if r[0] == "GET" and "/blobs/" in r[1]]
        if fault == "none":
            (only,) = gets
            first = min(c.comp_offset for c in index.chunks_before(index.prefetch_end))
            assert only[2] == f"bytes={first}-{index.prefetch_end - 1}"
            assert registry_proxy.bytes_sent == index.prefetch_end - first
        elif fault == "drop":
            assert len(gets) == 2  # resumed where the connection broke
            assert gets[1][2] is not None and gets[1][2].endswith(f"-{index.prefetch_end - 1}")
        await check_prefetched(view, registry_proxy)
