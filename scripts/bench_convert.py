#!/usr/bin/env python3
"""Benchmark ``convert_layer`` against plain gzip on a synthetic ~200 MB layer.

Builds a deterministic layer tar (many small files, a few big ones; compressible text and
incompressible random data), converts it to eStargz in a fresh process (so the peak RSS is the
converter's own, read from VmHWM), and times on the same input, for scale:

* ``gzip -c -L`` (``zstd -c -L -T1`` with ``--format zstd:chunked``): the binary, one core,
  same level;
* Python ``tarfile`` + ``gzip``: re-tarring every member into a ``w:gz`` archive, the naive
  single-threaded Python way of producing a plain tar.gz.

Each command runs ``--repeat`` times and the fastest run is reported with its CPU seconds
(user+sys): on a shared machine wall times are noisy, CPU times much less so. The work
directory defaults to /dev/shm so the VM's disk is not what gets measured.

Usage: scripts/bench_convert.py [--size-mb 200] [--level 6] [--workers N] [--repeat 3]
                                [--min-chunk-size N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent

# Runs in a child process: only the conversion, then its own high-water mark.
_CONVERT_CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from stargzfs.convert import convert_layer
src, dst, level, workers, min_chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), \\
    (int(sys.argv[4]) or None), int(sys.argv[5])
layer_format = sys.argv[6]
t = time.perf_counter()
with open(src, "rb") as f, open(dst, "wb") as out:
    r = convert_layer(f, out, compression_level=level, workers=workers,
                      min_chunk_size=min_chunk, layer_format=layer_format)
elapsed = time.perf_counter() - t
hwm = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1]) * 1024
print(json.dumps({{"seconds": elapsed, "rss_peak": hwm, "result": r.to_dict()}}))
"""

_TARFILE_CHILD = """
import sys, tarfile, time
t = time.perf_counter()
with tarfile.open(sys.argv[1], "r:") as src, \\
        tarfile.open(sys.argv[2], "w:gz", compresslevel=int(sys.argv[3])) as dst:
    for ti in src:
        dst.addfile(ti, src.extractfile(ti) if ti.isreg() else None)
print(time.perf_counter() - t)
"""


def build_layer(path: Path, size_mb: int, seed: int = 1) -> dict[str, int]:
    """A layer tar of about ``size_mb`` MB; the same bytes for the same arguments."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
        for _ in range(5000)
    ]
    # A text corpus larger than deflate's 32 KiB window, so files compress like real text
    # (about 3:1) rather than like one repeated block.
    lines = []
    size = 0
    while size < 8 << 20:
        line = " ".join(rng.choices(words, k=rng.randint(3, 14))) + "\n"
        lines.append(line)
        size += len(line)
    corpus = "".join(lines).encode()

    def text(n: int) -> bytes:
        start = rng.randrange(0, len(corpus) - n) if n < len(corpus) else 0
        return (corpus * (1 + n // len(corpus)))[start : start + n]

    target = size_mb << 20
    big = [
        ("text", target // 8),
        ("random", target // 8),
        ("text", target // 16),
        ("random", target // 16),
    ]
    small_budget = target - sum(n for _, n in big)
    stats = {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0}

    def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        ti.mode = 0o644
        ti.mtime = 1_700_000_000
        tf.addfile(ti, _BytesReader(data))
        stats["files"] += 1
        stats["bytes"] += len(data)

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        used = 0
        d = 0
        while used < small_budget:
            dname = f"usr/share/pkg{d:04d}"
            ti = tarfile.TarInfo(dname)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            tf.addfile(ti)
            stats["dirs"] += 1
            for i in range(rng.randint(10, 60)):
                n = int(rng.lognormvariate(8.3, 1.2))  # median ~4 KB, long tail
                n = min(n, 512 << 10)
                data = rng.randbytes(n) if rng.random() < 0.25 else text(n)
                add(tf, f"{dname}/file{i:03d}", data)
                used += n
                if rng.random() < 0.1:
                    ln = tarfile.TarInfo(f"{dname}/link{i:03d}")
                    ln.type = tarfile.SYMTYPE
                    ln.linkname = f"file{i:03d}"
                    tf.addfile(ln)
                    stats["symlinks"] += 1
            d += 1
        for k, (kind, n) in enumerate(big):
            add(tf, f"opt/big/blob{k}.{kind}", text(n) if kind == "text" else rng.randbytes(n))
    stats["tar_bytes"] = path.stat().st_size
    return stats


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        out = bytes(self._data[self._pos : end])
        self._pos += len(out)
        return out


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def best_of(repeat: int, run: Callable[[], T]) -> tuple[float, float, T]:
    """(fastest wall seconds, CPU seconds of that run, its value)."""
    best: tuple[float, float, T] | None = None
    for _ in range(repeat):
        cpu = _children_cpu()
        t = time.perf_counter()
        value = run()
        wall = time.perf_counter() - t
        cpu = _children_cpu() - cpu
        if best is None or wall < best[0]:
            best = (wall, cpu, value)
    assert best is not None
    return best


def run_ours(
    tar: Path, out: Path, level: int, workers: int, min_chunk: int, layer_format: str
) -> dict[str, Any]:
    argv = [sys.executable, "-c", _CONVERT_CHILD.format(repo=str(REPO)), str(tar), str(out)]
    argv += [str(level), str(workers), str(min_chunk), layer_format]
    proc = subprocess.run(argv, check=True, capture_output=True, text=True)
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def run_plain(tool: str, tar: Path, out: Path, level: int) -> None:
    with open(tar, "rb") as src, open(out, "wb") as dst:
        argv = [tool, "-c", f"-{level}"] + (["-q", "-T1"] if tool == "zstd" else [])
        subprocess.run(argv, stdin=src, stdout=dst, check=True)


def run_tarfile(tar: Path, out: Path, level: int) -> None:
    argv = [sys.executable, "-c", _TARFILE_CHILD, str(tar), str(out), str(level)]
    subprocess.run(argv, check=True, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--level", type=int, default=None, help="default 6 (gzip), 3 (zstd)")
    ap.add_argument("--format", default="estargz", choices=("estargz", "zstd:chunked"))
    ap.add_argument("--workers", type=int, default=0, help="0 = library default (usable CPUs)")
    ap.add_argument("--min-chunk-size", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    default_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
    ap.add_argument("--workdir", default=default_dir)
    args = ap.parse_args()
    zstd = args.format == "zstd:chunked"
    level = args.level if args.level is not None else 3 if zstd else 6
    rep = args.repeat
    fmt = args.format

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-convert-") as tmp:
        work = Path(tmp)
        tar = work / "layer.tar"
        t = time.perf_counter()
        stats = build_layer(tar, args.size_mb)
        mb = stats["tar_bytes"] / 1e6
        print(
            f"input: {mb:.1f} MB tar, {stats['files']} files ({stats['bytes'] / 1e6:.1f} MB), "
            f"{stats['dirs']} dirs, {stats['symlinks']} symlinks "
            f"(built in {time.perf_counter() - t:.1f} s in {work.parent}); "
            f"{os.cpu_count()} CPUs, {fmt} level {level}, best of {rep}"
        )

        out = work / "out.esgz"
        secs, cpu, ours = best_of(
            rep, lambda: run_ours(tar, out, level, args.workers, args.min_chunk_size, fmt)
        )
        blob = int(ours["result"]["blob_size"])
        rss = int(ours["rss_peak"])
        print(
            f"convert_layer: {secs:.2f} s ({cpu:.2f} s CPU), {mb / secs:.1f} MB/s, "
            f"peak RSS {rss / 2**20:.0f} MiB, blob {blob / 1e6:.1f} MB "
            f"({blob / stats['tar_bytes']:.3f} of input)"
        )
        if args.workers != 1:
            one = work / "one.esgz"
            s1, c1, _ = best_of(rep, lambda: run_ours(tar, one, level, 1, args.min_chunk_size, fmt))
            same = one.read_bytes() == out.read_bytes()
            one.unlink()
            print(
                f"convert_layer, 1 worker: {s1:.2f} s ({c1:.2f} s CPU), {mb / s1:.1f} MB/s; "
                f"parallel speed-up x{s1 / secs:.2f}, identical output: {same}"
            )

        tool = "zstd" if zstd else "gzip"
        if shutil.which(tool) is not None:
            gz_out = work / "plain.out"
            gz, gz_cpu, _ = best_of(rep, lambda: run_plain(tool, tar, gz_out, level))
            size = gz_out.stat().st_size
            gz_out.unlink()
            print(
                f"{tool} -c -{level}: {gz:.2f} s ({gz_cpu:.2f} s CPU), {mb / gz:.1f} MB/s, "
                f"{size / 1e6:.1f} MB; convert_layer: x{secs / gz:.2f} its time, "
                f"x{cpu / gz_cpu:.2f} its CPU, x{blob / size:.3f} its size"
            )
        if zstd:
            return 0  # tarfile has no zstd writer in Python 3.11
        tf_out = work / "tarfile.tar.gz"
        tf, tf_cpu, _ = best_of(rep, lambda: run_tarfile(tar, tf_out, level))
        size = tf_out.stat().st_size
        print(
            f"python tarfile+gzip: {tf:.2f} s ({tf_cpu:.2f} s CPU), {mb / tf:.1f} MB/s, "
            f"{size / 1e6:.1f} MB; convert_layer: x{secs / tf:.2f} its time"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
