"""Layer indexes (one layer's TOC in compact, queryable form) and the merged tree."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping

import trio

from ..errors import DigestMismatchError
from ..formats.layer import ANNOTATION_TOC_DIGEST, fetch_toc
from ..source import ByteSource
from .layer_index import ROOT_ID, Chunk, Entry, LayerIndex
from .merged import MergedTree, Node

__all__ = ["ROOT_ID", "Chunk", "Entry", "LayerIndex", "MergedTree", "Node", "load_index"]


async def load_index(
    source: ByteSource,
    annotations: Mapping[str, str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    blob_digest: str | None = None,
    what: str = "layer",
) -> LayerIndex:
    """The index of a lazy layer: reopened from ``cache_dir`` when a previous run persisted
    it (keyed by the TOC digest the annotation vouches for, else by the blob digest), built
    from the layer's TOC otherwise (and then persisted there).
    """
    annotations = annotations or {}
    key = annotations.get(ANNOTATION_TOC_DIGEST) or blob_digest
    path = None
    if cache_dir is not None and key:
        folder = os.path.join(os.fspath(cache_dir), "index")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, key.replace(":", "-") + ".sqlite")
        if os.path.exists(path):
            try:
                return LayerIndex.open(path)
            except Exception:  # a damaged cache file is rebuilt, never trusted
                os.unlink(path)
    raw = await fetch_toc(source, annotations, what=what)
    expected = annotations.get(ANNOTATION_TOC_DIGEST)
    hasher = hashlib.sha256()

    def pieces() -> Iterator[bytes]:
        for piece in raw.pieces():
            hasher.update(piece)
            yield piece

    def check() -> str:
        # Verified before the index is committed: a bad TOC never reaches the cache.
        digest = "sha256:" + hasher.hexdigest()
        if expected is not None and digest != expected:
            raise DigestMismatchError(f"TOC of {what}", expected, digest)
        return digest

    def build() -> LayerIndex:
        return LayerIndex.build(
            pieces(),
            format=raw.format.value,
            compression=raw.format.compression,
            toc_offset=raw.footer.toc_offset,
            path=path,
            check=check,
            verified=expected is not None or raw.verified,
        )

    return await trio.to_thread.run_sync(build)
