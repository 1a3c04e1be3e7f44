"""``optimize``: learn which files a workload reads first, then rebuild the image with those
files prioritized (what ``ctr-remote image optimize`` does, without containerd).

The image is mounted lazily with access recording, the command runs chrooted into the mount
(as root, with /proc, /dev and /sys bind-mounted where the image has those directories) for
at most ``period`` seconds, and the recorded paths, in first-access order, become the
``prioritized`` list of an eStargz conversion.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import StargzfsError, UnsupportedError, UsageError

__all__ = ["record_accesses"]

log = logging.getLogger(__name__)

_BIND_DIRS = ("proc", "dev", "sys")


def record_accesses(
    ref: str,
    command: Sequence[str],
    *,
    period: float = 10.0,
    cache_dir: str | None = None,
    extra_mount_args: Sequence[str] = (),
) -> list[str]:
    """Mount ``ref``, run ``command`` chrooted into it for up to ``period`` seconds, and
    return the image paths it read, in first-access order. Blocking: run it in a thread."""
    if not command:
        raise UsageError("optimize needs a command to run inside the image (after --)")
    if os.geteuid() != 0:
        raise UnsupportedError("optimize runs the command with chroot: it needs root")
    with tempfile.TemporaryDirectory(prefix="stargzfs-optimize-") as tmp:
        mnt = Path(tmp, "mnt")
        mnt.mkdir()
        record = Path(tmp, "access.txt")
        argv = [sys.executable, "-m", "stargzfs", "mount", ref, str(mnt)]
        argv += ["--record-access", str(record), "--no-prefetch", *extra_mount_args]
        argv += ["--cache-dir", cache_dir or str(Path(tmp, "cache"))]
        started = subprocess.run(argv, capture_output=True, text=True)
        if started.returncode != 0:
            message = started.stderr.strip().removeprefix("stargzfs: error: ")
            error = StargzfsError(f"mounting {ref} for optimize failed: {message}")
            error.exit_code = started.returncode
            raise error
        binds: list[Path] = []
        try:
            for name in _BIND_DIRS:
                target = mnt / name
                if target.is_dir() and not target.is_symlink():
                    kind = ["-t", "proc", "proc"] if name == "proc" else ["--rbind", f"/{name}"]
                    if subprocess.run(["mount", *kind, str(target)], check=False).returncode == 0:
                        binds.append(target)
            _run_for(["chroot", str(mnt), *command], period)
        finally:
            for target in reversed(binds):
                subprocess.run(["umount", "-l", str(target)], check=False)
            subprocess.run([sys.executable, "-m", "stargzfs", "umount", str(mnt)], check=False)
        return record.read_text().splitlines() if record.exists() else []


def _run_for(argv: list[str], period: float) -> None:
    """Run the workload; stopping it when the period is over is the normal case."""
    proc = subprocess.Popen(argv, start_new_session=True)
    deadline = time.monotonic() + period
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        log.info("period of %.1f s over: stopping the command", period)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    elif proc.returncode != 0:
        log.warning("the command exited with %d (its accesses are used anyway)", proc.returncode)
