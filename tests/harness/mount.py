"""Run a FUSE filesystem process for a test and never leave its mount behind.

``mounted(argv, mountpoint)`` starts ``argv`` (a daemon that mounts ``mountpoint`` and stays in
the foreground), waits until the mount appears, fails fast with the process's stderr if it dies
first, and at exit always:

1. ``fusermount3 -u MNT`` (clean unmount; the daemon's main loop then returns),
2. ``fusermount3 -uz MNT`` if the mount is still there (busy: lazy detach),
3. waits briefly for the process, then SIGTERM, then SIGKILL.

Mount state is read from ``/proc/self/mountinfo``, not ``os.path.ismount``: a dead daemon leaves
a mount whose ``lstat`` fails with ENOTCONN, which ``ismount`` reports as "not a mount".
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["MountError", "MountedProcess", "is_mounted", "mounted", "unmount"]

_POLL = 0.01


class MountError(RuntimeError):
    """The filesystem process exited or timed out before its mount appeared."""


def _unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo`` (octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mount_entries() -> list[tuple[str, str]]:
    """``(mountpoint, fstype)`` of every mount visible to this process."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            if len(parts) >= 5 and right:
                entries.append((_unescape(parts[4]), right.split()[0]))
    return entries


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """True if something is mounted exactly at ``mountpoint`` (even a dead FUSE mount)."""
    target = os.path.realpath(os.fspath(mountpoint))
    return any(mp == target for mp, _ in mount_entries())


def unmount(mountpoint: str | os.PathLike[str], timeout: float = 10.0) -> str | None:
    """Unmount ``mountpoint`` if mounted: ``fusermount3 -u``, then ``fusermount3 -uz`` (lazy)
    if that failed (busy), then ``umount -l`` for non-FUSE leftovers. Returns the command
    that did it (``"-u"``, ``"-uz"``, ``"umount -l"``) or None if nothing was mounted; raises
    if the mount is still there."""
    mnt = os.path.realpath(os.fspath(mountpoint))
    fusermount = shutil.which("fusermount3") or "fusermount3"
    attempts = {
        "-u": [fusermount, "-u", mnt],
        "-uz": [fusermount, "-uz", mnt],
        "umount -l": ["umount", "-l", mnt],
    }
    if not is_mounted(mnt):
        return None
    for how, cmd in attempts.items():
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        if not is_mounted(mnt):
            return how
    raise RuntimeError(f"could not unmount {mnt}")


@dataclass
class MountedProcess:
    """A filesystem daemon started by :func:`mounted`."""

    argv: list[str]
    mountpoint: Path
    proc: subprocess.Popen[bytes]
    _stderr: IO[bytes] = field(repr=False)
    _stdout: IO[bytes] = field(repr=False)
    #: How the teardown unmounted it: "-u", "-uz", "umount -l", or None (was not mounted).
    unmounted_by: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_text(self) -> str:
        self._stderr.flush()
        return Path(self._stderr.name).read_text(errors="replace")

    def stdout_text(self) -> str:
        self._stdout.flush()
        return Path(self._stdout.name).read_text(errors="replace")

    def is_mounted(self) -> bool:
        return is_mounted(self.mountpoint)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the daemon (tests simulating a crash). The teardown still cleans up."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, grace: float = 5.0) -> int:
        """Unmount, give the daemon ``grace`` seconds to exit on its own, then SIGTERM (5 s),
        then SIGKILL. Idempotent; returns the process's exit status."""
        try:
            how = unmount(self.mountpoint)
            if how is not None:
                self.unmounted_by = how
            if how not in (None, "-u"):
                # Lazily detached: the daemon keeps serving open files, it will not exit.
                grace = 0.0
        finally:
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            for f in (self._stderr, self._stdout):
                f.close()
                with contextlib.suppress(OSError):
                    os.unlink(f.name)
        return self.proc.returncode


@contextlib.contextmanager
def mounted(
    argv: Sequence[str | os.PathLike[str]],
    mountpoint: str | os.PathLike[str],
    timeout: float = 15.0,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Iterator[MountedProcess]:
    """Start ``argv`` and yield once ``mountpoint`` is mounted; always unmount and reap."""
    mnt = Path(os.path.realpath(os.fspath(mountpoint)))
    if is_mounted(mnt):
        raise MountError(f"{mnt} is already a mount point")
    stderr = tempfile.NamedTemporaryFile(prefix="fs-stderr-", delete=False)  # noqa: SIM115
    stdout = tempfile.NamedTemporaryFile(prefix="fs-stdout-", delete=False)  # noqa: SIM115
    args = [os.fspath(a) for a in argv]
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=None if env is None else dict(env),
            cwd=cwd,
        )
    except BaseException:
        for f in (stderr, stdout):
            f.close()
            os.unlink(f.name)
        raise
    mp = MountedProcess(list(args), mnt, proc, stderr, stdout)
    up = False
    try:
        deadline = time.monotonic() + timeout
        while not is_mounted(mnt):
            if proc.poll() is not None:
                raise MountError(
                    f"{args[0]} exited with {proc.returncode} before mounting {mnt}:\n"
                    f"{mp.stderr_text()}"
                )
            if time.monotonic() > deadline:
                raise MountError(
                    f"{mnt} not mounted after {timeout}s by {args[0]}:\n{mp.stderr_text()}"
                )
            time.sleep(_POLL)
        up = True
        yield mp
    finally:
        # A daemon that never mounted gets no grace period: it is stuck or already gone.
        mp.stop(grace=5.0 if up else 0.0)
