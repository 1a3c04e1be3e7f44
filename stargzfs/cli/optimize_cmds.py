"""``stargzfs optimize SRC DST -- CMD [ARGS...]``: record what CMD reads first in a lazy
mount of SRC, then convert SRC to eStargz with those files prioritized and write DST."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "optimize",
        help="run a command in the image, then convert it with the files it read first",
        description=(
            "Mount SRC lazily, run CMD chrooted into it (as root, /proc /dev /sys bound in) "
            "for at most --period seconds while recording the files it reads, then convert "
            "SRC to eStargz with those files prioritized (prefetched after mount) into DST. "
            "Usage: stargzfs optimize [options] SRC DST -- CMD [ARGS...]"
        ),
    )
    p.add_argument("src", metavar="SRC", help="registry reference or oci:DIR[:TAG]")
    p.add_argument("dst", metavar="DST", help="registry reference or oci:DIR[:TAG]")
    p.add_argument(
        "command", metavar="CMD", nargs="*", help="the command and its arguments, after --"
    )
    p.add_argument("--period", type=float, default=10.0, help="seconds to let CMD run (10)")
    p.add_argument("--chunk-size", type=int, default=None, help="eStargz chunk size in bytes")
    p.add_argument("--cache-dir", help="chunk cache for the recording mount")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the registries")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_optimize)


async def cmd_optimize(args: argparse.Namespace) -> int:
    import sys

    import trio

    from ..optimize import record_accesses
    from ..push.convert import ConvertOptions, convert_image
    from .push_cmds import _client

    command = args.command_argv
    mount_args = ["--insecure"] if args.insecure else []
    accessed = await trio.to_thread.run_sync(
        lambda: record_accesses(
            args.src,
            command,
            period=args.period,
            cache_dir=args.cache_dir,
            extra_mount_args=mount_args,
        )
    )
    if not args.quiet:
        print(f"recorded {len(accessed)} file(s) read by the command", file=sys.stderr)
    # Already-eStargz layers are rebuilt too: the point is the new file order.
    opts = ConvertOptions(chunk_size=args.chunk_size, prioritized=accessed, force=True)
    async with _client(args, args.src, args.dst) as client:
        digest, _report = await convert_image(
            client, args.src, args.dst, opts, out=None if args.quiet else sys.stderr
        )
    print(digest)
    return 0
