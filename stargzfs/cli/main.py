"""Entry point of the ``stargzfs`` command.

Each command group lives in its own module under ``stargzfs.cli`` and exposes
``register(subparsers)``, which adds its sub-commands and sets ``func`` on them: a callable
taking the parsed ``argparse.Namespace`` and returning an exit code (sync) or an awaitable of
one (async commands are run under trio here). Errors are translated to exit codes here, once.

Heavy imports (httpx, pyfuse3, zstandard) happen inside the command modules' handlers, so
``stargzfs --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import sys
from collections.abc import Sequence

from ..errors import StargzfsError

# Modules under stargzfs.cli that provide register(subparsers). Order = order in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "image_cmds",
    "registry_cmds",
    "mount_cmds",
    "pull_cmds",
    "push_cmds",
    "optimize_cmds",
    "layer_cmds",
)

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  other error
  2  usage error (bad arguments or reference)
  3  authentication or authorization failed
  4  not found (image, tag, layer, platform, path)
  5  registry or network failure after retries
  6  integrity failure (digest mismatch, malformed TOC, footer or manifest)
  7  operation not supported (by the registry or the layer format)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stargzfs",
        description="Use container images without pulling them.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="informational logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        module.register(sub)
    return parser


# Commands that run another program: everything after their "--" is that program's argv.
COMMANDS_WITH_TAIL = frozenset({"optimize"})


def _split_command_tail(argv: list[str]) -> tuple[list[str], list[str] | None]:
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in COMMANDS_WITH_TAIL and "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    head, tail = _split_command_tail(raw_argv)
    args = parser.parse_args(head)
    if tail is not None:
        args.command_argv = tail
    args.raw_argv = raw_argv  # for commands that re-execute themselves (mount daemon)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="stargzfs: %(levelname)s: %(message)s")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        try:
            if inspect.iscoroutinefunction(func):
                import trio

                return int(trio.run(func, args))
            return int(func(args))
        except BaseExceptionGroup as group:  # from a nursery: report its one real error
            from .._groups import first_error

            error = first_error(group, prefer=(StargzfsError, KeyboardInterrupt, OSError))
            if isinstance(error, Exception | KeyboardInterrupt):
                raise error from group
            raise
    except KeyboardInterrupt:
        print("stargzfs: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        return _report(e, args.debug)


def _report(e: Exception, debug: bool) -> int:
    """One line on stderr (a traceback too with ``--debug``); returns the exit code."""
    if isinstance(e, BrokenPipeError):
        return 0  # the reader went away (``stargzfs cat ... | head``): not an error
    if debug:
        logging.exception("failed")
    if isinstance(e, StargzfsError):
        print(f"stargzfs: error: {e}", file=sys.stderr)
        return e.exit_code
    if isinstance(e, OSError):
        print(f"stargzfs: error: {_os_error(e)}", file=sys.stderr)
        return 1
    detail = " ".join(str(e).split()) or "(no message)"
    hint = "" if debug else " (run with --debug for a traceback)"
    print(f"stargzfs: internal error: {type(e).__name__}: {detail}{hint}", file=sys.stderr)
    return 1


def _os_error(e: OSError) -> str:
    """``PATH: strerror`` (``PATH -> PATH2: strerror`` for renames and links)."""
    what = e.strerror or " ".join(str(e).split()) or type(e).__name__
    if e.filename is None:
        return what
    where = str(e.filename)
    if e.filename2 is not None:
        where += f" -> {e.filename2}"
    return f"{where}: {what}"


if __name__ == "__main__":
    sys.exit(main())
