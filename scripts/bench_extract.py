"""Time applying layer tars with LayerApplier (and GNU tar, and bare tar readers) into /dev/shm.

    .venv/bin/python scripts/bench_extract.py [--runs 5] [TAR ...]

Default tars: /var/tmp/stargzfs-bench/layers/{base,python,app}.tar, applied in that order.
Prints the best and median wall time of each way over ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stargzfs.pull.extract import LayerApplier

DEFAULT = [f"/var/tmp/stargzfs-bench/layers/{n}.tar" for n in ("base", "python", "app")]


def _applier(tars: list[str], dest: str) -> None:
    with LayerApplier(dest) as applier:
        for i, path in enumerate(tars):
            with open(path, "rb", buffering=0) as f:
                applier.apply(f, f"layer {i}")
        applier.finish()


def _gnu_tar(tars: list[str], dest: str) -> None:
    for path in tars:
        subprocess.run(["tar", "-xf", path, "-C", dest], check=True)


def _tarfile_read(tars: list[str], dest: str) -> None:
    for path in tars:
        with open(path, "rb", buffering=0) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if m.isreg() and m.size:
                    src = tar.extractfile(m)
                    assert src is not None
                    while src.read(1 << 20):
                        pass


def _tarstream_read(tars: list[str], dest: str) -> None:
    from stargzfs.pull.tarstream import TarReader

    for path in tars:
        with open(path, "rb", buffering=0) as f:
            reader = TarReader(f)
            while (m := reader.next()) is not None:
                if m.size:
                    reader.skip_data()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default="")
    ap.add_argument("tars", nargs="*", default=DEFAULT)
    args = ap.parse_args()
    ways: dict[str, Callable[[list[str], str], None]] = {
        "LayerApplier.apply": _applier,
        "GNU tar -x": _gnu_tar,
        "tarfile read only": _tarfile_read,
        "tarstream read only": _tarstream_read,
    }
    for label, fn in ways.items():
        if args.only and args.only not in label:
            continue
        times = []
        for _ in range(args.runs):
            dest = tempfile.mkdtemp(prefix="bench-extract-", dir="/dev/shm")
            try:
                t0 = time.perf_counter()
                fn(args.tars, dest)
                times.append(time.perf_counter() - t0)
            finally:
                subprocess.run(["chmod", "-R", "u+rwx", dest], check=False)
                shutil.rmtree(dest, ignore_errors=True)
        print(
            f"{label:22s} best {min(times):.3f} s  median {statistics.median(times):.3f} s"
            f"  ({len(times)} runs)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    raise SystemExit(main())
