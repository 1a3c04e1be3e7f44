"""``stargzfs pull``: materialize a whole image (rootfs, OCI layout, docker-archive, dir)."""

from __future__ import annotations

import argparse
from typing import Any

FORMATS = ("rootfs", "oci", "docker-archive", "dir")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "pull",
        help="download a whole image to a rootfs, an OCI layout, a docker-archive or a dir",
        description=(
            "Download every layer of an image (in parallel, resumably, verified) and write it "
            "as a root filesystem (layers applied with whiteouts), an OCI image layout, a "
            "docker-archive tar (docker load) or skopeo's dir: layout."
        ),
    )
    p.add_argument("ref", metavar="REF", help="image reference, e.g. registry/repo:tag")
    p.add_argument("dest", metavar="DEST", help="destination directory (a file for docker-archive)")
    p.add_argument("--format", choices=FORMATS, default="rootfs", help="output (default: rootfs)")
    plat = p.add_mutually_exclusive_group()
    plat.add_argument("--platform", metavar="P", help="OS/ARCH[/VARIANT] (default: this host's)")
    plat.add_argument(
        "--all-platforms", action="store_true", help="every platform of an index (--format oci)"
    )
    p.add_argument("--jobs", type=int, default=4, metavar="N", help="parallel layer downloads")
    p.add_argument(
        "--connections",
        type=int,
        default=1,
        metavar="N",
        help="parallel range requests per large blob (segmented download; default 1)",
    )
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache-dir", metavar="D", help="blob cache (default ~/.cache/stargzfs)")
    cache.add_argument("--no-cache", action="store_true", help="don't keep downloaded blobs")
    p.add_argument("--force", action="store_true", help="replace a non-empty DEST")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    p.set_defaults(func=_pull)


async def _pull(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import StargzfsError
    from ..pull.pull import PullOptions, pull
    from ..reference import Platform

    options = PullOptions(
        format=args.format,
        platform=Platform.parse(args.platform) if args.platform else None,
        all_platforms=args.all_platforms,
        jobs=args.jobs,
        connections=args.connections,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        no_cache=args.no_cache,
        force=args.force,
        quiet=args.quiet,
    )
    try:
        await pull(args.ref, args.dest, options)
    except OSError as e:  # disk full, permissions, ...: one line, not a traceback
        where = f": {e.filename}" if e.filename else ""
        raise StargzfsError(f"pull failed: {e.strerror or e}{where}") from None
    return 0
