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
    p.add_argument("--quiet", "-q", action="store_true", help="print only the digest")
    _add_client_options(p)
    p.set_defaults(func=cmd_push)
    _register_convert(sub)


def _client(args: argparse.Namespace, *refs: str) -> Any:
    """The registry client; with ``--insecure``, plain HTTP to the registries in ``refs``."""
    from ..errors import UsageError
    from ..reference import parse_reference
    from ..registry import RegistryClient

    hosts: list[str] = []
    if getattr(args, "insecure", False):
        for text in refs:
            if not text.startswith(("oci:", "docker-archive:", "dir-rootfs:")):
                try:
                    hosts.append(parse_reference(text).registry)
                except UsageError:  # not a reference (a local path)
                    continue
    return RegistryClient(insecure=hosts)


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
        async with _client(args, args.ref) as client:
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


def _register_convert(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an image's layers to eStargz (lazily pullable)",
        description=(
            "Convert every layer of SRC to eStargz and write the image to DST. SRC is a "
            "registry reference, oci:DIR[:TAG] or docker-archive:FILE; DST a registry "
            "reference or oci:DIR[:TAG]. Layers annotated with a TOC digest are kept unless "
            "--force. Config diff_ids follow the new layers. Prints the new manifest digest."
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
    _add_client_options(p)
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
