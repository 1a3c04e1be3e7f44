"""Mount lifecycle: mount an :class:`~stargzfs.view.ImageView`, serve it until told to stop,
always unmount. Runs inside ``trio.run``.

What ``shared/fuse-notes.md`` measured drives the choices here: ``auto_unmount`` so that even
SIGKILL leaves no dead mount behind; SIGTERM/SIGINT call ``pyfuse3.terminate()``;
``pyfuse3.close()`` always runs; read-ahead is raised through sysfs after mounting because
pyfuse3 cannot pass ``max_readahead``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import stat
import time
from collections.abc import Callable, Iterator

import pyfuse3
import trio

from ..index import Node
from ..view import ImageView
from .lookup_trace import (
    LookupTrace,
    list_directory,
    load_trace,
    replay,
    save_trace,
    usable_entries,
)
from .operations import STATS_XATTR, ImageOperations

__all__ = ["serve"]

log = logging.getLogger(__name__)

READ_AHEAD_KB = 1024
MAX_TASKS = 128  # handlers awaiting the network overlap up to this many
# On a warm remount, how long "ready" may wait for the prioritized files to be warmed up.
READY_WARM_BUDGET = 0.5
# ... of which the replay of the last mount's lookup trace may take this much: a trace can
# hold a whole `find` (a listing of every directory), far more than a program's start-up.
READY_REPLAY_BUDGET = 0.1
REPLAY_BATCH = 64


def mount_options(*, allow_other: bool = False) -> set[str]:
    options = set(pyfuse3.default_options)
    options |= {"fsname=stargzfs", "subtype=stargzfs", "ro", "auto_unmount"}
    if allow_other:
        options.add("allow_other")
    return options


def _raise_read_ahead(mountpoint: str) -> None:
    """Larger kernel read-ahead roughly doubles cold sequential reads (fuse-notes.md)."""
    try:
        dev = os.stat(mountpoint).st_dev
        path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as e:
        log.debug("could not raise read-ahead: %s", e)


async def serve(
    view: ImageView,
    mountpoint: str,
    *,
    allow_other: bool = False,
    prefetch: bool = True,
    background_fetch: bool = False,
    record_access: str | None = None,
    ready: Callable[[], None] | None = None,
    kernel_open: bool = True,
    trace_file: str | None = None,
) -> None:
    """Mount ``view`` at ``mountpoint`` and serve until SIGTERM/SIGINT or an unmount.

    ``kernel_open``: let the kernel open files and directories itself where the patched
    pyfuse3 is installed (see operations.py); False serves file handles as with a stock one.
    ``trace_file``: where this image's lookup trace is kept (see lookup_trace.py): a warm
    remount asks the kernel what the last mount was asked before it is ready, and this
    mount's requests are saved there when it ends."""
    trace = LookupTrace(trace_file) if trace_file else None
    ops = ImageOperations(view, record_access=record_access, kernel_open=kernel_open, trace=trace)
    pyfuse3.init(ops, mountpoint, mount_options(allow_other=allow_other))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            # stat() of the mount point is a FUSE request: it must not run before main().
            nursery.start_soon(trio.to_thread.run_sync, _raise_read_ahead, mountpoint)
            # Open the disk cache's index (and drop dead writers' temp files) off the loop.
            nursery.start_soon(trio.to_thread.run_sync, view.cache.scan)
            # Warming the kernel reads through the mount: that would record accesses.
            warm = mountpoint if record_access is None else None
            nursery.start_soon(
                _start, view, prefetch, background_fetch, warm, ready, nursery, trace
            )
            await pyfuse3.main(min_tasks=1, max_tasks=MAX_TASKS)
            # Unmounted: saved at once, before the background work is torn down (threads
            # that cannot be abandoned may take a while), so `umount` need not wait long.
            if trace is not None:
                _save(trace, view)
            nursery.cancel_scope.cancel()
    finally:
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)


def _save(trace: LookupTrace, view: ImageView) -> None:
    if not len(trace) or trace.file is None:
        return
    try:
        save_trace(trace.file, trace.entries(view.tree))
    except Exception as e:  # only costs the next mount speed
        log.warning("could not save the lookup trace %s: %s", trace.file, e)


async def _start(
    view: ImageView,
    prefetch: bool,
    background_fetch: bool,
    warm: str | None,
    ready: Callable[[], None] | None,
    nursery: trio.Nursery,
    trace: LookupTrace | None = None,
) -> None:
    """Say the mount is ready and start each layer's background work.

    On a remount whose prioritized files are all in the disk cache (or that has none), they
    are first loaded into memory and read once through the mount, and then the names the
    last mount of the image was asked (``trace``'s file) are asked again (together at most
    ``READY_WARM_BUDGET`` seconds, the names at most ``READY_REPLAY_BUDGET``): no registry
    request is needed, and the workload then starts at page-cache speed with its names,
    missing ones included, in the kernel's caches, instead of racing the warm-up. Otherwise
    ready comes at once and the prefetch follows in the background, on-demand reads first."""
    layers = range(len(view.layers))
    local = prefetch and warm is not None
    try:
        for position in layers:  # stops at the first layer that needs the network
            local = local and await view.prefetch_is_cached(position)
    except Exception as e:  # only costs speed
        log.debug("checking the prefetch cache: %s", e)
        local = False
    warmed: set[int] = set()
    if local:

        async def warm_one(position: int) -> None:
            await _fetch_layer(view, position, True, False, warm)
            warmed.add(position)

        with trio.move_on_after(READY_WARM_BUDGET) as budget:
            async with trio.open_nursery() as warming:
                for position in layers:
                    warming.start_soon(warm_one, position)
            # After the files: beside their reads each name took ~10x longer (the loop is
            # busy serving them).
            if trace is not None and trace.file and warm is not None:
                until = min(budget.deadline, trio.current_time() + READY_REPLAY_BUDGET)
                with trio.move_on_at(until):
                    await _replay(view, warm, trace, until)
    if ready is not None:
        ready()
    for position in layers:
        if position in warmed:
            if background_fetch:
                nursery.start_soon(_fetch_layer, view, position, False, True)
        else:  # not local, or the budget ran out first: in the background, as usual
            nursery.start_soon(_fetch_layer, view, position, prefetch, background_fetch, warm)


async def _fetch_layer(
    view: ImageView, position: int, prefetch: bool, rest: bool, warm: str | None = None
) -> None:
    """Background work for one layer: its prioritized files first (one request), then, with
    --background-fetch, everything else. Failures only cost speed: reads fetch on demand.
    With ``warm`` (the mount point), the prioritized files are then read once through the
    mount, so that their names, attributes and pages are in the kernel's caches before the
    workload they were recorded from asks for them."""
    name = view.layers[position].name
    try:
        if prefetch:
            count = await view.prefetch(position)
            log.info("prefetched %d chunks of %s", count, name)
            if warm is not None:
                paths = await trio.to_thread.run_sync(view.prioritized_paths, position)
                # Only what the merged tree has as a regular file at that path (an upper
                # layer may have put a symlink or a directory there).
                paths = [p for p in paths if _is_regular(view, p)]
                done = await trio.to_thread.run_sync(
                    _warm_files, warm, paths, abandon_on_cancel=True, limiter=_own_limiter(_WARM)
                )
                log.info("%s: %d prioritized files in the kernel's caches", name, done)
        if rest:
            count = await view.background_fetch(position)
            log.info("fetched the remaining %d chunks of %s", count, name)
    except Exception as e:
        log.warning("background fetch of %s failed: %s", name, e)


async def _replay(view: ImageView, mountpoint: str, trace: LookupTrace, deadline: float) -> None:
    """Replay the last mount's trace until ``deadline`` (trio's clock), a batch at a time:
    each is checked against the tree on the loop (where the tree is used), then asked from
    a thread (the loop answers) that opens and closes the mount's root itself, so a thread
    abandoned at the deadline holds nothing that keeps the mount busy. A long trace costs
    only the part replayed; a broken one only a log line."""
    started = trio.current_time()
    entries: list[tuple[str, str]] = []
    progress = [0]  # entries asked, counted by the replay threads
    trace.replaying = True
    try:
        file = trace.file or ""
        entries = await trio.to_thread.run_sync(load_trace, file, abandon_on_cancel=True)
        # Names first (a round trip each), listings after (many entries each), both in the
        # order they were first asked: a program's start-up comes before what ran later.
        ordered = sorted(entries, key=lambda entry: entry[0] == "readdir")
        dirs: dict[tuple[int, str], Node | None] = {}
        for start in range(0, len(ordered), REPLAY_BATCH):
            if trio.current_time() >= deadline:
                break
            batch = usable_entries(view.tree, ordered[start : start + REPLAY_BATCH], dirs)
            # The thread stops by itself at the deadline too, between entries.
            until = time.monotonic() + (deadline - trio.current_time())
            await trio.to_thread.run_sync(
                _replay_batch,
                mountpoint,
                batch,
                until,
                progress,
                abandon_on_cancel=True,
                limiter=_own_limiter(_REPLAY),
            )
    except Exception as e:  # only costs speed
        log.warning("replaying the lookup trace %s: %s", trace.file, e)
    finally:
        trace.replaying = False
        trace.replayed = progress[0]  # (a thread abandoned at the deadline counted too)
        if entries:
            log.info(
                "asked the kernel %d of the %d names the last mount was asked (%.0f ms)",
                trace.replayed,
                len(entries),
                (trio.current_time() - started) * 1000,
            )


def _replay_batch(
    mountpoint: str, batch: list[tuple[str, str]], until: float, progress: list[int]
) -> None:
    with _mount_root(mountpoint) as root:
        if root is not None:
            replay(root, batch, until, progress)


@contextlib.contextmanager
def _mount_root(mountpoint: str) -> Iterator[int | None]:
    """:func:`open_mount_root`, closed on the way out (None: unmounted meanwhile, or
    something else is mounted there now)."""
    root = open_mount_root(mountpoint)
    try:
        yield root
    finally:
        if root is not None:
            os.close(root)


def open_mount_root(mountpoint: str) -> int | None:
    """An O_PATH descriptor of this daemon's own mount root, or None: what goes through the
    mount goes through this, relative to it, so nothing reaches the directory underneath,
    or another filesystem mounted there, if the mount goes away meanwhile. Ours is the one
    whose stats xattr names this process."""
    try:
        fd = os.open(mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.getxattr(f"/proc/self/fd/{fd}", os.fsdecode(STATS_XATTR))
        if json.loads(raw).get("pid") == os.getpid():
            return fd
    except (OSError, ValueError, AttributeError):
        pass
    os.close(fd)
    return None


def _own_limiter(var: trio.lowlevel.RunVar[trio.CapacityLimiter]) -> trio.CapacityLimiter:
    """One thread at a time, per trio run. Not the default limiter's threads: threads going
    through the mount wait on handlers that need those (disk cache, inflate)."""
    try:
        return var.get()
    except LookupError:
        limiter = trio.CapacityLimiter(1)
        var.set(limiter)
        return limiter


_WARM: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("stargzfs.warm")
_REPLAY: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("stargzfs.replay")


def _is_regular(view: ImageView, path: str) -> bool:
    node = view.tree.resolve(path)
    return node is not None and node.entry.kind == "reg"


def _warm_files(mountpoint: str, paths: list[str]) -> int:
    with _mount_root(mountpoint) as root:
        return 0 if root is None else _read_through(root, paths)


def _read_through(root: int, paths: list[str]) -> int:
    """Read each file once through the mount whose root directory descriptor is ``root``
    (a worker thread: the event loop serves it). Never follows a symlink named last (their
    parents are the tree's directories) and reads nothing but regular files, whatever the
    image holds."""
    done = 0
    # Their directories listed first: readdir answers with attributes, so every sibling's
    # name and attributes land in the kernel's caches too (the import system and the
    # dynamic loader stat and list their way to the files they then read).
    listed: set[str] = set()
    for path in paths:
        parent = os.path.dirname(path)
        while parent not in listed:
            listed.add(parent)
            try:
                list_directory(root, parent)
            except OSError as e:
                log.debug("warming %s/: %s", parent, e)
            if not parent:
                break
            parent = os.path.dirname(parent)
    for path in paths:
        try:
            fd = os.open(
                path,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=root,
            )
        except OSError as e:  # unmounted meanwhile, EIO...
            log.debug("warming %s: %s", path, e)
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            while os.read(fd, 1 << 20):
                pass
            done += 1
        except OSError as e:
            log.debug("warming %s: %s", path, e)
        finally:
            os.close(fd)
    return done


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return
