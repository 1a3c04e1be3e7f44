"""The pull's apply child (stargzfs.pull.apply_process): layers applied from fds of files that
may still be growing, errors and log records carried back as themselves, and a kill that
stops it at once."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stargzfs.errors import StargzfsError, UnsafePathError
from stargzfs.pull.apply_process import LayerApplyProcess


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _children() -> list[int]:
    """Our live apply children (by /proc: the test must see them gone)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == os.getpid() and b"apply_process" in cmd and state != "Z":
            found.append(int(pid))
    return found


@contextlib.contextmanager
def _child(root: Path) -> Iterator[LayerApplyProcess]:
    """An apply child told to apply onto ``root``; closed at the end."""
    proc = LayerApplyProcess()
    try:
        proc.set_root(root)
        yield proc
    finally:
        proc.close()


def _apply(proc: LayerApplyProcess, path: Path, layer: bytes) -> str:
    """Write the uncompressed ``layer`` to ``path`` and apply it as layer 0."""
    path.write_bytes(layer)
    fd = os.open(path, os.O_RDONLY)
    try:
        return proc.apply(fd, len(layer), "none", "layer 0")
    finally:
        os.close(fd)


def test_layers_from_growing_files(tmp_path: Path) -> None:
    lower = _tar({"etc/a": b"lower\n", "etc/gone": b"x"})
    upper_files = {"etc/.wh.gone": b"", "big": os.urandom(3 << 20)}
    upper = gzip.compress(_tar(upper_files), 1)
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "lower.tar").write_bytes(lower)
    growing = tmp_path / "upper.tar.gz"
    growing.write_bytes(upper[:1000])

    def write_rest() -> None:  # the "download" goes on while the child reads
        time.sleep(0.3)
        with open(growing, "ab") as f:
            for i in range(1000, len(upper), 65536):
                f.write(upper[i : i + 65536])
                f.flush()
                time.sleep(0.002)

    proc = LayerApplyProcess()
    try:
        proc.set_root(root)
        fd = os.open(tmp_path / "lower.tar", os.O_RDONLY)
        assert proc.apply(fd, len(lower), "none", "layer 0") == (
            "sha256:" + hashlib.sha256(lower).hexdigest()
        )
        os.close(fd)
        writer = threading.Thread(target=write_rest)
        writer.start()
        fd = os.open(growing, os.O_RDONLY)
        diff_id = proc.apply(fd, len(upper), "gzip", "layer 1")
        os.close(fd)
        writer.join()
        assert diff_id == "sha256:" + hashlib.sha256(gzip.decompress(upper)).hexdigest()
        stats = proc.finish()
    finally:
        proc.close()
    assert stats["files"] == 3
    assert (root / "etc/a").read_bytes() == b"lower\n"
    assert not (root / "etc/gone").exists()
    assert (root / "big").read_bytes() == upper_files["big"]
    assert _children() == []


def test_errors_come_back_as_their_class(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    with (
        _child(tmp_path / "root") as proc,
        pytest.raises(UnsafePathError, match=r"layer 0.*\.\./escape"),
    ):
        _apply(proc, tmp_path / "evil.tar", _tar({"../escape": b"x"}))
    assert not (tmp_path / "escape").exists()
    assert _children() == []


def test_log_records_reach_the_parent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "root").mkdir()
    with _child(tmp_path / "root") as proc:
        with caplog.at_level(logging.WARNING):
            _apply(proc, tmp_path / "l.tar", _tar({"/abs": b"x"}))
        proc.finish()
    assert (tmp_path / "root/abs").read_bytes() == b"x"
    assert any("leading '/'" in r.getMessage() for r in caplog.records)


def test_kill_stops_a_child_waiting_for_bytes(tmp_path: Path) -> None:
    blob = gzip.compress(_tar({"f": os.urandom(1 << 20)}))
    growing = tmp_path / "partial"
    growing.write_bytes(blob[:100])  # the rest never arrives
    (tmp_path / "root").mkdir()
    proc = LayerApplyProcess()
    outcome: list[BaseException] = []

    def apply() -> None:
        fd = os.open(growing, os.O_RDONLY)
        try:
            proc.apply(fd, len(blob), "gzip", "layer 0")
        except BaseException as e:
            outcome.append(e)
        finally:
            os.close(fd)

    try:
        proc.set_root(tmp_path / "root")
        t = threading.Thread(target=apply)
        t.start()
        time.sleep(0.5)
        assert t.is_alive()  # following the file
        started = time.monotonic()
        proc.kill()
        t.join(5)
        assert not t.is_alive() and time.monotonic() - started < 2
    finally:
        proc.close()
    assert len(outcome) == 1 and isinstance(outcome[0], StargzfsError)
    assert "aborted" in str(outcome[0])
    assert _children() == []


def test_an_error_naming_a_huge_entry_still_comes_back(tmp_path: Path) -> None:
    """A hostile layer's entry name may be megabytes long: the error still arrives as itself
    (cut), not as a crashed child."""
    (tmp_path / "root").mkdir()
    with _child(tmp_path / "root") as proc, pytest.raises(UnsafePathError, match=r"\(cut\)$"):
        _apply(proc, tmp_path / "evil.tar", _tar({"../" + "x" * 2_000_000: b"x"}))


def test_a_child_whose_parent_died_before_it_started_stops(tmp_path: Path) -> None:
    """The parent queued a layer and was killed while the child was still importing: the
    child must notice (its parent pid comes from argv, not a late getppid()) and exit."""
    import subprocess
    import sys

    script = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from stargzfs.pull.apply_process import LayerApplyProcess
p = LayerApplyProcess()
open({str(tmp_path / "pid")!r}, "w").write(str(p._proc.pid))
os.makedirs({str(tmp_path / "root")!r}, exist_ok=True)
p.set_root({str(tmp_path / "root")!r})
with open({str(tmp_path / "partial")!r}, "wb") as f:
    f.write(b"x" * 100)
fd = os.open({str(tmp_path / "partial")!r}, os.O_RDONLY)
p._send({{"op": "layer", "what": "layer 0", "compression": "none", "size": 10**9}}, (fd,))
os._exit(0)  # dies at once, the child still importing
"""
    # (no pipes: an orphaned child would hold them open, and run() would wait forever)
    subprocess.run(
        [sys.executable, "-c", script],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
        timeout=60,
    )
    child = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, 9)
        pytest.fail("the orphaned apply child kept waiting for a parent that was gone")


def test_a_root_it_cannot_open_is_its_own_error(tmp_path: Path) -> None:
    """set_root() has no reply: when the child fails there and exits, the next call says why
    (not "exited unexpectedly")."""
    with _child(tmp_path / "missing") as proc:
        time.sleep(1.0)  # it has tried, replied and exited
        with pytest.raises(StargzfsError, match="missing"):
            _apply(proc, tmp_path / "l.tar", _tar({"a": b"x"}))
