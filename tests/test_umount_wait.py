"""`stargzfs umount` waits for the daemon it unmounted to exit (it saves its lookup trace on
the way out), but only for that very process, and never for long."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from stargzfs.cli.mount_cmds import _wait_for_exit, pid_from_stats, process_state


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (json.dumps({"pid": 42, "pid_start": 7, "layers": []}).encode(), (42, 7)),
        (b"", None),
        (b"garbage", None),
        (b"[1, 2]", None),
        (b'"text"', None),
        (json.dumps({"pid": 42}).encode(), None),  # an older daemon: not waited for
        (json.dumps({"pid": True, "pid_start": 7}).encode(), None),
        (json.dumps({"pid": -1, "pid_start": 7}).encode(), None),
        (json.dumps({"pid": "42", "pid_start": 7}).encode(), None),
    ],
)
def test_pid_from_stats(raw: bytes, want: tuple[int, int] | None) -> None:
    assert pid_from_stats(raw) == want


def test_waits_until_the_process_exits_and_no_longer() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    try:
        state = process_state(proc.pid)
        assert state is not None and state[0] != "Z"  # (R, S, or D while it starts)
        started = time.monotonic()
        _wait_for_exit((proc.pid, state[1]), timeout=10)
        assert 0.1 < time.monotonic() - started < 5  # a zombie (not reaped yet) has exited
        assert process_state(proc.pid) is not None  # still a zombie: nobody reaped it
    finally:
        proc.wait()
    assert process_state(proc.pid) is None
    started = time.monotonic()
    _wait_for_exit((proc.pid, state[1]), timeout=10)  # gone: at once
    assert time.monotonic() - started < 1


def test_another_process_with_that_pid_is_not_waited_for() -> None:
    """A reused pid, or one from another pid namespace: its start time differs."""
    own = process_state(os.getpid())
    assert own is not None
    started = time.monotonic()
    _wait_for_exit((os.getpid(), own[1] + 1), timeout=10)
    assert time.monotonic() - started < 1
    _wait_for_exit((os.getpid(), own[1]), timeout=0.2)  # this one never exits: gives up
    assert time.monotonic() - started >= 0.2


def test_the_cli_asks_the_xattr_the_daemon_answers() -> None:
    from stargzfs.cli import mount_cmds
    from stargzfs.fuse import operations

    assert os.fsencode(mount_cmds.STATS_XATTR) == operations.STATS_XATTR
