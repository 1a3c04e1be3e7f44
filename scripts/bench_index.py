#!/usr/bin/env python3
"""Benchmark: load the index of a layer with N (default 1,000,000) entries.

Builds an eStargz blob whose TOC has N entries shaped like a real rootfs (directories of
~50 entries, files with digests, offsets, modes, times; some symlinks, hardlinks and
multi-chunk files), then, in a fresh child process per measurement:

* ``memory``: index built in memory (what ``stargzfs ls`` does without a cache dir);
* ``file``: index built into a file in a cache dir (what the mount does the first time);
* ``reopen``: the persisted index opened again (every later mount of the same layer);
* ``blob``: from an eStargz blob through ``load_index`` into a cache dir, TOC streamed out
  of its gzip member (exactly what the mount does on first use).

For each it prints load time and resident memory beyond what the process held with the
raw TOC JSON in hand (the issue's budget: at most 200 bytes per entry), then lookup and
listing speed. Run: ``python scripts/bench_index.py [--entries N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def rss_kib(field: str = "VmRSS") -> int:
    """Resident set (or, with VmHWM, its high-water mark) of this process, in KiB.

    VmHWM is per address space, so unlike ru_maxrss it does not inherit the parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def make_toc(n: int, seed: int = 1) -> tuple[bytes, list[str]]:
    """A TOC document with n entries; returns it and a sample of file paths."""
    rnd = random.Random(seed)
    entries: list[dict[str, object]] = []
    offset = 100
    sample: list[str] = []
    dirs = ["usr", "usr/lib", "usr/share"]
    for d in dirs:
        entries.append(
            {"name": d + "/", "type": "dir", "mode": 0o755, "modtime": "2024-01-01T00:00:00Z"}
        )
    i = 0
    while len(entries) < n:
        if i % 50 == 0:
            parent = rnd.choice(dirs)
            d = f"{parent}/pkg-{i // 50:06d}"
            dirs.append(d)
            entries.append(
                {"name": d + "/", "type": "dir", "mode": 0o755, "modtime": "2024-01-01T00:00:00Z"}
            )
        d = dirs[-1]
        name = f"{d}/file-{i:07d}.{rnd.choice(['py', 'so', 'txt', 'h', 'json'])}"
        r = rnd.random()
        digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
        if r < 0.05:
            entries.append(
                {
                    "name": name,
                    "type": "symlink",
                    "linkName": "../target",
                    "mode": 0o777,
                    "modtime": "2024-01-01T00:00:00Z",
                }
            )
        elif r < 0.06 and sample:
            entries.append(
                {
                    "name": name,
                    "type": "hardlink",
                    "linkName": sample[-1],
                    "mode": 0o644,
                    "modtime": "2024-01-01T00:00:00Z",
                }
            )
        elif r < 0.065:
            size = 10 * 4 * 1024 * 1024 + 17
            entries.append(
                {
                    "name": name,
                    "type": "reg",
                    "size": size,
                    "mode": 0o644,
                    "modtime": "2024-01-01T00:00:00Z",
                    "offset": offset,
                    "digest": digest,
                    "chunkSize": 4194304,
                    "chunkDigest": digest,
                }
            )
            offset += 1000
            for c in range(1, 11):
                if len(entries) >= n:
                    break
                entries.append(
                    {
                        "name": name,
                        "type": "chunk",
                        "offset": offset,
                        "chunkOffset": c * 4194304,
                        "chunkSize": 4194304 if c < 10 else 0,
                        "chunkDigest": digest,
                    }
                )
                offset += 1000
        else:
            size = rnd.randint(1, 40000)
            entries.append(
                {
                    "name": name,
                    "type": "reg",
                    "size": size,
                    "mode": 0o644,
                    "modtime": "2024-01-01T00:00:00Z",
                    "offset": offset,
                    "digest": digest,
                    "chunkDigest": digest,
                }
            )
            offset += size // 3 + 50
            if len(sample) < 10000 and rnd.random() < 0.05:
                sample.append(name)
        i += 1
    entries = entries[:n]
    return json.dumps({"version": 1, "entries": entries}, separators=(",", ":")).encode(), sample


def write_blob(toc_path: str) -> None:
    """A TOC-only eStargz blob (TOC member + footer) of the generated TOC, for "blob" mode."""
    import gzip
    import io
    import re
    import tarfile

    from stargzfs.formats.footer import estargz_footer

    with open(toc_path, "rb") as f:
        data = f.read()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    # The TOC's payload offsets point below it: a sparse hole (nothing is ever read there).
    toc_offset = max(int(m) for m in re.findall(rb'"offset":(\d+)', data)) + (1 << 20)
    with open(toc_path + ".esgz", "wb") as f:
        f.seek(toc_offset)
        f.write(gzip.compress(buf.getvalue(), compresslevel=6, mtime=0))
        f.write(estargz_footer(toc_offset))


def child(mode: str, toc_path: str, cache: str, sample_path: str) -> None:
    from stargzfs.index.layer_index import LayerIndex

    index_path = os.path.join(cache, "bench.sqlite")
    toc_json = b""
    if mode == "blob":
        # What a mount does: footer, TOC fetched compressed, streamed into a cache file.
        import trio

        from stargzfs.index import load_index
        from stargzfs.source import FileSource

        base = rss_kib()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        t0 = time.perf_counter()
        source = FileSource(toc_path + ".esgz")
        index = trio.run(lambda: load_index(source, {}, cache_dir=cache, blob_digest="sha256:x"))
        load = time.perf_counter() - t0
        print(
            json.dumps(
                {
                    "mode": mode,
                    "entries": index.entry_count,
                    "load_s": load,
                    "rss_base_kib": base,
                    "rss_after_kib": rss_kib(),
                    "peak_kib": rss_kib("VmHWM"),
                    "toc_bytes": 0,
                    "lookup_us": 0.0,
                    "listdir_entries": 0,
                    "listdir_s": 0.0,
                }
            )
        )
        return
    if mode != "reopen":
        with open(toc_path, "rb") as f:
            toc_json = f.read()
    base = rss_kib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    if mode == "reopen":
        index = LayerIndex.open(index_path)
    else:
        index = LayerIndex.build(
            toc_json,
            format="estargz",
            compression="gzip",
            toc_offset=1 << 50,
            path=index_path if mode == "file" else None,
        )
    load = time.perf_counter() - t0
    after = rss_kib()
    peak = rss_kib("VmHWM")
    with open(sample_path) as f:
        sample = json.load(f)
    t0 = time.perf_counter()
    for p in sample:
        assert index.resolve(p) is not None, p
    depth = sum(p.count("/") + 1 for p in sample)
    lookup_us = (time.perf_counter() - t0) / depth * 1e6
    t0 = time.perf_counter()
    root = index.resolve("usr/lib")
    assert root is not None
    listed = sum(1 for _ in index.children(root.id))
    list_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "mode": mode,
                "entries": index.entry_count,
                "load_s": load,
                "rss_base_kib": base,
                "rss_after_kib": after,
                "peak_kib": peak,
                "toc_bytes": len(toc_json),
                "lookup_us": lookup_us,
                "listdir_entries": listed,
                "listdir_s": list_s,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        toc, sample = make_toc(args.entries)
        toc_path = os.path.join(tmp, "toc.json")
        with open(toc_path, "wb") as f:
            f.write(toc)
        sample_path = os.path.join(tmp, "sample.json")
        with open(sample_path, "w") as f:
            json.dump(sample[:2000], f)
        print(
            f"TOC: {args.entries:,} entries, {len(toc) / 1e6:.0f} MB JSON "
            f"(generated in {time.perf_counter() - t0:.1f} s)"
        )
        del toc
        print(
            f"{'mode':<8} {'load s':>7} {'RSS +MB':>8} {'B/entry':>8} {'peak +MB':>9} "
            f"{'µs/name':>8} {'index MB':>9}"
        )
        write_blob(toc_path)
        for mode in ("memory", "file", "reopen", "blob"):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", mode, toc_path, tmp, sample_path],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                sys.exit(f"{mode}: child failed:\n{proc.stderr}")
            out = proc.stdout
            r = json.loads(out)
            grow = (r["rss_after_kib"] - r["rss_base_kib"]) * 1024
            peak = (r["peak_kib"] - r["rss_base_kib"]) * 1024
            size = (
                os.path.getsize(os.path.join(tmp, "bench.sqlite"))
                if mode in ("file", "reopen")
                else 0
            )
            print(
                f"{mode:<8} {r['load_s']:>7.2f} {grow / 1e6:>8.1f} {grow / r['entries']:>8.0f} "
                f"{peak / 1e6:>9.1f} {r['lookup_us']:>8.1f} {size / 1e6:>9.1f}"
            )


if __name__ == "__main__":
    main()
