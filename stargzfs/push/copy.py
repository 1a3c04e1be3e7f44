"""Copy an image between repositories or registries, digests preserved.

Manifests (and indexes) are uploaded **byte for byte** as the source serves them, so their
digests do not change. Blobs already in the destination are skipped (``HEAD``), mounted when
source and destination share a registry, and otherwise streamed from one registry to the
other without touching the disk (memory bounded by the upload chunk size).

Without ``all_platforms`` an index is resolved to one platform's manifest (the host's, or
``platform``), which is copied and tagged: the tag then points at that manifest, whose digest
is the source's. With ``all_platforms`` every manifest of the index and the index itself are
copied.
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import Any, TextIO

from ..errors import FormatError
from ..image import INDEX_MEDIA_TYPES, Index, Manifest, parse_manifest, select_platform
from ..reference import Platform, Reference
from ..registry import RegistryClient
from .pusher import BlobJob, PushReport, run_blob_jobs
from .upload import DEFAULT_CHUNK_SIZE, ChunkSource, Uploader

__all__ = ["copy_image"]

log = logging.getLogger(__name__)
_MAX_DEPTH = 4


def _remote_chunks(client: RegistryClient, src: Reference, digest: str) -> ChunkSource:
    async def gen(offset: int) -> Any:
        stream = client.stream_blob(src.repo, digest, offset=offset, verify=offset == 0)
        async with aclosing(stream) as it:
            async for chunk in it:
                yield chunk

    return gen


async def copy_image(
    client: RegistryClient,
    src: Reference,
    dst: Reference,
    *,
    all_platforms: bool = False,
    platform: Platform | None = None,
    jobs: int = 3,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    out: TextIO | None = None,
    dest_client: RegistryClient | None = None,
) -> tuple[str, PushReport]:
    """Copy ``src`` to ``dst``; returns (digest now tagged at ``dst``, report)."""
    uploader = Uploader(dest_client or client, chunk_size=chunk_size)
    report = PushReport()

    async def copy_manifest(data: bytes, media_type: str, tag: bool, depth: int) -> str:
        doc = parse_manifest(data, media_type)
        if isinstance(doc, Index):
            if depth > _MAX_DEPTH:
                raise FormatError(f"{src}: indexes nested more than {_MAX_DEPTH} deep")
            for desc in doc.manifests:
                child = await client.get_manifest(src.with_digest(desc.digest))
                await copy_manifest(child.data, child.media_type, False, depth + 1)
        else:
            assert isinstance(doc, Manifest)
            jobs_ = [
                BlobJob(d.digest, d.size, _remote_chunks(client, src, d.digest), src.repo)
                for d in (*doc.layers, doc.config)
                if not d.urls
            ]
            await run_blob_jobs(uploader, dst.repo, jobs_, parallel=jobs, report=report, out=out)
        target = dst if tag else dst.with_digest(_digest(data))
        return await uploader.put_manifest(target, data, doc.media_type)

    top = await client.get_manifest(src)
    doc = parse_manifest(top.data, top.media_type)
    if isinstance(doc, Index) and not all_platforms:
        desc = select_platform(doc, platform or Platform.host(), str(src))
        child = await client.get_manifest(src.with_digest(desc.digest))
        if desc.media_type in INDEX_MEDIA_TYPES:
            raise FormatError(f"{src}: nested index for one platform: use --all-platforms")
        digest = await copy_manifest(child.data, child.media_type, True, 1)
    else:
        digest = await copy_manifest(top.data, top.media_type, True, 0)
    log.info("copied %s to %s@%s: %s", src, dst, digest, report.summary())
    return digest, report


def _digest(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()
