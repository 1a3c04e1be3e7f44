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


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--insecure",
        action="append",
        default=[],
        metavar="HOST",
        help="reach HOST over plain HTTP (loopback hosts always are); repeatable",
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
    p.add_argument("--quiet", "-q", action="store_true", help="print only the digest")
    _add_client_options(p)
    p.set_defaults(func=cmd_push)


def _client(args: argparse.Namespace) -> Any:
    from ..registry import RegistryClient

    return RegistryClient(insecure=getattr(args, "insecure", ()))


async def cmd_push(args: argparse.Namespace) -> int:
    import sys

    import trio

    from ..errors import UsageError
    from ..push.pusher import push_image
    from ..push.sources import open_source
    from ..reference import Repository, parse_reference

    dest = parse_reference(args.ref)
    if dest.digest is not None:
        raise UsageError(f"push to a tag, not a digest: {args.ref}")
    mount_from = Repository.parse(args.mount_from) if args.mount_from else None
    image = await trio.to_thread.run_sync(lambda: open_source(args.source, jobs=args.jobs))
    with image:
        async with _client(args) as client:
            digest, report = await push_image(
                client,
                image,
                dest,
                jobs=args.jobs,
                chunk_size=args.chunk_size,
                out=None if args.quiet else sys.stderr,
                mount_from=mount_from,
            )
    if not args.quiet:
        print(f"pushed {dest}: {report.summary()}", file=sys.stderr)
    print(digest)
    return 0
