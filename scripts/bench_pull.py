#!/usr/bin/env python3
"""Benchmark ``stargzfs pull`` against ``skopeo copy`` + GNU tar, side by side, in one run.

Uses the benchmark image of ``scripts/bench_image.py`` (a Debian bookworm minbase rootfs from
debootstrap, python3 installed with apt in a chroot, a small app layer with a 100 MiB file;
built once under ``--image-work`` and reused) as three plain gzip layers in an OCI layout,
pushes it with skopeo to a local ``docker-registry`` (the tests' harness), then
times, each in a fresh process:

* ``stargzfs pull --format rootfs`` with a cold blob cache;
* the same again with the warm cache (repeat pull);
* ``stargzfs pull --format oci`` (cold cache);
* ``skopeo copy docker://… oci:…`` followed by extracting the layers bottom to top with GNU
  tar (``--same-owner -p --xattrs``) and applying OCI whiteouts;
* ``skopeo copy docker://… oci:…`` alone.

Each runs ``--repeat`` times; the fastest wall time is reported (the registry's blob files
are in the page cache for every contender). Output trees go to ``--workdir`` (default
/dev/shm, so the VM's disk isn't what gets measured).

Usage: scripts/bench_pull.py [--repeat 2] [--jobs 4] [--workdir DIR] [--keep] [--link-mbit N]
                             [--image-work DIR]

With ``--link-mbit N`` every pull goes through a throttled TCP link (all connections share
N Mbit/s), which is what makes the warm-cache repeat pull worth measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

from bench_link import ThrottledLink  # noqa: E402


def build_layout(root: Path, work: Path) -> tuple[Path, int, int, int]:
    """The benchmark image of ``scripts/bench_image.py`` (Debian minbase, python3, a small app
    with a 100 MiB file) as plain gzip layers in an OCI layout (tag v1); built once under
    ``work`` and reused. Returns (layout, layers, compressed bytes, uncompressed bytes)."""
    import bench_image as img

    tars = img.build_layer_tars(work)
    blobs = [img.gzip_blob(work, name, tars[name]) for name in img.LAYER_NAMES]
    img.write_oci_layout(root, blobs, "v1")
    uncomp = sum(tars[name].stat().st_size for name in img.LAYER_NAMES)
    return root, len(blobs), sum(b.size for b in blobs), uncomp


def apply_whiteouts(root: Path) -> None:
    """OCI whiteouts after a plain tar extraction of one layer."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if not name.startswith(".wh."):
                continue
            d = Path(dirpath)
            (d / name).unlink()
            if name == ".wh..wh..opq":
                continue  # (needs layer awareness; the generated image has none)
            target = d / name[4:]
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()


def skopeo_and_tar(ref: str, out: Path, extract: bool) -> None:
    layout = out.with_name(out.name + "-oci")
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://{ref}",
            f"oci:{layout}:v1",
        ],
        check=True,
    )
    if not extract:
        return
    index = json.loads((layout / "index.json").read_text())
    mdigest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs/sha256" / mdigest).read_text())
    out.mkdir()
    for lay in manifest["layers"]:
        blob = layout / "blobs/sha256" / lay["digest"].split(":")[1]
        subprocess.run(
            [
                "tar",
                "-C",
                str(out),
                "--same-owner",
                "-p",
                "--xattrs",
                "--xattrs-include=*",
                "--numeric-owner",
                "-xzf",
                str(blob),
            ],
            check=True,
        )
        apply_whiteouts(out)


def stargzfs_pull(ref: str, out: Path, fmt: str, cache: Path, jobs: int) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "stargzfs",
            "pull",
            ref,
            str(out),
            "--format",
            fmt,
            "-q",
            "--cache-dir",
            str(cache),
            "--jobs",
            str(jobs),
        ],
        check=True,
        cwd=REPO,
    )


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_inflaters(blobs: list[Path]) -> None:
    """Decompress (and hash, as the pull does) the image's layers with each gzip backend."""
    code = (
        f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
        "from stargzfs.formats.layer_stream import Decompressor, gzip_backend\n"
        "t = time.perf_counter(); n = 0\n"
        "for path in sys.argv[1:]:\n"
        "    with open(path, 'rb') as f:\n"
        "        d = Decompressor(f, 'gzip', hash_output=True)\n"
        "        while b := d.read(1 << 20): n += len(b)\n"
        "print(gzip_backend()[0], n, time.perf_counter() - t)\n"
    )
    print("gzip backends (decompress + sha256 of the output, one core):")
    for backend in ("zlib", "zlib-ng", "isal"):
        env = {**os.environ, "STARGZFS_GZIP": backend}
        res = subprocess.run(
            [sys.executable, "-c", code, *map(str, blobs)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        name, n, secs = res.stdout.split()
        if name != backend:
            print(f"  {backend:8} not installed")
            continue
        print(f"  {backend:8} {float(secs):6.2f}s  {int(n) / float(secs) / 1e6:7.0f} MB/s")


def timed(fn: Callable[[], None], setup: Callable[[], None], repeat: int) -> tuple[float, float]:
    """(fastest wall seconds, CPU seconds of that run: user+sys, all processes)."""
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        setup()
        c = _cpu()
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
        if wall < best[0]:
            best = (wall, _cpu() - c)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--workdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--link-mbit",
        type=float,
        default=0,
        help="pull through a throttled link of this many Mbit/s (0: direct, loopback speed)",
    )
    ap.add_argument(
        "--image-work",
        type=Path,
        default=Path("/var/tmp/stargzfs-bench"),
        help="where scripts/bench_image.py builds (and caches) the image",
    )
    args = ap.parse_args()

    from harness import start_registry

    work = Path(tempfile.mkdtemp(prefix="bench-pull-", dir=args.workdir))
    reg = start_registry("none", base_dir=work)
    try:
        t = time.perf_counter()
        layout, nlayers, comp, uncomp = build_layout(work / "layout", args.image_work)
        ref = reg.push_oci(layout, "v1", "bench/debian-python:v1")
        print(
            f"image: Debian minbase + python3 + app, {nlayers} gzip layers, "
            f"{comp / 1e6:.0f} MB compressed, "
            f"{uncomp / 1e6:.0f} MB uncompressed (built and pushed in "
            f"{time.perf_counter() - t:.1f}s); {os.cpu_count()} CPUs"
        )
        bench_inflaters(
            [p for p in (layout / "blobs/sha256").iterdir() if p.stat().st_size > 1 << 20]
        )
        if args.link_mbit:
            link = ThrottledLink(reg.host, args.link_mbit * 1e6 / 8)
            ref = ref.replace(reg.host, link.host)
            print(f"pulling through a {args.link_mbit:g} Mbit/s link")
        out = work / "out"
        cache = work / "cache"

        def clean(cold: bool = True) -> Callable[[], None]:
            def run() -> None:
                for p in work.glob("out*"):
                    shutil.rmtree(p, ignore_errors=True)
                if cold:
                    shutil.rmtree(cache, ignore_errors=True)

            return run

        results: dict[str, tuple[float, float]] = {}
        results["stargzfs pull rootfs (cold cache)"] = timed(
            lambda: stargzfs_pull(ref, out, "rootfs", cache, args.jobs), clean(), args.repeat
        )
        clean()()
        stargzfs_pull(ref, out, "rootfs", cache, args.jobs)  # warm the cache
        results["stargzfs pull rootfs (warm cache)"] = timed(
            lambda: stargzfs_pull(ref, out, "rootfs", cache, args.jobs),
            clean(cold=False),
            args.repeat,
        )
        results["stargzfs pull oci (cold cache)"] = timed(
            lambda: stargzfs_pull(ref, out, "oci", cache, args.jobs), clean(), args.repeat
        )
        results["skopeo copy oci + GNU tar extract"] = timed(
            lambda: skopeo_and_tar(ref, out, True), clean(), args.repeat
        )
        results["skopeo copy oci (no extract)"] = timed(
            lambda: skopeo_and_tar(ref, out, False), clean(), args.repeat
        )
        base, base_cpu = results["skopeo copy oci + GNU tar extract"]
        width = max(len(k) for k in results)
        print(
            f"{'contender':<{width}}  {'wall s':>7}  {'cpu s':>6}  "
            f"{'wall vs skopeo+tar':>18}  {'cpu vs skopeo+tar':>17}"
        )
        for name, (secs, cpu) in results.items():
            print(
                f"{name:<{width}}  {secs:7.2f}  {cpu:6.2f}  {base / secs:17.2f}x  "
                f"{base_cpu / max(cpu, 1e-9):16.2f}x"
            )
        cold = results["stargzfs pull rootfs (cold cache)"][0]
        warm = results["stargzfs pull rootfs (warm cache)"][0]
        print(f"rootfs warm/cold speedup (wall): {cold / warm:.2f}x")
        rootfs_ratio = base / cold
        verdict = "MET" if rootfs_ratio >= 1.5 else "MISSED"
        print(f"target rootfs pull >= 1.5x faster than skopeo+tar: {rootfs_ratio:.2f}x {verdict}")
        verdict = "MET" if cold / warm >= 5 else "MISSED"
        print(f"target warm repeat pull >= 5x faster than cold: {cold / warm:.2f}x {verdict}")
        oci_ratio = (
            results["skopeo copy oci (no extract)"][0]
            / results["stargzfs pull oci (cold cache)"][0]
        )
        print(f"oci: stargzfs vs skopeo copy (wall): {oci_ratio:.2f}x")
        with open("/proc/loadavg") as f:
            print(f"load average at the end: {f.read().split()[0]} (shared machine: see cpu)")
    finally:
        reg.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
