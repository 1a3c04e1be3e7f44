"""What /proc says about a process (the mount daemon and `umount` use it)."""

from __future__ import annotations

__all__ = ["process_state"]


def process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from /proc/PID/stat, or None.
    The pid and start time together name one process, whatever pid reuse or namespace."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return fields[0].decode(), int(fields[19])  # fields 3 and 22 of proc(5)
    except (OSError, IndexError, ValueError):
        return None
