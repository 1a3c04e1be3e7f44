"""Commands that work on a single layer file, no registry: ``convert-layer``."""

from __future__ import annotations

import argparse
import re
from typing import Any

_SIZE_RE = re.compile(r"(?i)^\s*(\d+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)\s*$")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """``4194304``, ``4M``, ``4MiB``, ``64k``: binary units, since chunk sizes are powers of two."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4194304, 64K, 4MiB)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()[:1]]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "convert-layer",
        help="convert a layer tar (plain, gzip or zstd) to eStargz",
        description=(
            "Convert a layer (tar, tar.gz or tar.zst, detected from its content) to an eStargz "
            "blob, and print its media type, digests, sizes and manifest annotations as JSON "
            "on stdout."
        ),
    )
    p.add_argument("input", metavar="IN", help="layer file, or - for stdin")
    p.add_argument(
        "output", metavar="OUT", help="eStargz blob to write, or - for stdout (JSON then on stderr)"
    )
    p.add_argument(
        "--chunk-size",
        type=parse_size,
        default=None,
        metavar="N",
        help="largest piece of a file per gzip member (default 4MiB)",
    )
    p.add_argument(
        "--prioritize",
        metavar="FILE",
        help="file listing paths to put first (prefetched after mount), one per line",
    )
    p.add_argument(
        "--min-chunk-size",
        type=parse_size,
        default=0,
        metavar="N",
        help="pack consecutive small files into one gzip member of at least N compressed "
        "bytes (smaller blob, coarser lazy reads; needs stargz-snapshotter >= 0.13 to read)",
    )
    p.add_argument(
        "--level",
        type=int,
        default=None,
        metavar="L",
        help="compression level: gzip 0-9 (default 6), zstd 1-22 (default 3)",
    )
    p.add_argument(
        "--format",
        choices=("estargz", "zstd:chunked"),
        default="estargz",
        help="estargz (gzip, default) or stargz-snapshotter's zstd:chunked",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="compression threads (default: usable CPUs; the output is the same for any N)",
    )
    p.set_defaults(func=cmd_convert_layer)


def _read_prioritized(path: str) -> list[str]:
    from ..errors import NotFoundError, UsageError

    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise NotFoundError(f"prioritized-files list {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prioritized-files list {path!r}: {e}") from None
    # Paths are taken verbatim (they may contain spaces); only blank lines are skipped.
    return [line for line in lines if line.strip()]


def cmd_convert_layer(args: argparse.Namespace) -> int:
    import os
    import sys
    import tempfile
    from contextlib import ExitStack
    from typing import BinaryIO

    from ..convert import convert_layer
    from ..errors import NotFoundError, StargzfsError
    from ..formats.estargz_writer import DEFAULT_CHUNK_SIZE

    prioritized = _read_prioritized(args.prioritize) if args.prioritize else []
    with ExitStack() as stack:
        src: BinaryIO
        if args.input == "-":
            src = sys.stdin.buffer
        else:
            try:
                src = stack.enter_context(open(args.input, "rb"))
            except FileNotFoundError:
                raise NotFoundError(f"{args.input}: no such file") from None
            except OSError as e:
                raise StargzfsError(f"{args.input}: {e.strerror}") from None

        tmp_path = None
        dst: BinaryIO
        if args.output == "-":
            dst = sys.stdout.buffer
        else:
            # Write next to the destination and rename at the end, so OUT is either the
            # complete blob or absent, never a half-written one.
            directory = os.path.dirname(os.path.abspath(args.output))
            try:
                fd, tmp_path = tempfile.mkstemp(
                    dir=directory, prefix=".convert-", suffix=".partial"
                )
            except OSError as e:
                raise StargzfsError(f"{args.output}: {e.strerror}") from None
            # mkstemp creates 0600; give OUT the mode a plain open() would have.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
            dst = stack.enter_context(os.fdopen(fd, "wb"))
        try:
            result = convert_layer(
                src,
                dst,
                chunk_size=DEFAULT_CHUNK_SIZE if args.chunk_size is None else args.chunk_size,
                prioritized=prioritized,
                min_chunk_size=args.min_chunk_size,
                compression_level=args.level,
                layer_format=args.format,
                workers=args.workers,
            )
            dst.flush()
            if tmp_path is not None:
                os.replace(tmp_path, args.output)
                tmp_path = None
        except OSError as e:
            raise StargzfsError(f"convert-layer: {e}") from None
        finally:
            if tmp_path is not None:
                os.unlink(tmp_path)
    print(result.to_json(), file=sys.stderr if args.output == "-" else sys.stdout)
    return 0
