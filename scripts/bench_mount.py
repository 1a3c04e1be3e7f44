#!/usr/bin/env python3
"""Benchmark of issue 5: lazy ``stargzfs mount`` against a full pull, side by side.

Image (built once by ``scripts/bench_image.py``, cached under ``/var/tmp/stargzfs-bench/``):
Debian bookworm minbase + python3 installed with apt + a small app layer holding a 100 MiB random
file, as three layers, pushed as eStargz and as plain gzip to a ``docker-registry`` this script
starts on a free loopback port. Prioritized files are recorded by running the workload once
through ``stargzfs mount --record-access`` and the eStargz layers are reconverted with them.

Measured in one run (workload: ``chroot DIR python3 -c 'import json'``):

1. full pull and extraction of the gzip image (``stargzfs pull --format rootfs``, and
   ``skopeo copy`` + GNU tar with whiteouts applied) then the workload;
2. ``stargzfs mount`` with an empty cache dir, then the workload in the mount;
3. unmount, remount with the now warm cache dir, the workload again;
4. the workload in the plain local directory extracted in (1).

Plus cold/warm sequential read throughput of the 100 MiB file, ``find MNT | wc -l``, the daemon's
RSS, and a synthetic 1,000,000-entry layer's mount time and RSS. Targets (issue 5): (2) ≥4x faster
than (1), bytes fetched in (2) ≤20 % of the compressed image, mount ready <1 s, (3) ≤1.5x (4),
1M-entry RSS <400 MB. Nothing is asserted: the table says which targets are met.

Run as root: ``.venv/bin/python scripts/bench_mount.py [--rebuild] [--entries N | --no-synthetic]
[--link-mbit N]`` (``--link-mbit``: the registry behind a throttled link, as across a network).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import bench_image as img  # noqa: E402

WORKLOAD = ["python3", "-c", "import json"]
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}
REPO = "bench/python"
SYNTH_REPO = "bench/synthetic"
STATS_XATTR = "user.stargzfs.stats"


def note(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def stargzfs_bin() -> str:
    local = Path(sys.executable).parent / "stargzfs"
    if local.exists():
        return str(local)
    found = shutil.which("stargzfs")
    if not found:
        raise SystemExit("stargzfs not found: run from the project venv")
    return found


def command_help(*args: str) -> str | None:
    """``stargzfs ARGS --help`` output, or None when the command does not exist."""
    res = subprocess.run(
        [stargzfs_bin(), *args, "--help"], capture_output=True, text=True, check=False
    )
    return res.stdout if res.returncode == 0 else None


# -- registry --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_status(port: int, path: str) -> int | None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


class Registry:
    """A ``docker-registry serve`` process on 127.0.0.1 with filesystem storage in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("docker-registry") or shutil.which("registry")
        if binary is None:
            raise SystemExit("docker-registry not found: run scripts/install-system-deps.sh")
        (self.root / "storage").mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):
            self.port = free_port()
            config = {
                "version": "0.1",
                "log": {"level": "warn", "accesslog": {"disabled": True}},
                "storage": {
                    "filesystem": {"rootdirectory": str(self.root / "storage")},
                    "maintenance": {"uploadpurging": {"enabled": False}},
                },
                "http": {"addr": self.host, "secret": secrets.token_hex(16)},
            }
            cfg = self.root / "config.yml"
            cfg.write_text(json.dumps(config, indent=2))  # JSON is YAML
            env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
            with open(self.root / "registry.log", "ab") as logf:
                self.proc = subprocess.Popen(
                    [binary, "serve", str(cfg)],
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            deadline = time.monotonic() + 10
            while self.proc.poll() is None and time.monotonic() < deadline:
                if http_status(self.port, "/v2/") == 200:
                    return
                time.sleep(0.01)
            self.stop()
        raise SystemExit(f"registry did not start, see {self.root / 'registry.log'}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def push(self, layout: Path, tag: str, dest: str) -> str:
        ref = f"{self.host}/{dest}"
        subprocess.run(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "--quiet",
                "--preserve-digests",
                "--dest-tls-verify=false",
                "--dest-no-creds",
                f"oci:{layout}:{tag}",
                f"docker://{ref}",
            ],
            check=True,
            timeout=600,
        )
        return ref


# -- mounts ----------------------------------------------------------------------------------


def is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def mount(
    ref: str, mnt: Path, cache: Path, record: Path | None = None, extra: Sequence[str] = ()
) -> float:
    """``stargzfs mount``; seconds until it returned (the mount is usable then)."""
    mnt.mkdir(parents=True, exist_ok=True)
    cmd = [stargzfs_bin(), "mount", ref, str(mnt), "--cache-dir", str(cache), *extra]
    if record is not None:
        cmd += ["--record-access", str(record)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"stargzfs mount failed ({res.returncode}): {res.stderr.strip()}")
    if not is_mounted(mnt):
        raise RuntimeError(f"stargzfs mount returned 0 but {mnt} is not mounted")
    return elapsed


def umount(mnt: Path) -> None:
    """Unmount however it takes: ``stargzfs umount``, ``fusermount3 -u``, then ``-uz``."""
    if not is_mounted(mnt):
        return
    for cmd in (
        [stargzfs_bin(), "umount", str(mnt)],
        ["fusermount3", "-u", str(mnt)],
        ["fusermount3", "-uz", str(mnt)],
    ):
        subprocess.run(cmd, capture_output=True, check=False, timeout=60)
        for _ in range(50):
            if not is_mounted(mnt):
                return
            time.sleep(0.05)
    note(f"WARNING: {mnt} is still mounted")


def daemon_pids(mnt: Path) -> list[int]:
    """Processes serving ``mnt``: command line names stargzfs, mount and the mount point."""
    pids = []
    want = str(mnt)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if not argv or "fusermount" in argv[0]:
            continue
        if any("stargzfs" in a for a in argv[:3]) and "mount" in argv and want in argv:
            pids.append(int(entry))
    return pids


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def daemon_rss(mnt: Path) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB of the biggest process serving ``mnt`` (0 if none found)."""
    best = (0.0, 0.0)
    for pid in daemon_pids(mnt):
        with contextlib.suppress(OSError):
            best = max(best, (rss_mb(pid), rss_mb(pid, "VmHWM")))
    return best


def mount_stats(mnt: Path) -> dict[str, Any] | None:
    try:
        stats: dict[str, Any] = json.loads(os.getxattr(mnt, STATS_XATTR))
        return stats
    except OSError:
        return None


def wait_prefetch(mnt: Path, timeout: float = 10.0) -> dict[str, Any] | None:
    """Stats once no layer's prefetch is running any more (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = mount_stats(mnt)
        if stats is None:
            return None
        running = [
            layer
            for layer in stats.get("layers", [])
            if str(layer.get("prefetch", "")).startswith("running")
        ]
        if not running or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def cache_summary(stats: dict[str, Any] | None) -> str:
    if not stats or not isinstance(stats.get("cache"), dict):
        return ""
    return "cache " + ", ".join(f"{k} {v}" for k, v in stats["cache"].items())


def per_layer(stats: dict[str, Any] | None) -> str:
    if not stats:
        return ""
    return "; ".join(
        f"{name} {int(layer.get('bytes_fetched') or 0) / 1e6:.2f}/{layer.get('requests')}"
        for name, layer in zip(img.LAYER_NAMES, stats.get("layers", []), strict=False)
    )


def fetched_bytes(stats: dict[str, Any] | None) -> list[int]:
    if not stats:
        return []
    return [int(layer.get("bytes_fetched") or 0) for layer in stats.get("layers", [])]


# -- workload and measurements ---------------------------------------------------------------


def run_workload(root: Path) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(
        ["chroot", str(root), *WORKLOAD], env=CHROOT_ENV, capture_output=True, check=False
    )
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(
            f"workload in {root} failed ({res.returncode}): {res.stderr.decode(errors='replace')}"
        )
    return elapsed


def repeat_workload(root: Path, n: int = 5) -> float:
    return statistics.median(run_workload(root) for _ in range(n))


def read_throughput(path: Path) -> float:
    """MB/s reading ``path`` sequentially in 1 MiB pieces."""
    buf = bytearray(1 << 20)
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total / 1e6 / (time.perf_counter() - t0)


def drop_file_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_tree_cache(root: Path) -> int:
    """Drop the page cache of every regular file under ``root`` (not the whole machine's)."""
    count = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with contextlib.suppress(OSError):
                    drop_file_cache(Path(path))
                    count += 1
    return count


def find_count(root: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = subprocess.run(
        f"find {root} | wc -l", shell=True, capture_output=True, text=True, check=True
    ).stdout
    return time.perf_counter() - t0, int(out.strip())


def apply_whiteouts(root: Path, names: Sequence[str]) -> None:
    """OCI whiteouts of one just-extracted layer: ``.wh.X`` removes X (from lower layers) and
    itself; ``.wh..wh..opq`` empties its directory of what lower layers put there."""
    layer_paths = {n.removeprefix("./").rstrip("/") for n in names}
    for raw in names:
        name = raw.removeprefix("./").rstrip("/")
        parent, _, base = name.rpartition("/")
        if not base.startswith(img.WHITEOUT):
            continue
        pdir = root / parent if parent else root
        with contextlib.suppress(FileNotFoundError):
            (pdir / base).unlink()
        if base == img.WHITEOUT + img.WHITEOUT + ".opq":
            for child in list(pdir.iterdir()):
                rel = f"{parent}/{child.name}" if parent else child.name
                if rel not in layer_paths:
                    remove(child)
        else:
            remove(pdir / base.removeprefix(img.WHITEOUT))


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def skopeo_pull_extract(ref: str, layout: Path, rootfs: Path) -> None:
    """``skopeo copy`` to an OCI layout, then GNU tar per layer with whiteouts applied."""
    shutil.rmtree(layout, ignore_errors=True)
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--src-no-creds",
            f"docker://{ref}",
            f"oci:{layout}:bench",
        ],
        check=True,
        timeout=600,
    )
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
    rootfs.mkdir(parents=True)
    for layer in manifest["layers"]:
        blob = layout / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
        res = subprocess.run(
            ["tar", "--numeric-owner", "-xzvf", str(blob), "-C", str(rootfs)],
            capture_output=True,
            text=True,
            check=True,
        )
        apply_whiteouts(rootfs, res.stdout.splitlines())


# -- the synthetic 1M-entry layer ------------------------------------------------------------


def synthetic_blob(work: Path, n: int) -> img.Blob:
    """A TOC-only eStargz blob with ``n`` entries shaped like a big rootfs. File payload
    offsets point into a block of zeros, not at real gzip members: fine, nothing is read."""
    from stargzfs.formats.footer import estargz_footer

    meta = work / "synthetic" / f"synthetic-{n}.json"
    if meta.is_file():
        return img.Blob.from_json(meta.read_text())
    meta.parent.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(7)
    toc = io.BytesIO()
    toc.write(b'{"version":1,"entries":[')
    offset = 16
    count = 0
    dirs: list[str] = ["usr", "usr/lib", "usr/share"]
    mtime = "2024-01-01T00:00:00Z"

    def emit(entry: dict[str, object]) -> None:
        nonlocal count
        if count:
            toc.write(b",")
        toc.write(json.dumps(entry, separators=(",", ":")).encode())
        count += 1

    for d in dirs:
        emit({"name": d + "/", "type": "dir", "mode": 0o755, "modtime": mtime})
    i = 0
    while count < n:
        if i % 50 == 0:
            d = f"{rnd.choice(dirs[:200])}/pkg-{i // 50:06d}"
            dirs.append(d)
            emit({"name": d + "/", "type": "dir", "mode": 0o755, "modtime": mtime})
            i += 1
            continue
        name = f"{dirs[-1]}/file-{i:07d}.{rnd.choice(['py', 'so', 'txt', 'h', 'json'])}"
        r = rnd.random()
        if r < 0.05:
            emit(
                {
                    "name": name,
                    "type": "symlink",
                    "linkName": "../x",
                    "mode": 0o777,
                    "modtime": mtime,
                }
            )
        else:
            digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
            emit(
                {
                    "name": name,
                    "type": "reg",
                    "size": rnd.randint(1, 40000),
                    "mode": 0o644,
                    "modtime": mtime,
                    "offset": offset,
                    "digest": digest,
                    "chunkDigest": digest,
                }
            )
            offset += 16
        i += 1
    toc.write(b"]}")
    toc_json = toc.getvalue()
    toc.close()
    zeros = bytes(offset + 16)
    head = gzip.compress(zeros, compresslevel=0, mtime=0)
    info = tarfile.TarInfo("stargz.index.json")
    info.size = len(toc_json)
    toc_tar = (
        info.tobuf(format=tarfile.USTAR_FORMAT)
        + toc_json
        + bytes((-len(toc_json)) % 512)
        + bytes(1024)
    )
    member = gzip.compress(toc_tar, compresslevel=6, mtime=0)
    out = meta.with_suffix(".tar.gz")
    with open(out, "wb") as f:
        f.write(head)
        f.write(member)
        f.write(estargz_footer(len(head)))
    diff = hashlib.sha256(zeros)
    diff.update(toc_tar)
    blob = img.Blob(
        out,
        img._sha256_file(out),
        out.stat().st_size,
        "sha256:" + diff.hexdigest(),
        img.LAYER_GZIP,
        {
            "containerd.io/snapshot/stargz/toc.digest": "sha256:"
            + hashlib.sha256(toc_json).hexdigest(),
            "io.containers.estargz.uncompressed-size": str(len(zeros) + len(toc_tar)),
        },
    )
    meta.write_text(blob.to_json())
    return blob


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Results:
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    header: list[str] = field(default_factory=list)

    def add(self, what: str, value: str, target: str = "") -> None:
        self.rows.append((what, value, target))
        note(f"{what}: {value} {target}")

    def print(self) -> None:
        w0 = max(len(r[0]) for r in self.rows)
        w1 = min(max(len(r[1]) for r in self.rows), 24)
        print()
        for line in self.header:
            print(line)
        print(f"{'measurement':<{w0}}  {'value':<{w1}}  target / detail")
        print("-" * (w0 + w1 + 40))
        for what, value, target in self.rows:
            print(f"{what:<{w0}}  {value:<{w1}}  {target}".rstrip())


def verdict(ok: bool, text: str) -> str:
    return f"{text} {'MET' if ok else 'MISSED'}"


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "n/a"


@contextlib.contextmanager
def cleanup(registry: Registry, mounts: list[Path]) -> Iterator[None]:
    try:
        yield
    finally:
        for mnt in mounts:
            with contextlib.suppress(Exception):
                umount(mnt)
        registry.stop()


def record_prioritized(
    work: Path,
    reg: Registry,
    tars: dict[str, Path],
    noprio: list[img.Blob],
    run_dir: Path,
    mounts: list[Path],
) -> list[str] | None:
    """Paths the workload reads, recorded through ``--record-access`` (cached per image)."""
    key = hashlib.sha256("".join(b.digest for b in noprio).encode()).hexdigest()[:16]
    cached = work / "recorded" / f"{key}.txt"
    if cached.is_file():
        return cached.read_text().splitlines()
    layout = img.write_oci_layout(work / "oci" / "esgz-noprio", noprio, "bench")
    ref = reg.push(layout, "bench", f"{REPO}:esgz-noprio")
    mnt = run_dir / "mnt-record"
    mounts.append(mnt)
    record = run_dir / "recorded.txt"
    cache = run_dir / "cache-record"
    mount(ref, mnt, cache, record=record)
    try:
        run_workload(mnt)
    finally:
        umount(mnt)
    recorded = record.read_text().splitlines()
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text("\n".join(recorded) + "\n")
    return recorded


@dataclass
class MountRun:
    ready: float  # seconds until `stargzfs mount` returned
    first: float  # first workload run
    stats: dict[str, Any] | None  # after the run, once prefetch finished
    rss_ready: float  # daemon RSS right after mounting (MB)
    requests: dict[str, int]  # FUSE requests the first run sent the daemon, per operation

    @property
    def total(self) -> float:
        return self.ready + self.first


def mount_and_run(ref: str, mnt: Path, cache: Path, *extra: str) -> MountRun:
    """Mount, run the workload once, wait for prefetch; the mount stays for more."""
    ready = mount(ref, mnt, cache, extra=extra)
    rss, _ = daemon_rss(mnt)
    before = fuse_requests(mnt)
    first = run_workload(mnt)
    requests = diff_counts(fuse_requests(mnt), before)
    return MountRun(ready, first, wait_prefetch(mnt), rss, requests)


def fuse_requests(mnt: Path) -> dict[str, int]:
    """Requests per FUSE operation so far (`stargzfs stats`; its own reads not counted)."""
    return dict((mount_stats(mnt) or {}).get("fuse_requests") or {})


def diff_counts(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def show_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def pull_stargzfs(ref: str, dest: Path, pull_help: str) -> float | None:
    """Seconds for ``stargzfs pull REF DEST --format rootfs`` (None if it failed)."""
    extra = ["--no-cache"] if "--no-cache" in pull_help else []
    extra += ["-q"] if "--quiet" in pull_help else []
    os.sync()  # the previous pull's writeback is not this one's to wait for
    t = time.perf_counter()
    p = subprocess.run(
        [stargzfs_bin(), "pull", ref, str(dest), "--format", "rootfs", *extra],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - t
    if p.returncode != 0:
        note(f"stargzfs pull failed ({p.returncode}): {p.stderr.strip()[-500:]}")
        shutil.rmtree(dest, ignore_errors=True)
        return None
    return elapsed


def pull_skopeo(ref: str, layout: Path, dest: Path) -> float:
    os.sync()  # the previous pull's writeback is not this one's to wait for
    t = time.perf_counter()
    skopeo_pull_extract(ref, layout, dest)
    return time.perf_counter() - t


def head_commit() -> str:
    root = os.path.join(HERE, "..")
    rev = subprocess.run(
        ["git", "-C", root, "log", "-1", "--format=%h %s"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "stargzfs"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return rev[:70] + (" (+ uncommitted changes in stargzfs/)" if dirty else "")


def spread(values: Sequence[float]) -> str:
    """ " (median of N, min–max)" for repeated figures."""
    if len(values) < 2:
        return ""
    return f"median of {len(values)}, {min(values):.3f}–{max(values):.3f}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", type=Path, default=img.DEFAULT_WORK)
    ap.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="pulled trees, caches and mount points (default WORK/run; the disk is synced "
        "before each timed pull, so one pull's writeback does not slow the next)",
    )
    ap.add_argument("--rebuild", action="store_true", help="rebuild the image from scratch")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="repetitions of (1), (2), (3) (medians are printed; default 3)",
    )
    ap.add_argument("--entries", type=int, default=1_000_000, help="synthetic layer size")
    ap.add_argument("--no-synthetic", action="store_true", help="skip the synthetic layer")
    ap.add_argument(
        "--link-mbit",
        type=float,
        default=0,
        help="pull and mount through a throttled link of this many Mbit/s (0: loopback)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (chroot, FUSE mounts)")
    # With PYTHONDONTWRITEBYTECODE (set on these machines) a source edited since `make venv`
    # is compiled again by every stargzfs process timed below (~20 ms for a large module):
    # compile it once, as `make venv` does.
    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "stargzfs"), quiet=1)
    # SIGTERM must unwind through the finally blocks (unmount, stop the registry) too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work: Path = args.work.resolve()
    if args.rebuild:
        for sub in ("rootfs", "layers", "blobs", "oci", "recorded", "synthetic"):
            shutil.rmtree(work / sub, ignore_errors=True)
    run_dir = args.run_dir.resolve() if args.run_dir else work / "run"
    for leftover in sorted(run_dir.glob("mnt*")) if run_dir.is_dir() else []:
        umount(leftover)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)

    t0 = time.monotonic()
    tars = img.build_layer_tars(work, rebuild=args.rebuild)
    gz = [img.gzip_blob(work, name, tars[name]) for name in img.LAYER_NAMES]
    gz_small = [*gz[:2], img.gzip_blob(work, "app-small", img.small_app_tar(work))]
    noprio = [img.estargz_blob(work, name, tars[name]) for name in img.LAYER_NAMES]
    note(f"image ready in {time.monotonic() - t0:.1f} s")

    res = Results()
    res.header.append(f"stargzfs at {head_commit()}")
    res.header.append(
        f"{os.cpu_count()} CPUs, kernel {os.uname().release}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; workload: chroot DIR "
        + " ".join(WORKLOAD[:2])
        + f" '{WORKLOAD[2]}'; repeated figures are medians of "
        f"{args.repeat}"
    )
    reg = Registry(work / "registry")
    mounts: list[Path] = []
    reg.start()
    try:
        with cleanup(reg, mounts):
            measure(args, work, run_dir, reg, mounts, tars, gz, gz_small, noprio, res)
    finally:
        if res.rows:
            res.print()
        # Pulled trees and caches are only useful during the run (~600 MB).
        if not any(is_mounted(m) for m in mounts):
            shutil.rmtree(run_dir, ignore_errors=True)


def measure(
    args: argparse.Namespace,
    work: Path,
    run_dir: Path,
    reg: Registry,
    mounts: list[Path],
    tars: dict[str, Path],
    gz: list[img.Blob],
    gz_small: list[img.Blob],
    noprio: list[img.Blob],
    res: Results,
) -> None:
    reps = max(1, args.repeat)
    mount_help = command_help("mount")
    pull_help = command_help("pull")
    gz_ref = reg.push(
        img.write_oci_layout(work / "oci" / "gzip", gz, "bench"), "bench", f"{REPO}:gzip"
    )
    gz_small_ref = reg.push(
        img.write_oci_layout(work / "oci" / "gzip-small", gz_small, "bench"),
        "bench",
        f"{REPO}:gzip-small",
    )
    esgz = noprio
    if mount_help is None:
        note("`stargzfs mount` is not available yet: only the full-pull baseline runs")
    elif "--record-access" not in mount_help:
        note("`stargzfs mount --record-access` is not available: no prioritized files")
    else:
        recorded = record_prioritized(work, reg, tars, noprio, run_dir, mounts) or []
        prio = img.prioritized_per_layer(tars, recorded)
        note(
            f"recorded {len(recorded)} files read by the workload; prioritized per layer: "
            + ", ".join(f"{k} {len(v)}" for k, v in prio.items())
        )
        esgz = [img.estargz_blob(work, n, tars[n], prio[n]) for n in img.LAYER_NAMES]
    esgz_ref = reg.push(
        img.write_oci_layout(work / "oci" / "esgz", esgz, "bench"), "bench", f"{REPO}:esgz"
    )
    if args.link_mbit:
        # Everything measured from here on crosses a slow link, as from a real registry.
        from bench_link import ThrottledLink

        link = ThrottledLink(reg.host, args.link_mbit * 1e6 / 8)
        gz_ref, gz_small_ref, esgz_ref = (
            r.replace(reg.host, link.host) for r in (gz_ref, gz_small_ref, esgz_ref)
        )
        res.header.append(f"through a throttled {args.link_mbit:g} Mbit/s link")
    image_size = sum(b.size for b in esgz)
    res.add(
        "image: compressed eStargz / gzip",
        f"{image_size / 1e6:.1f} / {sum(b.size for b in gz) / 1e6:.1f} MB",
        f"gzip without the 100 MiB file: {sum(b.size for b in gz_small) / 1e6:.1f} MB",
    )
    res.add(
        "image: eStargz layers (MB)",
        " + ".join(f"{n} {b.size / 1e6:.1f}" for n, b in zip(img.LAYER_NAMES, esgz, strict=True)),
    )

    # (1) full pull + extract + workload, (4) the workload in the extracted directory
    baselines: dict[str, float] = {}
    local_root = run_dir / "local-rootfs"

    def baseline(label: str, key: str, ref: str, tool: str, keep: bool) -> None:
        totals: list[float] = []
        pulls: list[float] = []
        for i in range(reps):
            dest = run_dir / f"pulled-{i}"
            if tool == "stargzfs":
                assert pull_help is not None
                p = pull_stargzfs(ref, dest, pull_help)
                if p is None:
                    return
            else:
                p = pull_skopeo(ref, run_dir / "skopeo-layout", dest)
                shutil.rmtree(run_dir / "skopeo-layout", ignore_errors=True)
            w = run_workload(dest)
            pulls.append(p)
            totals.append(p + w)
            if keep and not local_root.exists():
                dest.rename(local_root)
            else:
                shutil.rmtree(dest)
        baselines[key] = median(totals)
        res.add(
            label + " + workload",
            f"{median(totals):.2f} s",
            f"pull {median(pulls):.2f} s; {spread(totals)}",
        )

    if pull_help is not None:
        baseline("(1) stargzfs pull --format rootfs", "(1) stargzfs pull", gz_ref, "stargzfs", True)
        baseline(
            "    same, image without the 100 MiB file",
            "(1) without 100 MiB file",
            gz_small_ref,
            "stargzfs",
            False,
        )
    else:
        note("`stargzfs pull` is not available: baseline is skopeo + tar only")
    baseline("(1') skopeo copy + tar -x + whiteouts", "(1') skopeo + tar", gz_ref, "skopeo", True)
    baseline(
        "    same, image without the 100 MiB file",
        "(1') without 100 MiB file",
        gz_small_ref,
        "skopeo",
        False,
    )

    local = [run_workload(local_root) for _ in range(max(5, reps))]
    res.add(
        "(4) local dir: workload",
        f"{local[0]:.3f} s",
        f"first run; later runs {spread(local[1:])} → {median(local[1:]):.3f}",
    )
    local_first = local[0]

    if mount_help is None:
        return

    # (2) cold mount: a fresh cache dir each time; the last mount stays for more figures
    mnt = run_dir / "mnt"
    mounts.append(mnt)
    colds: list[MountRun] = []
    for i in range(reps):
        if i:
            umount(mnt)
        colds.append(mount_and_run(esgz_ref, mnt, run_dir / f"cache-{i}"))
    cache = run_dir / f"cache-{reps - 1}"
    cold_total = median([c.total for c in colds])
    cold_ready = median([c.ready for c in colds])
    res.add(
        "(2) cold mount + workload",
        f"{cold_total:.3f} s",
        f"mount {cold_ready:.3f} + run {median([c.first for c in colds]):.3f}; "
        + spread([c.total for c in colds]),
    )
    for name, base in baselines.items():
        res.add(
            f"    speed-up vs {name}",
            f"{base / cold_total:.1f}x",
            verdict(base / cold_total >= 4, "target ≥4x"),
        )
    res.add(
        "    mount ready (cold)",
        f"{cold_ready:.3f} s",
        verdict(cold_ready < 1, "target <1 s") + " " + spread([c.ready for c in colds]),
    )
    first = colds[0]
    fetched = fetched_bytes(first.stats)
    if first.stats and fetched:
        total = sum(fetched)
        res.add(
            "    bytes fetched / compressed image",
            f"{total / 1e6:.2f} MB = {pct(total, image_size)}",
            verdict(total <= 0.2 * image_size, "target ≤20 %"),
        )
        runtime_size = sum(b.size for b in esgz[:2])
        res.add(
            "    ... of base+python layers only",
            f"{sum(fetched[:2]) / 1e6:.2f} MB = {pct(sum(fetched[:2]), runtime_size)}",
        )
        res.add(
            "    per layer: MB fetched/requests", per_layer(first.stats), cache_summary(first.stats)
        )
        res.add(
            "    prefetch", "; ".join(str(layer.get("prefetch")) for layer in first.stats["layers"])
        )
    else:
        note(f"no stats from {STATS_XATTR}: bytes fetched not reported")
    t_find, n_find = find_count(mnt)
    t_find2, _ = find_count(mnt)
    t_find_l, _ = find_count(local_root)
    res.add(
        "find | wc -l: cold mount / again / local",
        f"{t_find:.3f} / {t_find2:.3f} / {t_find_l:.3f} s",
        f"{n_find} entries",
    )
    big = img.BIG_FILE
    cold_tp = read_throughput(mnt / big)
    warm_tp = read_throughput(mnt / big)
    drop_file_cache(local_root / big)
    local_cold_tp = read_throughput(local_root / big)
    local_warm_tp = read_throughput(local_root / big)
    res.add(
        "100 MiB file, cold sequential read: mount / local",
        f"{cold_tp:.0f} / {local_cold_tp:.0f} MB/s",
    )
    res.add(
        "100 MiB file, warm (page cache): mount / local",
        f"{warm_tp:.0f} / {local_warm_tp:.0f} MB/s",
        f"ratio {warm_tp / local_warm_tp:.2f}",
    )
    rss_after, hwm = daemon_rss(mnt)
    res.add(
        "daemon RSS: mounted / after all reads (peak)",
        f"{colds[-1].rss_ready:.0f} / {rss_after:.0f} MB ({hwm:.0f})",
    )
    stats_after = mount_stats(mnt)
    if stats_after:
        res.add(
            "fetched after reading the 100 MiB file",
            f"{sum(fetched_bytes(stats_after)) / 1e6:.1f} MB",
            f"{sum(int(la.get('requests') or 0) for la in stats_after['layers'])} requests",
        )
    umount(mnt)

    # (3) warm remount with the cache dir of the last cold mount
    warms: list[MountRun] = []
    for i in range(reps):
        if i:
            umount(mnt)
        warms.append(mount_and_run(esgz_ref, mnt, cache))
    warm_runs = [w.first for w in warms]
    before_more = fuse_requests(mnt)
    more = [run_workload(mnt) for _ in range(5)]
    more_requests = diff_counts(fuse_requests(mnt), before_more)
    warm_first = median(warm_runs)
    res.add(
        "(3) warm remount + workload",
        f"{median([w.total for w in warms]):.3f} s",
        f"mount {median([w.ready for w in warms]):.3f} + run {warm_first:.3f}; "
        + spread([w.total for w in warms]),
    )
    res.add(
        "    ratio (3)/(4), first run after (re)mount",
        f"{warm_first / local_first:.2f}x",
        verdict(warm_first / local_first <= 1.5, "target ≤1.5x"),
    )
    res.add(
        "    ratio (3)/(4), later runs (page cache warm)",
        f"{median(more) / median(local[1:]):.2f}x",
        f"{median(more):.3f} vs {median(local[1:]):.3f} s",
    )
    res.add(
        "    FUSE requests: first run / 5 later runs",
        f"{sum(warms[-1].requests.values())} / {sum(more_requests.values())}",
        f"first: {show_counts(warms[-1].requests)}; later: {show_counts(more_requests)}",
    )
    last = warms[-1].stats
    if last is not None:
        res.add(
            "    fetched from the registry after warm remount",
            f"{sum(fetched_bytes(last)) / 1e6:.2f} MB",
            "prefetch: " + "; ".join(str(la.get("prefetch")) for la in last["layers"]),
        )
        res.add("    per layer: MB fetched/requests", per_layer(last), cache_summary(last))
    umount(mnt)
    dropped = drop_tree_cache(local_root)
    local_cold = run_workload(local_root)
    res.add(
        "(4') local dir, its files' page cache dropped",
        f"{local_cold:.3f} s",
        f"ratio (3)/(4') {warm_first / local_cold:.2f}x ({dropped} files dropped)",
    )

    # Diagnosis: the same without background prefetch.
    if "--no-prefetch" in mount_help:
        cache_np = run_dir / "cache-noprefetch"
        cold_np = mount_and_run(esgz_ref, mnt, cache_np, "--no-prefetch")
        res.add(
            "(2b) cold mount --no-prefetch + workload",
            f"{cold_np.total:.3f} s",
            f"mount {cold_np.ready:.3f} + run {cold_np.first:.3f}; "
            f"{sum(fetched_bytes(cold_np.stats)) / 1e6:.2f} MB fetched",
        )
        umount(mnt)
        warm_np = mount_and_run(esgz_ref, mnt, cache_np, "--no-prefetch")
        res.add(
            "(3b) warm remount --no-prefetch + workload",
            f"{warm_np.total:.3f} s",
            f"mount {warm_np.ready:.3f} + run {warm_np.first:.3f}; "
            f"ratio to (4) {warm_np.first / local_first:.2f}x; "
            f"{sum(fetched_bytes(warm_np.stats)) / 1e6:.2f} MB fetched",
        )
        umount(mnt)

    if args.no_synthetic:
        note("synthetic layer skipped (--no-synthetic)")
        return
    try:
        synthetic(work, reg, run_dir, mounts, args.entries, res)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        res.add(f"synthetic {args.entries:,} entries", "FAILED", str(e)[:200])


def synthetic(
    work: Path, reg: Registry, run_dir: Path, mounts: list[Path], entries: int, res: Results
) -> None:
    t = time.monotonic()
    blob = synthetic_blob(work, entries)
    note(f"synthetic blob {blob.size / 1e6:.1f} MB ({time.monotonic() - t:.1f} s)")
    ref = reg.push(
        img.write_oci_layout(work / "oci" / "synthetic", [blob], "bench"),
        "bench",
        f"{SYNTH_REPO}:{entries}",
    )
    smnt = run_dir / "mnt-synthetic"
    mounts.append(smnt)
    scache = run_dir / "cache-synthetic"
    s_ready = mount(ref, smnt, scache)
    s_rss, s_hwm = daemon_rss(smnt)
    res.add(
        f"synthetic {entries:,} entries: mount (cold)",
        f"{s_ready:.2f} s",
        f"TOC-only blob {blob.size / 1e6:.1f} MB",
    )
    res.add(
        "    daemon RSS after mounting", f"{s_rss:.0f} MB", verdict(s_rss < 400, "target <400 MB")
    )
    res.add(
        "    daemon peak RSS (VmHWM, index build)",
        f"{s_hwm:.0f} MB",
        verdict(s_hwm < 400, "target <400 MB"),
    )
    t0 = time.perf_counter()
    n = len(os.listdir(smnt / "usr" / "lib"))
    res.add("    listdir usr/lib", f"{time.perf_counter() - t0:.3f} s", f"{n} entries")
    umount(smnt)
    s_ready2 = mount(ref, smnt, scache)
    s_rss2, s_hwm2 = daemon_rss(smnt)
    res.add(
        "    remount (index cached)",
        f"{s_ready2:.2f} s",
        f"RSS {s_rss2:.0f} MB, peak {s_hwm2:.0f} MB",
    )
    umount(smnt)


if __name__ == "__main__":
    main()
