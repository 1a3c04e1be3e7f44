#!/usr/bin/env python3
"""Benchmark: load the index of a layer with N (default 1,000,000) entries.

By default the layer is made **with our writer**: a tar stream of N entries shaped like a
real rootfs (directories of ~50 entries, mostly empty files, small files, some symlinks and
hardlinks, a few files of several chunks) is generated on the fly (never a tree on disk, never
the whole tar in memory or on disk) and piped into ``stargzfs.convert.convert_layer``; its
TOC is then taken out of the blob. With ``--synthetic`` the TOC JSON is generated directly
instead (no writer; files with digests, offsets, modes, times, multi-chunk files).

Then, in a fresh child process per measurement:

* ``memory``: index built in memory (what ``stargzfs ls`` does without a cache dir);
* ``file``: index built into a file in a cache dir (what the mount does the first time);
* ``reopen``: the persisted index opened again (every later mount of the same layer);
* ``blob``: from an eStargz blob through ``load_index`` into a cache dir, TOC streamed out
  of its gzip member (exactly what the mount does on first use).

For each it prints load time and resident memory beyond what the process held with the
raw TOC JSON in hand (the issue's budget: at most 200 bytes per entry), then lookup and
listing speed. Run: ``python scripts/bench_index.py [--entries N] [--synthetic] [--modes
memory,file]``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import threading
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


BIG_FILE = 10 * 1024 * 1024 + 17  # 3 chunks at the writer's default 4 MiB
BIG_FILES = 8  # "a few chunks": spread over the layer


def write_tar(n: int, out: io.BufferedWriter, sample: list[str], seed: int = 1) -> int:
    """A layer tar of exactly n entries, streamed to ``out``; fills ``sample`` with paths.

    Mostly empty files (the bulk of a real rootfs by count), small files of a few hundred
    bytes, 5 % symlinks, 1 % hardlinks, directories of ~50 entries and BIG_FILES files of
    several chunks. Returns the payload bytes written.
    """
    rnd = random.Random(seed)
    payload = 0
    noise = random.Random(seed + 1).randbytes(1 << 20)
    mtime = 1_704_067_200  # 2024-01-01
    big_at = {max(1, (k + 1) * n // (BIG_FILES + 1)) for k in range(BIG_FILES)}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:

        def add(name: str, kind: bytes, size: int = 0, link: str = "", mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname, info.mode, info.mtime = (
                kind,
                size,
                link,
                mode,
                mtime,
            )
            info.uname = info.gname = "root"
            data = None
            if size:
                data = io.BytesIO((noise * (size // len(noise) + 1))[:size])
            tar.addfile(info, data)

        dirs = ["usr", "usr/lib", "usr/share"]
        for d in dirs:
            add(d, tarfile.DIRTYPE, mode=0o755)
        count, i = len(dirs), 0
        while count < n:
            if i % 50 == 0:
                d = f"{rnd.choice(dirs)}/pkg-{i // 50:06d}"
                dirs.append(d)
                add(d, tarfile.DIRTYPE, mode=0o755)
                count += 1
                if count >= n:
                    break
            name = f"{dirs[-1]}/file-{i:07d}.{rnd.choice(['py', 'so', 'txt', 'h', 'json'])}"
            r = rnd.random()
            if count in big_at:
                add(name, tarfile.REGTYPE, BIG_FILE)
                payload += BIG_FILE
            elif r < 0.05:
                add(name, tarfile.SYMTYPE, link="../target", mode=0o777)
            elif r < 0.06 and sample:
                add(name, tarfile.LNKTYPE, link=sample[-1])
            else:
                size = rnd.randint(1, 400) if r < 0.30 else 0
                add(name, tarfile.REGTYPE, size)
                payload += size
                if len(sample) < 10000 and rnd.random() < 0.05:
                    sample.append(name)
            count += 1
            i += 1
    return payload


def build_with_writer(n: int, tmp: str) -> tuple[str, list[str], dict[str, str]]:
    """Our eStargz blob of a generated n-entry tar (piped, never on disk), its TOC JSON in a
    file next to it; returns the TOC path, sampled file paths and the blob's annotations."""
    import trio

    from stargzfs.convert import convert_layer
    from stargzfs.formats.layer import fetch_toc
    from stargzfs.source import FileSource

    toc_path = os.path.join(tmp, "toc.json")
    blob_path = toc_path + ".esgz"
    sample: list[str] = []
    r, w = os.pipe()
    produced: dict[str, int] = {}
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(w, "wb", buffering=1 << 20) as f:
                produced["payload"] = write_tar(n, f, sample)
        except BrokenPipeError:
            pass  # the converter stopped reading: its error is the one reported
        except BaseException as e:  # reported by the main thread
            failure.append(e)

    t0 = time.perf_counter()
    thread = threading.Thread(target=produce, name="tar-generator")
    thread.start()
    try:
        with os.fdopen(r, "rb", buffering=1 << 20) as src, open(blob_path, "wb") as dst:
            result = convert_layer(src, dst)
    finally:
        thread.join()
    if failure:
        raise failure[0]
    convert_s = time.perf_counter() - t0
    source = FileSource(blob_path)
    raw = trio.run(fetch_toc, source, result.annotations)
    with open(toc_path, "wb") as f:
        for piece in raw.pieces():
            f.write(piece)
    source.close()
    print(
        f"layer: {n:,} entries written by convert_layer in {convert_s:.1f} s "
        f"({produced.get('payload', 0) / 1e6:.0f} MB of file data): blob "
        f"{result.blob_size / 1e6:.1f} MB, TOC {os.path.getsize(toc_path) / 1e6:.0f} MB JSON"
    )
    return toc_path, sample, result.annotations


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

        annotations: dict[str, str] = {}
        if os.path.exists(toc_path + ".annotations.json"):
            with open(toc_path + ".annotations.json") as f:
                annotations = json.load(f)  # a verified layer, as a mount sees it
        base = rss_kib()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        t0 = time.perf_counter()
        source = FileSource(toc_path + ".esgz")
        index = trio.run(
            lambda: load_index(source, annotations, cache_dir=cache, blob_digest="sha256:x")
        )
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
    ap.add_argument(
        "--synthetic",
        action="store_true",
        help="generate the TOC JSON directly instead of writing the layer with convert_layer",
    )
    ap.add_argument(
        "--modes",
        default="memory,file,reopen,blob",
        help="comma-separated modes to measure (reopen needs file before it)",
    )
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"memory", "file", "reopen", "blob"}
    if unknown or ("reopen" in modes and "file" not in modes[: modes.index("reopen")]):
        sys.exit(f"--modes {args.modes!r}: unknown mode, or reopen without file before it")
    with tempfile.TemporaryDirectory() as tmp:
        sample_path = os.path.join(tmp, "sample.json")
        if args.synthetic:
            t0 = time.perf_counter()
            toc, sample = make_toc(args.entries)
            toc_path = os.path.join(tmp, "toc.json")
            with open(toc_path, "wb") as f:
                f.write(toc)
            print(
                f"TOC: {args.entries:,} entries, {len(toc) / 1e6:.0f} MB JSON "
                f"(generated in {time.perf_counter() - t0:.1f} s)"
            )
            del toc
            write_blob(toc_path)
        else:
            toc_path, sample, annotations = build_with_writer(args.entries, tmp)
            with open(toc_path + ".annotations.json", "w") as f:
                json.dump(annotations, f)
        with open(sample_path, "w") as f:
            json.dump(sample[:2000], f)
        print(
            f"{'mode':<8} {'load s':>7} {'RSS +MB':>8} {'B/entry':>8} {'peak +MB':>9} "
            f"{'µs/name':>8} {'index MB':>9}"
        )
        for mode in modes:
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
