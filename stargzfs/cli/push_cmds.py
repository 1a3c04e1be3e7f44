"""Commands that write to a registry: ``push``, ``convert``, ``copy``, ``delete``, ``prune``."""

from __future__ import annotations

import argparse
from typing import Any

from .layer_cmds import parse_size

_MIB = 1024 * 1024


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _add_client_options(p: argparse.ArgumentParser, creds_for: str = "the registry") -> None:
    p.add_argument(
        "--creds-stdin",
        action="store_true",
        help=f"read USER:PASSWORD for {creds_for} from the first line of stdin",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP to the registries named (loopback registries always are)",
    )


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "push",
        help="push a docker-archive, OCI layout or rootfs directory to a registry",
        description=(
            "Push SOURCE to REF. SOURCE is a `docker save` tar (docker-archive:FILE[:NAME:TAG] "
            "or a bare path), an OCI layout (oci:DIR[:TAG]) or a directory packed as a "
            "one-layer image (dir-rootfs:DIR). Blobs already in the repository are skipped, "
            "so re-running an interrupted push only sends what is missing. Prints the "
            "manifest digest."
        ),
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("ref", metavar="REF", help="destination image reference (tag)")
    p.add_argument(
        "--jobs", "-j", type=_positive, default=3, metavar="N", help="blobs in flight (3)"
    )
    p.add_argument(
        "--chunk-size",
        type=parse_size,
        default=5 * _MIB,
        metavar="N",
        help="bytes per upload request (5MiB); smaller blobs go in one request",
    )
    p.add_argument(
        "--mount-from",
        metavar="REPO",
        help="a repository of the same registry that may hold the blobs (mounted, not sent)",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="do not remember upload sessions (by default a re-run resumes a blob that was "
        "cut off midway; sessions are kept in $XDG_CACHE_HOME/stargzfs/uploads)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print only the digest")
    _add_client_options(p)
    p.set_defaults(func=cmd_push)
    _register_convert(sub)
    _register_manage(sub)


def _client(args: argparse.Namespace, *refs: str, creds_for: str | None = None) -> Any:
    """The registry client; with ``--insecure``, plain HTTP to the registries in ``refs``;
    with ``--creds-stdin``, the credentials read from stdin for ``creds_for``'s registry."""
    import sys

    from ..errors import UsageError
    from ..reference import parse_reference
    from ..registry import Credentials, RegistryClient

    def registry_of(text: str) -> str | None:
        if text.startswith(("oci:", "docker-archive:", "dir-rootfs:")):
            return None
        try:
            return parse_reference(text).registry
        except UsageError:  # not a reference (a local path)
            return None

    hosts: list[str] = []
    if getattr(args, "insecure", False):
        hosts = [h for h in map(registry_of, refs) if h is not None]
    explicit: dict[str, Credentials] | None = None
    if getattr(args, "creds_stdin", False):
        registry = registry_of(creds_for or refs[-1])
        if registry is None:
            raise UsageError("--creds-stdin: no registry to use the credentials for")
        line = sys.stdin.readline().rstrip("\r\n")
        user, sep, password = line.partition(":")
        if not sep or not user:
            raise UsageError("--creds-stdin: expected USER:PASSWORD on the first line of stdin")
        explicit = {registry: Credentials(user, password, source="stdin")}
    return RegistryClient(insecure=hosts, credentials=explicit)


async def cmd_push(args: argparse.Namespace) -> int:
    import sys

    import trio

    from ..errors import UsageError
    from ..push.pusher import default_state_dir, push_image
    from ..push.sources import open_source
    from ..reference import Repository, parse_reference

    dest = parse_reference(args.ref)
    if dest.digest is not None:
        raise UsageError(f"push to a tag, not a digest: {args.ref}")
    mount_from = Repository.parse(args.mount_from) if args.mount_from else None
    image = await trio.to_thread.run_sync(lambda: open_source(args.source, jobs=args.jobs))
    with image:
        async with _client(args, args.ref) as client:
            digest, report = await push_image(
                client,
                image,
                dest,
                jobs=args.jobs,
                chunk_size=args.chunk_size,
                out=None if args.quiet else sys.stderr,
                mount_from=mount_from,
                state_dir=None if args.no_resume else default_state_dir(),
            )
    if not args.quiet:
        print(f"pushed {dest}: {report.summary()}", file=sys.stderr)
    print(digest)
    return 0


def _register_convert(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an image's layers to eStargz (lazily pullable)",
        description=(
            "Convert every layer of SRC to eStargz and write the image to DST. SRC is a "
            "registry reference, oci:DIR[:TAG] or docker-archive:FILE; DST a registry "
            "reference, oci:DIR[:TAG] or docker-archive:FILE[:NAME:TAG]. Layers annotated "
            "with a TOC digest are kept unless --force. Config diff_ids follow the new "
            "layers. Prints the new manifest digest."
        ),
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument(
        "--chunk-size",
        type=parse_size,
        default=None,
        metavar="N",
        help="largest piece of a file per compressed member (default 4MiB)",
    )
    p.add_argument(
        "--prioritize",
        metavar="FILE",
        help="file listing paths (one per line) to put first, before the landmark, in the "
        "layers that contain them",
    )
    p.add_argument(
        "--zstdchunked",
        action="store_true",
        help="write stargz-snapshotter's zstd:chunked instead of eStargz",
    )
    plat = p.add_mutually_exclusive_group()
    plat.add_argument("--platform", metavar="P", help="platform to convert from an index")
    plat.add_argument(
        "--all-platforms", action="store_true", help="convert every platform of an index"
    )
    p.add_argument("--force", action="store_true", help="re-convert eStargz layers too")
    p.add_argument(
        "--jobs", "-j", type=_positive, default=3, metavar="N", help="layers in flight (3)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print only the digest")
    _add_client_options(p, "DST's registry")
    p.set_defaults(func=cmd_convert)


async def cmd_convert(args: argparse.Namespace) -> int:
    import sys

    from ..push.convert import ConvertOptions, convert_image
    from ..reference import Platform
    from .layer_cmds import _read_prioritized

    opts = ConvertOptions(
        chunk_size=args.chunk_size,
        prioritized=_read_prioritized(args.prioritize) if args.prioritize else (),
        platform=Platform.parse(args.platform) if args.platform else None,
        all_platforms=args.all_platforms,
        force=args.force,
        jobs=args.jobs,
        layer_format="zstd:chunked" if args.zstdchunked else "estargz",
    )
    async with _client(args, args.src, args.dst) as client:
        digest, report = await convert_image(
            client, args.src, args.dst, opts, out=None if args.quiet else sys.stderr
        )
    if not args.quiet:
        print(
            f"{args.dst}: {report.converted} layer(s) converted, {report.kept} kept",
            file=sys.stderr,
        )
    print(digest)
    return 0


def _register_manage(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "copy",
        help="copy an image between repositories or registries, digests preserved",
        description=(
            "Copy SRC to DST (registry references). Manifests are copied byte for byte, so "
            "digests stay the same; blobs are skipped when present, mounted within one "
            "registry, and otherwise streamed registry to registry. Without --all-platforms "
            "an index is copied as the one manifest for this machine (or --platform)."
        ),
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    plat = p.add_mutually_exclusive_group()
    plat.add_argument("--platform", metavar="P", help="platform to copy from an index")
    plat.add_argument(
        "--all-platforms", action="store_true", help="copy the whole index, every platform"
    )
    p.add_argument(
        "--jobs", "-j", type=_positive, default=3, metavar="N", help="blobs in flight (3)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print only the digest")
    _add_client_options(p, "DST's registry")
    p.set_defaults(func=cmd_copy)

    p = sub.add_parser(
        "delete",
        help="delete an image (manifest) from a registry",
        description=(
            "Resolve REF to its manifest digest and delete that manifest: every tag pointing "
            "at the same digest goes too. Asks first on a terminal unless --yes. The "
            "registry frees the space when its garbage collection runs. A registry that "
            "disallows deletes gives exit code 7."
        ),
    )
    p.add_argument("ref", metavar="REF")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    _add_client_options(p)
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser(
        "prune",
        help="delete the oldest tags of a repository",
        description=(
            "Order REPO's tags by their image config's created time and delete the oldest: "
            "all but the newest N (--keep) or those older than DAYS (--older-than). A digest "
            "that a kept tag also points to is never deleted; tags matching --exclude and "
            "tags without a created time are kept."
        ),
    )
    p.add_argument("repo", metavar="REPO", help="repository, e.g. registry.example/app")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--keep", type=int, metavar="N", help="keep the newest N tags")
    how.add_argument("--older-than", type=float, metavar="DAYS", help="delete tags older than DAYS")
    p.add_argument("--exclude", metavar="REGEX", help="never delete tags matching REGEX")
    p.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    _add_client_options(p)
    p.set_defaults(func=cmd_prune)


async def cmd_copy(args: argparse.Namespace) -> int:
    import sys

    from ..errors import UsageError
    from ..push.copy import copy_image
    from ..reference import Platform, parse_reference

    src, dst = parse_reference(args.src), parse_reference(args.dst)
    if dst.digest is not None and dst.tag is not None:
        raise UsageError(f"copy to a tag or a digest, not both: {args.dst}")
    async with _client(args, args.src, args.dst) as client:
        digest, report = await copy_image(
            client,
            src,
            dst,
            all_platforms=args.all_platforms,
            platform=Platform.parse(args.platform) if args.platform else None,
            jobs=args.jobs,
            out=None if args.quiet else sys.stderr,
        )
    if not args.quiet:
        print(f"copied {src} to {dst}: {report.summary()}", file=sys.stderr)
    print(digest)
    return 0


def _confirm(question: str) -> bool:
    """Ask on a terminal; without one (scripts, CI) there is nobody to ask: proceed."""
    import sys

    if not sys.stdin.isatty():
        return True
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


async def cmd_delete(args: argparse.Namespace) -> int:
    import sys

    import trio

    from ..push.delete import GC_NOTE, delete_digest, resolve_digest
    from ..reference import parse_reference

    ref = parse_reference(args.ref)
    async with _client(args, args.ref) as client:
        digest = await resolve_digest(client, ref)
        if not args.yes:
            question = f"delete {ref.repo}@{digest} and every tag pointing at it?"
            if not await trio.to_thread.run_sync(_confirm, question):
                print("not deleted", file=sys.stderr)
                return 1
        await delete_digest(client, ref.repo, digest)
    print(f"deleted {ref.repo}@{digest}; {GC_NOTE}", file=sys.stderr)
    print(digest)
    return 0


async def cmd_prune(args: argparse.Namespace) -> int:
    import sys

    import trio

    from ..push.delete import GC_NOTE, delete_digest, plan_prune
    from ..reference import Repository

    repo = Repository.parse(args.repo)
    async with _client(args, args.repo) as client:
        plan = await plan_prune(
            client,
            repo,
            keep=args.keep,
            older_than_days=args.older_than,
            exclude=args.exclude,
        )
        print(plan.render())
        if args.dry_run or not plan.delete:
            if args.dry_run:
                print("dry run: nothing deleted")
            return 0
        if not args.yes:
            question = f"delete {len(plan.digests)} manifest(s) from {repo}?"
            if not await trio.to_thread.run_sync(_confirm, question):
                print("nothing deleted", file=sys.stderr)
                return 1
        for digest in plan.digests:
            await delete_digest(client, repo, digest)
            print(f"deleted {repo}@{digest}")
    print(f"{len(plan.digests)} manifest(s) deleted; {GC_NOTE}", file=sys.stderr)
    return 0
