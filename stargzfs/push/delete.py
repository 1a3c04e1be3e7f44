"""Deleting images from a registry: one reference, or pruning old tags of a repository.

The registry API deletes **manifests by digest**: every tag pointing at that digest goes with
it, and the blobs stay on disk until the registry's garbage collection runs
(``registry garbage-collect`` for distribution). A registry that disallows deletes answers
``405 UNSUPPORTED``, which surfaces as :class:`~stargzfs.errors.UnsupportedError` (exit 7)
with the registry's message.

Pruning orders tags by their image config's ``created`` time (for an index: the host
platform's manifest, else its first image), and never deletes a digest that a kept tag also
points to: deleting it would delete the kept tag too. Tags whose config has no ``created``
time are never pruned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ..errors import FormatError, NotFoundError, UnsupportedError, UsageError
from ..image import (
    INDEX_MEDIA_TYPES,
    MAX_CONFIG_SIZE,
    Index,
    Manifest,
    parse_config,
    parse_manifest,
    select_platform,
)
from ..reference import Platform, Reference, Repository
from ..registry import RegistryClient
from .upload import Uploader

__all__ = ["PrunePlan", "TagInfo", "delete_digest", "plan_prune", "resolve_digest"]

GC_NOTE = (
    "the registry frees the space when its garbage collection runs "
    "(e.g. `registry garbage-collect` for distribution)"
)


async def resolve_digest(client: RegistryClient, ref: Reference) -> str:
    """The manifest digest ``ref`` points at (its own digest if it has one)."""
    if ref.digest is not None:
        return ref.digest
    head = await client.head_manifest(ref)
    if head.digest:
        return head.digest
    return (await client.get_manifest(ref)).digest


async def delete_digest(client: RegistryClient, repo: Repository, digest: str) -> None:
    await Uploader(client).delete_manifest(repo, digest)


@dataclass
class TagInfo:
    tag: str
    digest: str
    created: datetime | None
    reason: str = ""

    def describe(self) -> str:
        when = self.created.isoformat() if self.created else "no created time"
        text = f"{self.tag:<30} {self.digest}  {when}"
        return f"{text}  ({self.reason})" if self.reason else text


@dataclass
class PrunePlan:
    repo: Repository
    delete: list[TagInfo] = field(default_factory=list)
    keep: list[TagInfo] = field(default_factory=list)

    @property
    def digests(self) -> list[str]:
        seen: list[str] = []
        for t in self.delete:
            if t.digest not in seen:
                seen.append(t.digest)
        return seen

    def render(self) -> str:
        lines = [f"prune {self.repo}: {len(self.delete)} tag(s) to delete, {len(self.keep)} kept"]
        lines += [f"  delete  {t.describe()}" for t in self.delete]
        lines += [f"  keep    {t.describe()}" for t in self.keep]
        return "\n".join(lines)


async def _created(client: RegistryClient, ref: Reference) -> tuple[str, datetime | None]:
    resp = await client.get_manifest(ref)
    doc = parse_manifest(resp.data, resp.media_type)
    depth = 0
    while isinstance(doc, Index) and depth < 4:
        depth += 1
        try:
            desc = select_platform(doc, Platform.host(), str(ref))
        except NotFoundError:
            images = [d for d in doc.images() if d.media_type not in INDEX_MEDIA_TYPES]
            if not images:
                return resp.digest, None
            desc = images[0]
        child = await client.get_manifest(ref.with_digest(desc.digest))
        doc = parse_manifest(child.data, child.media_type)
    if not isinstance(doc, Manifest):
        return resp.digest, None
    try:
        raw = await client.get_blob(ref.repo, doc.config.digest, max_size=MAX_CONFIG_SIZE)
        created = parse_config(raw).created_at
    except (NotFoundError, FormatError, UnsupportedError):
        return resp.digest, None  # no config, or not an image config (an artifact): undated
    if created is not None and created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return resp.digest, created


async def plan_prune(
    client: RegistryClient,
    repo: Repository,
    *,
    keep: int | None = None,
    older_than_days: float | None = None,
    exclude: str | None = None,
    now: datetime | None = None,
) -> PrunePlan:
    if (keep is None) == (older_than_days is None):
        raise UsageError("prune needs exactly one of --keep N and --older-than DAYS")
    if keep is not None and keep < 0:
        raise UsageError("--keep must not be negative")
    try:
        pattern = re.compile(exclude) if exclude else None
    except re.error as e:
        raise UsageError(f"--exclude: invalid regular expression: {e}") from None
    now = now or datetime.now(UTC)
    tags = await client.list_tags(repo)
    infos: list[TagInfo] = []
    for tag in tags:
        digest, created = await _created(client, Reference(repo, tag))
        infos.append(TagInfo(tag, digest, created))
    plan = PrunePlan(repo)
    candidates: list[TagInfo] = []
    for info in infos:
        if pattern is not None and pattern.search(info.tag):
            info.reason = "excluded"
            plan.keep.append(info)
        elif info.created is None:
            info.reason = "no created time"
            plan.keep.append(info)
        else:
            candidates.append(info)
    candidates.sort(key=lambda t: (t.created, t.tag), reverse=True)
    doomed: list[TagInfo] = []
    if keep is not None:
        for t in candidates[:keep]:
            t.reason = "newest"
        plan.keep += candidates[:keep]
        doomed = candidates[keep:]
    else:
        assert older_than_days is not None
        limit = now - timedelta(days=older_than_days)
        for t in candidates:
            assert t.created is not None
            if t.created < limit:
                doomed.append(t)
            else:
                t.reason = "recent"
                plan.keep.append(t)
    kept_digests = {t.digest: t.tag for t in plan.keep}
    for t in doomed:
        shared = kept_digests.get(t.digest)
        if shared is not None:
            t.reason = f"same digest as kept tag {shared}"
            plan.keep.append(t)
        else:
            plan.delete.append(t)
    return plan
