"""An image's filesystem as the front ends see it: the merged tree plus the means to read
file contents. FUSE, ``cat``/``get`` and the materializer all go through this; none of them
knows where the bytes come from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import trio

from .cache import ChunkCache
from .errors import NotFoundError, UsageError
from .index import Chunk, LayerIndex, MergedTree, Node
from .reader import ChunkReader, FetchGate, iter_file
from .source import ByteSource

__all__ = ["ImageView", "LayerView"]


@dataclass(slots=True)
class LayerView:
    """One layer: where its bytes are, its index, and what to call it in messages."""

    source: ByteSource
    index: LayerIndex
    name: str = "layer"


class ImageView:
    """The merged filesystem of ``layers`` (bottom first)."""

    def __init__(self, layers: Sequence[LayerView], cache: ChunkCache | None = None) -> None:
        self.layers = list(layers)
        self.tree = MergedTree([layer.index for layer in self.layers])
        self.cache = cache if cache is not None else ChunkCache(None)
        # One gate for the image: background work of any layer yields to on-demand reads.
        self.gate = FetchGate()
        self.readers = [
            ChunkReader(lv.source, lv.index, self.cache, self.gate) for lv in self.layers
        ]
        # Per layer name: "running", "done (N chunks)", "done (cached)", "failed (why)".
        self.prefetch_state: dict[str, str] = {}
        self.background_state: dict[str, str] = {}

    def resolve(self, path: str) -> Node:
        node = self.tree.resolve(path)
        if node is None:
            raise NotFoundError(f"{path}: no such file or directory in the image")
        return node

    async def read(self, node: Node, offset: int, size: int) -> bytes:
        """File bytes ``[offset, offset+size)`` (short at end of file)."""
        if node.entry.kind != "reg":
            raise UsageError(f"{node.entry.name}: not a regular file")
        return await self.readers[node.layer].read(node.entry, offset, size)

    async def prefetch(self, position: int) -> int:
        """Fetch a layer's prioritized range (everything before ``.prefetch.landmark``) at
        low priority, streamed in one request, and cache its chunks; returns how many this
        fetched. It goes through the layer reader's single flight: a file read on demand
        meanwhile is fetched once, by whichever asked first."""
        layer, reader = self.layers[position], self.readers[position]
        end = layer.index.prefetch_end
        if not end:
            return 0
        self.prefetch_state[layer.name] = "running"
        try:
            stored = await reader.prefetch(end, f"{layer.name} prefetch")
        except Exception as e:
            self.prefetch_state[layer.name] = f"failed ({e})"
            raise
        if stored is None:  # a remount with a warm cache: nothing to fetch
            self.prefetch_state[layer.name] = "done (cached)"
            return 0
        self.prefetch_state[layer.name] = f"done ({stored} chunks)"
        return stored

    async def prefetch_is_cached(self, position: int) -> bool:
        """Whether the layer's prioritized range is all in the cache (a warm remount), so
        prefetching it costs no request; True for a layer with nothing prioritized."""
        end = self.layers[position].index.prefetch_end
        return not end or await self.readers[position].is_cached(end)

    def prioritized_paths(self, position: int) -> list[str]:
        """The layer's prioritized regular files (before its prefetch landmark), in blob
        order; blocking, run it in a thread."""
        layer = self.layers[position]
        end = layer.index.prefetch_end
        return layer.index.prioritized_paths(end) if end else []

    async def background_fetch(self, position: int, batch: int = 8 << 20) -> int:
        """Fetch the rest of a layer, a batch of adjacent chunks at a time, at low priority
        (see :class:`~stargzfs.reader.FetchGate`) so that on-demand reads go first."""
        layer, reader = self.layers[position], self.readers[position]
        key = layer.name
        self.background_state[key] = "running"
        try:
            chunks = await trio.to_thread.run_sync(
                layer.index.chunks_before, layer.index.toc_offset
            )
            done = 0
            group: list[Chunk] = []
            what = f"{layer.name} background fetch"
            for chunk in chunks:
                group.append(chunk)
                if group[-1].comp_end - group[0].comp_offset >= batch:
                    done += await reader.warm(group, what, background=True)
                    group = []
            if group:
                done += await reader.warm(group, what, background=True)
        except Exception as e:
            self.background_state[key] = f"failed ({e})"
            raise
        self.background_state[key] = f"done ({done} chunks)"
        return done

    def stats(self) -> dict[str, object]:
        """What ``stargzfs stats`` shows: traffic per layer, cache hits and misses."""
        layers = []
        for layer, reader in zip(self.layers, self.readers, strict=True):
            traffic = getattr(layer.source, "stats", None)
            fetched = getattr(traffic, "bytes", None)
            layers.append(
                {
                    "name": layer.name,
                    "size": layer.source.size,
                    "format": layer.index.format,
                    "entries": layer.index.entry_count,
                    "requests": getattr(traffic, "requests", None),
                    "bytes_fetched": fetched,
                    "fetched_fraction": (
                        round(fetched / layer.source.size, 4)
                        if fetched is not None and layer.source.size
                        else None
                    ),
                    "chunk_fetches": reader.fetches,
                    "prefetch": self.prefetch_state.get(layer.name, "none"),
                    "background_fetch": self.background_state.get(layer.name, "none"),
                }
            )
        return {"layers": layers, "cache": vars(self.cache.stats).copy()}

    async def iter_file(self, node: Node) -> AsyncIterator[bytes]:
        """A whole regular file, chunk by chunk, each verified."""
        if node.entry.kind != "reg":
            raise UsageError(f"{node.entry.name}: not a regular file")
        layer = self.layers[node.layer]
        async for piece in iter_file(layer.source, layer.index, node.entry):
            yield piece
