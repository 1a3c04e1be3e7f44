"""`stargzfs mount` / `umount` end to end: real registry, real FUSE, daemonized."""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from harness import Registry
from harness.mount import is_mounted, unmount
from harness.oci import estargz_layer, make_tar, write_oci_layout
from harness.proxy import RegistryProxy
from layer_helpers import FIXTURES
from test_fuse_view import check_tree

pytestmark = [pytest.mark.fuse, pytest.mark.registry]


def stargzfs(
    *args: str, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stargzfs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def wait_for_line(path: Path, text: str, timeout: float = 10) -> str:
    """The first line of the file at ``path`` containing ``text`` (waits for it)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        found = [line for line in lines if text in line]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no line with {text!r} in {path}: {lines}"
        time.sleep(0.05)


def daemon_pids(mnt: Path) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-f", f"stargzfs mount .* {mnt}"], capture_output=True, text=True
    )
    return [int(p) for p in out.stdout.split()]


@pytest.fixture
def mnt(tmp_path: Path, fuse_available: None) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    try:
        yield path
    finally:
        unmount(path)
        for pid in daemon_pids(path):
            os.kill(pid, signal.SIGKILL)


def test_mount_merged_image_from_registry(fixture_image: str, mnt: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    log = tmp_path / "daemon.log"
    result = stargzfs(
        "mount",
        fixture_image,
        str(mnt),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--log-file",
        str(log),
    )
    assert result.returncode == 0, result.stderr
    assert is_mounted(mnt)
    ready = time.monotonic() - started
    exp = json.loads((FIXTURES / "whiteout-merged.json").read_text())
    check_tree(mnt, exp, dir_nlink=True)
    (mnt / "usr/lib/libdemo.so.1").read_bytes()
    stats = stargzfs("stats", str(mnt), "--json")
    assert stats.returncode == 0, stats.stderr
    layers = json.loads(stats.stdout)["layers"]
    assert len(layers) == 2 and layers[0]["bytes_fetched"] > 0
    table = stargzfs("stats", str(mnt))
    assert "cache:" in table.stdout and table.returncode == 0
    # what the kernel still asks the daemon (check_tree listed and looked up everything)
    assert "kernel requests: " in table.stdout and " readdir" in table.stdout
    assert "lookup trace: 0 names of the last mount asked before ready" in table.stdout
    assert stargzfs("stats", str(tmp_path)).returncode == 2
    assert stargzfs("umount", str(mnt)).returncode == 0
    assert not is_mounted(mnt)
    print(f"mount ready in {ready:.2f} s")


def test_failed_mount_exits_nonzero_and_leaves_nothing(
    registry: Registry, mnt: Path, tmp_path: Path
) -> None:
    result = stargzfs(
        "mount", f"{registry.host}/no/such:image", str(mnt), "--cache-dir", str(tmp_path)
    )
    assert result.returncode == 4, result.stderr
    assert "error" in result.stderr and "Traceback" not in result.stderr
    assert not is_mounted(mnt)
    assert stargzfs("mount", "UPPER/Case:bad", str(mnt)).returncode == 2


def test_kill_9_then_umount_and_remount(fixture_image: str, mnt: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    assert stargzfs("mount", fixture_image, str(mnt), "--cache-dir", cache).returncode == 0
    (mnt / "etc/passwd").read_bytes()
    for pid in daemon_pids(mnt):
        os.kill(pid, signal.SIGKILL)
    # auto_unmount's helper notices the dead daemon and unmounts: nothing left to do.
    deadline = time.monotonic() + 5
    while is_mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not is_mounted(mnt)
    result = stargzfs("umount", str(mnt))
    assert result.returncode == 4 and "not mounted" in result.stderr, result.stderr
    result = stargzfs("mount", fixture_image, str(mnt), "--cache-dir", cache)
    assert result.returncode == 0, result.stderr
    assert (mnt / "etc/passwd").read_bytes()


def helper_pids(mnt: Path) -> list[int]:
    """The auto_unmount helper (fusermount3) of a mount."""
    pattern = f"fusermount3 .*-- {mnt}$"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_dead_mount_without_its_helper_is_cleared_by_umount(
    fixture_image: str, mnt: Path, tmp_path: Path
) -> None:
    cache = str(tmp_path / "cache")
    assert stargzfs("mount", fixture_image, str(mnt), "--cache-dir", cache).returncode == 0
    helpers, daemons = helper_pids(mnt), daemon_pids(mnt)
    assert len(helpers) == 1 and len(daemons) == 1
    os.kill(helpers[0], signal.SIGKILL)  # no auto_unmount any more
    os.kill(daemons[0], signal.SIGKILL)
    time.sleep(0.3)
    assert is_mounted(mnt)  # a dead mount: every access is ENOTCONN
    with pytest.raises(OSError) as info:
        os.listdir(mnt)
    assert info.value.errno == errno.ENOTCONN
    result = stargzfs("umount", str(mnt))
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mnt)
    assert stargzfs("mount", fixture_image, str(mnt), "--cache-dir", cache).returncode == 0
    assert (mnt / "etc/passwd").read_bytes()


def test_umount_of_nothing_says_not_mounted(tmp_path: Path) -> None:
    result = stargzfs("umount", str(tmp_path))
    assert result.returncode == 4
    assert result.stderr.strip() == f"stargzfs: error: {tmp_path}: not mounted (nothing to unmount)"
    assert stargzfs("umount", str(tmp_path / "missing")).returncode == 4


def test_umount_refuses_a_foreign_fuse_mount_without_force(mounter: Any, mountpoint: Path) -> None:
    from harness import hellofs

    mounter([sys.executable, hellofs.__file__, str(mountpoint)], mountpoint)
    result = stargzfs("umount", str(mountpoint))
    assert result.returncode == 2, result.stderr
    assert "not a stargzfs mount" in result.stderr and "hellofs" in result.stderr
    assert is_mounted(mountpoint)
    result = stargzfs("umount", "--force", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mountpoint)


def test_umount_of_a_busy_mount_detaches_lazily_and_says_so(
    fixture_image: str, mnt: Path, tmp_path: Path
) -> None:
    args = ("mount", fixture_image, str(mnt), "--cache-dir", str(tmp_path / "c"))
    assert stargzfs(*args).returncode == 0
    (daemon,) = daemon_pids(mnt)
    with open(mnt / "etc/passwd", "rb") as busy:
        result = stargzfs("umount", str(mnt))
        assert result.returncode == 0, result.stderr
        assert "detached lazily" in result.stderr and "busy" in result.stderr
        assert not is_mounted(mnt)
        assert busy.read()  # open files keep working
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{daemon}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not daemon_pids(mnt)  # the daemon went once the last file was closed


def test_umount_of_a_mount_busy_for_a_moment_waits_for_it(
    fixture_image: str, mnt: Path, tmp_path: Path
) -> None:
    """Right after a mount the daemon's own warm-up reads through it: `umount` then retries
    for a moment instead of detaching lazily (and saying the mount was busy). (Held for
    0.6 s: longer than `umount` takes to make its first attempt, within its 1 s retry.)"""
    args = ("mount", fixture_image, str(mnt), "--cache-dir", str(tmp_path / "c"))
    assert stargzfs(*args).returncode == 0
    busy = open(mnt / "etc/passwd", "rb")  # noqa: SIM115
    closer = threading.Timer(0.6, busy.close)
    closer.start()
    try:
        result = stargzfs("umount", str(mnt))
    finally:
        closer.join()
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert not is_mounted(mnt) and not daemon_pids(mnt)  # and the daemon has exited


@pytest.mark.slow  # spends the retry budget on each cold read (~2 x 12 s)
def test_registry_outage_cached_files_served_cold_files_eio(
    registry_factory: object, mnt: Path, tmp_path: Path
) -> None:
    reg: Registry = registry_factory()  # type: ignore[operator]
    # Big enough that f0/f1 lie outside the tail read kept from opening the layer.
    files = {f"data/f{i}.txt": os.urandom(400_000) for i in range(5)}
    layout = write_oci_layout(tmp_path / "img", [estargz_layer(make_tar(files))])
    ref = reg.push_oci(layout, "v1", "outage/test:v1")
    cache = str(tmp_path / "cache")
    log = str(tmp_path / "daemon.log")
    args = ("mount", ref, str(mnt), "--cache-dir", cache, "--no-prefetch", "--log-file", log)
    assert stargzfs(*args).returncode == 0
    assert (mnt / "data/f0.txt").read_bytes() == files["data/f0.txt"]
    reg.stop()
    try:
        assert (mnt / "data/f0.txt").read_bytes() == files["data/f0.txt"]  # cached
        with pytest.raises(OSError) as info:
            (mnt / "data/f1.txt").read_bytes()
        assert info.value.errno == errno.EIO
        assert sorted(os.listdir(mnt / "data")) == sorted(p.split("/")[1] for p in files)
        line = wait_for_line(Path(log), "/data/f1.txt")  # names the file, and why
        assert "failed" in line and "connect" in line.lower(), line
    finally:
        reg.start()
    assert (mnt / "data/f1.txt").read_bytes() == files["data/f1.txt"]  # recovered


def test_mount_local_oci_layout(oci_layout: Path, mnt: Path, tmp_path: Path) -> None:
    result = stargzfs("mount", f"oci:{oci_layout}:v1", str(mnt), "--cache-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    exp = json.loads((FIXTURES / "whiteout-merged.json").read_text())
    check_tree(mnt, exp, dir_nlink=True)


def test_background_fetch_makes_the_image_local(
    registry_factory: object, mnt: Path, tmp_path: Path
) -> None:
    reg: Registry = registry_factory()  # type: ignore[operator]
    files = {f"data/f{i}.bin": os.urandom(300_000) for i in range(6)}
    layout = write_oci_layout(tmp_path / "img", [estargz_layer(make_tar(files), chunk_size=65536)])
    ref = reg.push_oci(layout, "v1", "bg/fetch:v1")
    cache = str(tmp_path / "cache")
    assert (
        stargzfs("mount", ref, str(mnt), "--cache-dir", cache, "--background-fetch").returncode == 0
    )
    layers = wait_for_prefetch(mnt)
    assert all(str(layer["background_fetch"]).startswith("done (") for layer in layers), layers
    table = stargzfs("stats", str(mnt)).stdout
    assert "BACKGROUND" in table.splitlines()[0]
    assert table.splitlines()[1].endswith(" " + str(layers[0]["background_fetch"])), table
    reg.stop()  # everything must now come from the cache
    try:
        for path, data in files.items():
            assert (mnt / path).read_bytes() == data
    finally:
        reg.start()


def test_concurrent_cold_readers_fetch_each_chunk_once(
    registry: Registry, registry_proxy: RegistryProxy, mnt: Path, tmp_path: Path
) -> None:
    data = os.urandom(3 << 20)
    layer = estargz_layer(make_tar({"big.bin": data, "small.txt": b"x"}), chunk_size=256 << 10)
    registry.push_oci(write_oci_layout(tmp_path / "img", [layer]), "v1", "conc/read:v1")
    ref = f"{registry_proxy.host}/conc/read:v1"
    args = ("mount", ref, str(mnt), "--cache-dir", str(tmp_path / "c"), "--no-prefetch")
    assert stargzfs(*args).returncode == 0
    registry_proxy.reset_counters()
    results: list[bytes] = []

    def read() -> None:
        results.append((mnt / "big.bin").read_bytes())

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == data for r in results) and len(results) == 8
    # Every compressed byte of the layer travelled at most once.
    spans = []
    for method, path, rng in registry_proxy.requests:
        if method == "GET" and "/blobs/" in path and rng:
            start, _, end = rng.removeprefix("bytes=").partition("-")
            spans.append((int(start), int(end)))
    spans.sort()
    assert spans, registry_proxy.requests
    for (a0, a1), (b0, _b1) in itertools.pairwise(spans):
        assert a1 < b0, f"overlapping fetches {a0}-{a1} and {b0}"


def _program_files(program: str) -> dict[str, bytes]:
    """A program and the shared libraries it needs, as image paths → bytes."""
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    paths = [program]
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            paths.append(parts[2])
        elif parts and parts[0].startswith("/"):
            paths.append(parts[0])
    return {p.lstrip("/"): Path(os.path.realpath(p)).read_bytes() for p in paths}


def test_chroot_runs_a_dynamically_linked_program(
    registry: Registry, mnt: Path, tmp_path: Path
) -> None:
    files = _program_files("/bin/dash")
    tar = make_tar(files, mode=0o755)
    ref = registry.push_oci(
        write_oci_layout(tmp_path / "img", [estargz_layer(tar)]), "v1", "chroot/dash:v1"
    )
    assert stargzfs("mount", ref, str(mnt), "--cache-dir", str(tmp_path / "c")).returncode == 0
    out = subprocess.run(
        ["chroot", str(mnt), "/bin/dash", "-c", "echo hello from the image"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from the image\n"


def test_cache_size_bounds_the_disk_cache(registry: Registry, mnt: Path, tmp_path: Path) -> None:
    files = {f"d/f{i}": os.urandom(200_000) for i in range(10)}
    layer = estargz_layer(make_tar(files), chunk_size=65536)
    ref = registry.push_oci(write_oci_layout(tmp_path / "img", [layer]), "v1", "bounded/c:v1")
    cache = tmp_path / "cache"
    stale = cache / "chunks" / "00" / ".tmp-dead-writer"  # from a daemon killed mid-write
    stale.parent.mkdir(parents=True)
    stale.write_bytes(os.urandom(1000))
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    args = ("mount", ref, str(mnt), "--cache-dir", str(cache), "--cache-size", "600K")
    assert stargzfs(*args, "--no-prefetch").returncode == 0
    for path, data in files.items():
        assert (mnt / path).read_bytes() == data
    chunks = [p for p in (cache / "chunks").rglob("*") if p.is_file()]
    assert 0 < sum(p.stat().st_size for p in chunks) <= 600 * 1024
    stats = json.loads(stargzfs("stats", str(mnt), "--json").stdout)
    assert stats["cache"]["evicted"] > 0
    assert not stale.exists() and stats["cache"]["stale_removed"] == 1


def wait_for_prefetch(mnt: Path, timeout: float = 20) -> list[dict[str, object]]:
    """The layers of `stargzfs stats --json` once no prefetch/background fetch is running."""
    deadline = time.monotonic() + timeout
    while True:
        layers: list[dict[str, object]] = json.loads(stargzfs("stats", str(mnt), "--json").stdout)[
            "layers"
        ]
        states = [str(v) for layer in layers for k, v in layer.items() if "fetch" in k]
        if "running" not in states or time.monotonic() > deadline:
            return layers
        time.sleep(0.05)


def test_read_right_after_mount_shares_the_prefetch(
    registry: Registry, registry_proxy: RegistryProxy, mnt: Path, tmp_path: Path
) -> None:
    server, rest = os.urandom(3 << 20), os.urandom(2 << 20)
    files = {"app/bin/server": server, "app/data/rest.bin": rest, "app/etc/conf": b"x" * 100}
    layer = estargz_layer(make_tar(files), chunk_size=1 << 20, prioritized=["app/bin/server"])
    registry.push_oci(write_oci_layout(tmp_path / "img", [layer]), "v1", "prio/share:v1")
    # Hold requests for the prioritized range (not the TOC at the end) for a moment, so
    # that the read below certainly comes while the prefetch is in flight.
    below = (3 << 20) + (512 << 10)
    registry_proxy.delay_ranges(0.5, below)
    ref = f"{registry_proxy.host}/prio/share:v1"
    assert stargzfs("mount", ref, str(mnt), "--cache-dir", str(tmp_path / "c")).returncode == 0
    assert (mnt / "app/bin/server").read_bytes() == server
    layers = wait_for_prefetch(mnt)
    assert str(layers[0]["prefetch"]).startswith("done ("), layers
    spans = sorted(s for s in registry_proxy.blob_ranges() if s[0] < below)
    assert spans, registry_proxy.requests
    for (_a0, a1), (b0, _b1) in itertools.pairwise(spans):
        assert a1 < b0, f"bytes {b0}-{a1} fetched twice: {spans}"
    fetched = sum(last - first + 1 for first, last in spans)
    assert fetched < len(server) * 1.2  # about the file once (it is random: incompressible)


def test_foreground_mount_writes_its_log_file(
    fixture_image: str, mounter: Any, mountpoint: Path, tmp_path: Path
) -> None:
    log = tmp_path / "fg.log"
    argv = [sys.executable, "-m", "stargzfs", "mount", fixture_image, str(mountpoint)]
    argv += ["--foreground", "--cache-dir", str(tmp_path / "c"), "--log-file", str(log)]
    proc = mounter(argv, mountpoint)
    line = wait_for_line(log, "mounted ")
    assert str(mountpoint) in line and f"pid {proc.pid}" in line
    assert (mountpoint / "etc/passwd").read_bytes()
    assert "mounted " not in proc.stderr_text()  # stderr keeps its own (warning) level
    assert "HTTP Request" not in log.read_text()  # httpx's per-request lines need -v


def test_daemon_leaves_its_start_directory(fixture_image: str, mnt: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    rel = os.path.relpath(mnt, work)
    args = ("mount", fixture_image, rel, "--cache-dir", "cache", "--log-file", "d.log")
    result = stargzfs(*args, cwd=work)
    assert result.returncode == 0, result.stderr
    (pid,) = daemon_pids(Path(rel))
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert (mnt / "etc/passwd").read_bytes()
    assert str(mnt) in wait_for_line(work / "d.log", "mounted ")  # relative paths resolved
    assert (work / "cache" / "chunks").is_dir()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_a_foreground_mount_unmounts_cleanly(
    fixture_image: str, mounter: Any, mountpoint: Path, tmp_path: Path, signum: int
) -> None:
    argv = [sys.executable, "-m", "stargzfs", "mount", fixture_image, str(mountpoint)]
    proc = mounter([*argv, "--foreground", "--cache-dir", str(tmp_path / "c")], mountpoint)
    assert (mountpoint / "etc/passwd").read_bytes()
    proc.kill(signum)
    assert proc.proc.wait(timeout=10) == 0, proc.stderr_text()
    assert not is_mounted(mountpoint)
    assert proc.unmounted_by is None  # the daemon did it, not the harness
    assert "Traceback" not in proc.stderr_text()


def test_record_access_through_the_cli(fixture_image: str, mnt: Path, tmp_path: Path) -> None:
    record = tmp_path / "access.txt"
    args = ("mount", fixture_image, str(mnt), "--cache-dir", str(tmp_path / "c"))
    assert stargzfs(*args, "--record-access", str(record)).returncode == 0
    order = ["usr/lib/libdemo.so.1", "etc/passwd", "usr/bin/hello", "etc/newfile"]
    for path in [*order, "etc/passwd", "usr/bin/hello-hardlink"]:  # repeats: recorded once
        (mnt / path).read_bytes()
    os.stat(mnt / "usr/bin/su")  # a stat is not a read
    assert record.read_text().splitlines() == order
    assert stargzfs("umount", str(mnt)).returncode == 0
    assert record.read_text().splitlines() == order


def test_inode_numbers_are_stable_across_remounts(
    fixture_image: str, mnt: Path, tmp_path: Path
) -> None:
    def inodes(cache: str) -> dict[str, int]:
        assert stargzfs("mount", fixture_image, str(mnt), "--cache-dir", cache).returncode == 0
        try:
            return {
                os.path.relpath(os.path.join(d, n), mnt): os.lstat(os.path.join(d, n)).st_ino
                for d, dirs, files in os.walk(mnt)
                for n in dirs + files
            }
        finally:
            assert stargzfs("umount", str(mnt)).returncode == 0

    first = inodes(str(tmp_path / "a"))
    assert len(first) > 20 and len(set(first.values())) > 20
    assert inodes(str(tmp_path / "a")) == first  # indexes reopened from the cache
    assert inodes(str(tmp_path / "b")) == first  # indexes rebuilt from the TOCs


def test_corrupted_chunk_through_a_mount_fails_that_file_only(
    registry: Registry, registry_proxy: RegistryProxy, mnt: Path, tmp_path: Path
) -> None:
    import trio

    from stargzfs.index import load_index
    from stargzfs.source import BytesSource

    files = {
        "bin/tool": os.urandom(300_000),
        "etc/ok.conf": b"fine\n" * 100,
        "var/filler.bin": os.urandom(1_500_000),  # keeps bin/tool out of the kept tail
    }
    layer = estargz_layer(make_tar(files), chunk_size=65536)
    registry.push_oci(write_oci_layout(tmp_path / "img", [layer]), "v1", "corrupt/one:v1")
    index = trio.run(load_index, BytesSource(layer.data))
    entry = index.resolve("bin/tool")
    assert entry is not None
    chunk = index.chunks_for(entry, 100_000, 1)[0]
    registry_proxy.corrupt_blob(layer.digest, (chunk.comp_offset + chunk.comp_end) // 2)
    log = tmp_path / "d.log"
    ref = f"{registry_proxy.host}/corrupt/one:v1"
    args = ("mount", ref, str(mnt), "--cache-dir", str(tmp_path / "c"), "--log-file", str(log))
    assert stargzfs(*args).returncode == 0
    with pytest.raises(OSError) as info:
        (mnt / "bin/tool").read_bytes()
    assert info.value.errno == errno.EIO
    for path in ("etc/ok.conf", "var/filler.bin"):
        assert (mnt / path).read_bytes() == files[path]
    line = wait_for_line(log, "/bin/tool")
    assert "corrupt" in line or "digest" in line, line
    with pytest.raises(OSError):  # never cached: still EIO, never wrong bytes
        (mnt / "bin/tool").read_bytes()
    registry_proxy.corrupt_blob(layer.digest, -1)  # the registry is healthy again
    assert (mnt / "bin/tool").read_bytes() == files["bin/tool"]
    assert is_mounted(mnt) and sorted(os.listdir(mnt)) == ["bin", "etc", "var"]


def test_zstd_chunked_layer_through_a_mount(
    registry: Registry, fixtures_dir: Path, mnt: Path, tmp_path: Path
) -> None:
    from harness.oci import LayerBlob

    meta = json.loads((fixtures_dir / "zstdchunked.json").read_text())
    blob = (fixtures_dir / "zstdchunked.zstdchunked").read_bytes()
    layer = LayerBlob(blob, meta["diff_id"], meta["media_type"], meta["annotations"])
    ref = registry.push_oci(write_oci_layout(tmp_path / "img", [layer]), "v1", "zstd/chunked:v1")
    args = ("mount", ref, str(mnt), "--cache-dir", str(tmp_path / "c"))
    result = stargzfs(*args)
    assert result.returncode == 0, result.stderr
    check_tree(mnt, meta, dir_nlink=True)
    layers = json.loads(stargzfs("stats", str(mnt), "--json").stdout)["layers"]
    assert layers[0]["format"] == "zstd:chunked"


def test_statfs_of_a_mount(fixture_image: str, mnt: Path, tmp_path: Path) -> None:
    args = ("mount", fixture_image, str(mnt), "--cache-dir", str(tmp_path / "c"))
    assert stargzfs(*args).returncode == 0
    vfs = os.statvfs(mnt)
    entries = sum(len(dirs) + len(files) for _, dirs, files in os.walk(mnt)) + 1
    assert vfs.f_files >= entries
    assert vfs.f_flag & os.ST_RDONLY
    assert vfs.f_bsize >= 4096 and vfs.f_frsize >= 512
    assert vfs.f_bfree == vfs.f_bavail == 0 and vfs.f_ffree == 0  # nothing can be written
    # Like squashfs or erofs: the size is what the image takes (compressed), rounded up.
    layers = json.loads(stargzfs("stats", str(mnt), "--json").stdout)["layers"]
    assert vfs.f_blocks * vfs.f_frsize >= sum(layer["size"] for layer in layers) > 0
    assert vfs.f_namemax >= 255


def test_mount_one_layer(fixture_image: str, mnt: Path, tmp_path: Path) -> None:
    """--layer mounts that layer alone: the lower fixture layer is exactly its own tree, and
    the upper layer shows its own files, none of the lower one's."""
    cache = str(tmp_path / "cache")
    basic = json.loads((FIXTURES / "basic.json").read_text())
    prefix = basic["blob_digest"].removeprefix("sha256:")[:12]
    result = stargzfs("mount", fixture_image, str(mnt), "--cache-dir", cache, "--layer", prefix)
    assert result.returncode == 0, result.stderr
    check_tree(mnt, basic, dir_nlink=True)
    assert stargzfs("umount", str(mnt)).returncode == 0

    upper = json.loads((FIXTURES / "whiteout-upper.json").read_text())["blob_digest"]
    result = stargzfs("mount", fixture_image, str(mnt), "--cache-dir", cache, "--layer", upper)
    assert result.returncode == 0, result.stderr
    assert (mnt / "etc/newfile").is_file()
    assert not (mnt / "etc/passwd").exists()
    assert stargzfs("umount", str(mnt)).returncode == 0

    result = stargzfs("mount", fixture_image, str(mnt), "--cache-dir", cache, "--layer", "beef")
    assert result.returncode == 4, result.stderr
    assert basic["blob_digest"] in result.stderr and "Traceback" not in result.stderr
    assert not is_mounted(mnt)


def test_podman_zstd_chunked_layer_with_holes_through_a_mount(
    registry: Registry, mnt: Path, tmp_path: Path
) -> None:
    """containers/storage's dialect: the manifest checksum vouches for the layer (no
    --allow-unverified needed, `layers` says verified), and holes with no bytes in the blob
    read as zeros through the mount."""
    from harness.oci import LayerBlob
    from layer_helpers import storage_zstd_blob
    from test_zstd_storage import FILES

    blob = storage_zstd_blob(FILES)
    reader = zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO(blob.data), read_across_frames=True
    )
    diff_id = "sha256:" + hashlib.sha256(reader.read()).hexdigest()
    layer = LayerBlob(
        blob.data, diff_id, "application/vnd.oci.image.layer.v1.tar+zstd", blob.annotations
    )
    ref = registry.push_oci(write_oci_layout(tmp_path / "img", [layer]), "v1", "podman/zst:v1")
    rows = json.loads(stargzfs("layers", ref, "--json").stdout)["layers"]
    assert rows[0]["format"] == "zstd:chunked" and rows[0]["verified"] is True
    result = stargzfs("mount", ref, str(mnt), "--cache-dir", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    for name, content in blob.contents.items():
        assert (mnt / name).read_bytes() == content, name


def _push_prioritized(
    registry: Registry, fixtures_dir: Path, tmp_path: Path, tag: str
) -> tuple[str, dict[str, Any], list[str]]:
    """The upstream fixture layer with prioritized files, pushed as prio/TAG:v1: its ref,
    its entries by path, and its prioritized regular files."""
    from harness.oci import LayerBlob

    meta = json.loads((fixtures_dir / "prioritized.json").read_text())
    blob = (fixtures_dir / "prioritized.esgz").read_bytes()
    layer = LayerBlob(blob, meta["diff_id"], meta["media_type"], meta["annotations"])
    ref = registry.push_oci(write_oci_layout(tmp_path / "img", [layer]), "v1", f"prio/{tag}:v1")
    entries = {e["path"]: e for e in meta["entries"]}
    prioritized = [p for p in meta["prefetch_entries"] if entries[p]["type"] == "reg"]
    return ref, entries, prioritized


def test_prioritized_files_are_in_the_kernel_caches_after_prefetch(
    registry: Registry, fixtures_dir: Path, mnt: Path, tmp_path: Path
) -> None:
    """After the prefetch, the daemon reads the prioritized files once through the mount:
    reading them afterwards reaches the daemon no more (its cache counters stay put). With
    --record-access it does not (that would record reads nobody made)."""
    ref, _, prioritized = _push_prioritized(registry, fixtures_dir, tmp_path, "warm")
    log = tmp_path / "daemon.log"
    args = ("mount", ref, str(mnt), "--cache-dir", str(tmp_path / "c"), "--log-file", str(log))
    assert stargzfs(*args).returncode == 0
    wait_for_line(log, "prioritized files in the kernel's caches")

    def counters() -> int:
        cache = json.loads(stargzfs("stats", str(mnt), "--json").stdout)["cache"]
        return int(cache["memory_hits"] + cache["disk_hits"] + cache["misses"])

    before = counters()
    for path in prioritized:
        assert (mnt / path).read_bytes()
    assert counters() == before
    assert stargzfs("umount", str(mnt)).returncode == 0

    record = tmp_path / "record.txt"
    assert stargzfs(*args, "--record-access", str(record)).returncode == 0
    wait_for_line(log, "prefetched")
    time.sleep(0.3)
    assert not record.exists() or record.read_text() == ""


def test_warm_remount_is_ready_with_prioritized_files_in_the_kernel(
    registry: Registry, fixtures_dir: Path, mnt: Path, tmp_path: Path
) -> None:
    """With the prioritized files all in the disk cache (a remount), the mount is reported
    ready only once they are in memory and the kernel's caches: the workload they were
    recorded from must not race the warm-up."""
    ref, entries, prioritized = _push_prioritized(registry, fixtures_dir, tmp_path, "ready")
    log = tmp_path / "daemon.log"
    args = ("mount", ref, str(mnt), "--cache-dir", str(tmp_path / "c"), "--log-file", str(log))
    assert stargzfs(*args).returncode == 0
    wait_for_line(log, "prioritized files in the kernel's caches")
    assert stargzfs("umount", str(mnt)).returncode == 0
    log.write_text("")

    assert stargzfs(*args).returncode == 0
    text = log.read_text()  # at once: no waiting
    assert "prioritized files in the kernel's caches" in text, text
    assert text.index("kernel's caches") < text.index("mounted ")
    # Then the names the first mount was asked (reading those files), before ready too.
    replayed = text.index("names the last mount was asked")
    assert text.index("kernel's caches") < replayed < text.index("mounted ")
    stats = json.loads(stargzfs("stats", str(mnt), "--json").stdout)
    assert stats["layers"][0]["prefetch"] == "done (cached)"
    before = stats["cache"]
    for path in prioritized:
        data = (mnt / path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entries[path]["sha256"]
    after = json.loads(stargzfs("stats", str(mnt), "--json").stdout)["cache"]
    assert after["misses"] == before["misses"] == 0
    assert after["memory_hits"] + after["disk_hits"] == before["memory_hits"] + before["disk_hits"]


def test_warm_remount_asks_the_kernel_what_the_last_mount_was_asked(
    fixture_image: str, mnt: Path, tmp_path: Path
) -> None:
    """A program's first run probes names that do not exist, follows symlinks and lists
    directories; no TOC says which. The last mount of the image saw them: a remount asks the
    kernel the same before it is ready, so the same run then asks the daemon nothing."""
    from stargzfs.fuse.operations import KERNEL_OPEN

    assert KERNEL_OPEN, "pyfuse3 lacks stargzfs's patch: `make venv` builds it"
    log = tmp_path / "daemon.log"
    cache = tmp_path / "c"
    args = ("mount", fixture_image, str(mnt), "--cache-dir", str(cache), "--log-file", str(log))

    def requests() -> dict[str, int]:
        counts: dict[str, int] = json.loads(stargzfs("stats", str(mnt), "--json").stdout)[
            "fuse_requests"
        ]
        return counts

    def work() -> list[object]:
        probes = ["usr/lib/python3.11.zip", "etc/ld.so.preload", "usr/bin/nope", "etc/passwd"]
        return [
            [os.path.lexists(mnt / p) for p in probes],
            os.readlink(mnt / "usr/bin/hi"),
            sorted(os.listdir(mnt / "usr/share/doc/sizes")),
            os.lstat(mnt / "usr/share/doc/sizes/size-1").st_size,
        ]

    assert stargzfs(*args).returncode == 0
    first = work()
    assert first[0] == [False, False, False, True]
    asked = requests()
    assert asked["lookup"] >= 8 and asked["readlink"] == 1
    assert stargzfs("umount", str(mnt)).returncode == 0  # returns once the trace is saved
    (trace,) = (cache / "traces").iterdir()
    saved = len(json.loads(trace.read_text())["entries"])

    log.write_text("")
    assert stargzfs(*args).returncode == 0
    text = log.read_text()
    line = f"asked the kernel {saved} of the {saved} names the last mount was asked"
    assert line in text, text
    assert text.index(line) < text.index("mounted ")
    before = requests()
    assert work() == first
    assert requests() == before  # every name, missing ones too, was in the kernel's caches
    stats = json.loads(stargzfs("stats", str(mnt), "--json").stdout)
    assert stats["lookup_trace"]["replayed"] == saved
    assert stargzfs("umount", str(mnt)).returncode == 0

    # A damaged trace costs a log line, never the mount (and is replaced by the next one).
    trace.write_text('{"version": 1, "entries": ' + "[" * 50_000 + "]" * 50_000 + "}")
    log.write_text("")
    assert stargzfs(*args).returncode == 0
    assert "ignoring the lookup trace" in log.read_text()
    assert work() == first
    assert stargzfs("umount", str(mnt)).returncode == 0
    assert json.loads(trace.read_text())["entries"]

    # One too long to replay in the budget: cut off there, and nothing it did keeps the
    # mount busy (a thread abandoned at the deadline once held the mount's root open).
    many = [["lookup", f"etc/missing-{i}"] for i in range(20_000)]
    trace.write_text(json.dumps({"version": 1, "entries": many}))
    log.write_text("")
    assert stargzfs(*args).returncode == 0
    replayed = json.loads(stargzfs("stats", str(mnt), "--json").stdout)["lookup_trace"]
    assert replayed["replayed"] < 20_000, log.read_text()
    assert "of the 20000 names the last mount was asked" in log.read_text()
    result = stargzfs("umount", str(mnt))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert not daemon_pids(mnt)
