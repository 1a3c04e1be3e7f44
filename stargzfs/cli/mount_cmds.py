"""``stargzfs mount`` and ``stargzfs umount``.

Without ``--foreground`` the command daemonizes the safe way: it re-executes itself in the
foreground as a detached child with a pipe, and returns only when the child writes "ready"
(exit 0) or an error (its exit code and message). So a script can use the mount point as
soon as ``stargzfs mount`` returns, and a failure leaves no mount behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from .._process import process_state
from ..errors import NotFoundError, StargzfsError, UsageError
from .image_cmds import add_network_options
from .layer_cmds import parse_size

DEFAULT_CACHE_SIZE = 10 << 30

_READY_FD_ENV = "STARGZFS_READY_FD"
# Where a daemon answers `stats` (fuse/operations.py; not imported here: it needs pyfuse3).
STATS_XATTR = "user.stargzfs.stats"
# How long `umount` retries a busy mount of a live daemon before detaching it lazily.
BUSY_RETRY_SECONDS = 1.0

log = logging.getLogger("stargzfs.mount")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("mount", help="mount an image lazily (read-only FUSE)")
    p.add_argument("ref", help="image reference, or oci:DIR[:TAG]")
    p.add_argument("mountpoint")
    p.add_argument("--platform", help="os/arch[/variant] (default: this host)")
    p.add_argument(
        "--layer",
        metavar="DIGEST",
        help="mount this layer alone instead of the merged image (a digest prefix will do)",
    )
    p.add_argument(
        "--cache-dir",
        help="chunk, index and lookup-trace cache (default: $XDG_CACHE_HOME/stargzfs)",
    )
    p.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="mount layers without a TOC digest annotation",
    )
    p.add_argument(
        "--no-prefetch",
        action="store_true",
        help="do not fetch prioritized files in the background after mounting",
    )
    p.add_argument(
        "--cache-size",
        type=parse_size,
        default=DEFAULT_CACHE_SIZE,
        metavar="SIZE",
        help="bound the disk chunk cache, least recently used chunks go first (default 10G)",
    )
    p.add_argument(
        "--background-fetch",
        action="store_true",
        help="after the prefetch, fetch the rest of every layer in the background",
    )
    p.add_argument(
        "--record-access",
        metavar="FILE",
        help="append each file's path to FILE on its first read (for optimize)",
    )
    add_network_options(p)
    p.add_argument("--foreground", "-f", action="store_true", help="do not daemonize")
    p.add_argument("--log-file", help="daemon log (default: none when daemonized)")
    p.set_defaults(func=cmd_mount)

    st = sub.add_parser(
        "stats", help="traffic, cache, prefetch, kernel-request and lookup-trace figures of a mount"
    )
    st.add_argument("mountpoint")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_stats)

    u = sub.add_parser(
        "umount", help="unmount a stargzfs mount, waiting for its daemon (also after a crash)"
    )
    u.add_argument("mountpoint")
    u.add_argument(
        "--force", action="store_true", help="also unmount a FUSE mount that is not stargzfs"
    )
    u.set_defaults(func=cmd_umount)


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "stargzfs")


def cmd_mount(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.mountpoint):
        raise UsageError(f"{args.mountpoint}: mount point is not a directory")
    child = bool(os.environ.get(_READY_FD_ENV))
    if args.foreground or child:
        import trio

        _setup_logging(args.log_file, to_file=not child)
        if child:
            # A daemon must not keep the directory it was started from busy.
            _absolute_paths(args)
            os.chdir("/")
        return int(trio.run(_serve, args))
    return _daemonize(args)


def _setup_logging(log_file: str | None, *, to_file: bool) -> None:
    """With ``--log-file`` the daemon logs informational lines too (mounted, prefetched,
    failed reads). The daemonized child's stderr already is that file; in the foreground a
    file handler is added and stderr keeps its level."""
    if not log_file:
        return
    root = logging.getLogger()
    level = root.level
    if to_file:
        for handler in root.handlers:
            if handler.level == logging.NOTSET:
                handler.setLevel(level)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(
            logging.Formatter("%(asctime)s stargzfs[%(process)d]: %(levelname)s: %(message)s")
        )
        root.addHandler(handler)
    root.setLevel(min(level, logging.INFO))
    if level > logging.INFO:
        # the file is for what the mount did (mounted, prefetched, failed reads), not a line
        # per HTTP request (httpx logs those at INFO): those need -v or --debug
        logging.getLogger("httpx").setLevel(logging.WARNING)


def _absolute_paths(args: argparse.Namespace) -> None:
    """Paths given relative to the caller's directory, before the child leaves it."""
    for name in ("mountpoint", "cache_dir", "log_file", "record_access"):
        value = getattr(args, name, None)
        if value:
            setattr(args, name, os.path.abspath(value))
    if args.ref.startswith("oci:"):
        from ..open_image import parse_oci_ref

        layout, tag = parse_oci_ref(args.ref)
        args.ref = f"oci:{os.path.abspath(layout)}" + (f":{tag}" if tag else "")


def _daemonize(args: argparse.Namespace) -> int:
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, **{_READY_FD_ENV: str(write_fd)})
    argv = [sys.executable, "-m", "stargzfs", *args.raw_argv]
    log = open(args.log_file, "ab") if args.log_file else subprocess.DEVNULL  # noqa: SIM115
    try:
        subprocess.Popen(
            argv,
            env=env,
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
        if log is not subprocess.DEVNULL:
            log.close()  # type: ignore[union-attr]
    with os.fdopen(read_fd, "r") as pipe:
        status = pipe.readline().strip()
    if status == "ready":
        return 0
    code, _, message = status.partition(" ")
    print(
        f"stargzfs: error: {message or 'the mount daemon exited before mounting'}", file=sys.stderr
    )
    return int(code) if code.isdigit() else 1


def _report(text: str) -> None:
    fd = os.environ.pop(_READY_FD_ENV, None)
    if fd is not None:
        with os.fdopen(int(fd), "w") as pipe:
            pipe.write(text + "\n")


def _ready(args: argparse.Namespace) -> None:
    log.info("mounted %s at %s (pid %d)", args.ref, args.mountpoint, os.getpid())
    _report("ready")


async def _serve(args: argparse.Namespace) -> int:
    from ..cache import ChunkCache
    from ..fuse.daemon import serve
    from ..fuse.lookup_trace import trace_file
    from ..open_image import open_image

    cache_dir = args.cache_dir or default_cache_dir()
    try:
        async with await open_image(
            args.ref,
            platform=args.platform,
            allow_unverified=args.allow_unverified,
            mirrors=args.mirror,
            insecure=args.insecure,
        ) as opened:
            cache = ChunkCache(cache_dir, max_disk_bytes=args.cache_size)
            if args.layer:
                from ..view import ImageView

                position = opened.find_layer(args.layer)
                view = ImageView([await opened.layer_view(position, cache_dir)], cache=cache)
                digests = [opened.layers[position].digest]
            else:
                view = await opened.view(cache_dir=cache_dir, cache=cache)
                digests = [layer.digest for layer in opened.layers]
            await serve(
                view,
                args.mountpoint,
                allow_other=args.allow_other,
                prefetch=not args.no_prefetch,
                background_fetch=args.background_fetch,
                record_access=args.record_access,
                ready=lambda: _ready(args),
                trace_file=trace_file(cache_dir, digests),
            )
    except StargzfsError as e:
        _report(f"{e.exit_code} {e}")
        raise
    except BaseException as e:
        _report(f"1 {type(e).__name__}: {e}")
        raise
    return 0


def _unescape_mountinfo(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo`` (octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mount_at(path: str) -> tuple[str, str] | None:
    """``(fstype, source)`` of the topmost mount exactly at ``path``, or None. Read from
    ``/proc/self/mountinfo``: a dead FUSE mount fails every ``stat`` with ENOTCONN."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) >= 5 and len(tail) >= 2 and _unescape_mountinfo(fields[4]) == path:
                found = (tail[0], _unescape_mountinfo(tail[1]))
    return found


def is_stargzfs_mount(fstype: str, source: str) -> bool:
    # The daemon mounts with fsname=stargzfs,subtype=stargzfs (fuse/daemon.py).
    return fstype == "fuse.stargzfs" or (fstype.startswith("fuse") and source == "stargzfs")


def cmd_umount(args: argparse.Namespace) -> int:
    mnt = os.path.realpath(args.mountpoint)
    found = mount_at(mnt)
    if found is None:
        raise NotFoundError(f"{args.mountpoint}: not mounted (nothing to unmount)")
    fstype, source = found
    if not is_stargzfs_mount(fstype, source) and not args.force:
        raise UsageError(
            f"{args.mountpoint}: not a stargzfs mount ({fstype} from {source}); "
            "use --force to unmount it anyway"
        )
    daemon = _daemon_pid(mnt) if is_stargzfs_mount(fstype, source) else None
    fusermount = shutil.which("fusermount3") or "fusermount3"
    # Busy for a moment is the daemon's own warm-up reading through the mount (right after
    # a mount): worth a few retries before detaching lazily.
    retry_until = time.monotonic() + (BUSY_RETRY_SECONDS if daemon is not None else 0)
    while True:
        result = subprocess.run(
            [fusermount, "-u", mnt], capture_output=True, text=True, check=False
        )
        if mount_at(mnt) is None:  # unmounted (by us, or just now by auto_unmount's helper)
            if daemon is not None:
                _wait_for_exit(daemon)
            return 0
        if time.monotonic() >= retry_until or "busy" not in result.stderr.lower():
            break
        time.sleep(0.05)
    # Busy (an open file, a process's cwd): detach it now, it goes when they let go.
    lazy = subprocess.run([fusermount, "-uz", mnt], capture_output=True, text=True, check=False)
    if lazy.returncode == 0 and mount_at(mnt) is None:
        print(
            f"stargzfs: {args.mountpoint} was busy ({result.stderr.strip() or 'in use'}): "
            "detached lazily; the daemon keeps serving files already open until they are "
            "closed",
            file=sys.stderr,
        )
        return 0
    why = (lazy.stderr or result.stderr).strip() or "fusermount3 failed"
    raise StargzfsError(f"{args.mountpoint}: could not unmount: {why}")


def _daemon_pid(mnt: str, timeout: float = 2.0) -> tuple[int, int] | None:
    """The serving daemon's (pid, start time) from its stats, or None: a dead mount
    (ENOTCONN), a daemon that does not answer, another program. Asked by a forked child,
    killed if it gets no answer: a thread stuck in that getxattr would keep the mount busy."""
    import select

    read_fd, write_fd = os.pipe()
    child = os.fork()  # (the CLI has no other thread)
    if child == 0:
        try:
            os.close(read_fd)
            raw = os.getxattr(mnt, STATS_XATTR)
            while raw:
                raw = raw[os.write(write_fd, raw) :]
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_fd], [], [], left)[0]:
                chunks = []  # no answer in time
                break
            data = os.read(read_fd, 1 << 16)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(read_fd)
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)
        # Reaped if it goes; one the kernel keeps waiting on the daemon (a request it had
        # already read) is left to init rather than waited for.
        until = time.monotonic() + 0.5
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(child, os.WNOHANG) == (0, 0) and time.monotonic() < until:
                time.sleep(0.01)
    return pid_from_stats(b"".join(chunks))


def pid_from_stats(raw: bytes) -> tuple[int, int] | None:
    """(pid, start time) from the stats a daemon reports, or None if they hold none."""
    import json

    try:
        stats = json.loads(raw)
        pid, start = stats["pid"], stats["pid_start"]
    except Exception:  # not ours, an older daemon, garbage
        return None
    if type(pid) is int and type(start) is int and pid > 0:
        return pid, start
    return None


def _wait_for_exit(daemon: tuple[int, int], timeout: float = 5.0) -> None:
    """Once unmounted, the daemon saves what the next mount reuses (its lookup trace) and
    exits: `umount` returns after that, as `docker stop` does. ``daemon`` is (pid, start
    time): a pid of another process (reused, or from another pid namespace) is not waited
    for."""
    pid, start = daemon
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = process_state(pid)
        if state is None or state[1] != start or state[0] == "Z":
            return  # gone, another process, or exited and not reaped yet
        time.sleep(0.01)
    log.info("the daemon (pid %d) was still running %.0f s after the unmount", pid, timeout)


def cmd_stats(args: argparse.Namespace) -> int:
    import json

    try:
        raw = os.getxattr(args.mountpoint, STATS_XATTR)
    except OSError as e:
        raise UsageError(f"{args.mountpoint}: not a stargzfs mount ({e.strerror})") from None
    stats = json.loads(raw)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(
        f"{'LAYER':<28} {'FORMAT':<13} {'SIZE':>12} {'FETCHED':>12} {'%':>6} {'REQS':>6}  "
        f"{'PREFETCH':<18} BACKGROUND"
    )
    for layer in stats["layers"]:
        fetched = layer["bytes_fetched"]
        frac = layer["fetched_fraction"]
        print(
            f"{layer['name'][:28]:<28} {layer['format']:<13} {layer['size']:>12} "
            f"{'-' if fetched is None else fetched:>12} "
            f"{'-' if frac is None else f'{frac * 100:.1f}':>6} "
            f"{'-' if layer['requests'] is None else layer['requests']:>6}  "
            f"{layer['prefetch']:<18} {layer.get('background_fetch', 'none')}"
        )
    cache = stats["cache"]
    print(
        f"cache: {cache['memory_hits']} memory hits, {cache['disk_hits']} disk hits, "
        f"{cache['misses']} misses, {cache['stored']} stored, {cache['corrupt']} corrupt"
    )
    requests: dict[str, int] = stats.get("fuse_requests") or {}
    ranked = sorted(requests.items(), key=lambda kv: (-kv[1], kv[0]))
    how = "" if stats.get("kernel_open") else " (file handles: pyfuse3 without stargzfs's patch)"
    print(f"kernel requests{how}: " + (", ".join(f"{n} {op}" for op, n in ranked) or "none"))
    trace = stats.get("lookup_trace")
    if trace:
        print(
            f"lookup trace: {trace['replayed']} names of the last mount asked before ready, "
            f"{trace['recorded']} recorded by this one"
        )
    return 0
