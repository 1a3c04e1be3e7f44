#!/usr/bin/env python3
"""Build the benchmark image of ``scripts/bench_mount.py`` from real software.

Everything is cached under ``/var/tmp/stargzfs-bench/`` (``--work``) and reused unless
``--rebuild``:

* ``rootfs/base``: a Debian bookworm minbase rootfs (``debootstrap --variant=minbase``);
* ``rootfs/python``: a copy of it with ``python3`` installed by apt in a chroot (apt lists and
  the package cache removed afterwards, as image builds do);
* ``rootfs/app``: a small app layer (a script and a 100 MiB random file for throughput);
* ``layers/{base,python,app}.tar``: three layer tars; ``python.tar`` is the diff base→python
  computed by walking both trees (new or changed entries; deleted ones as ``.wh.NAME``);
* ``blobs/``: per layer a plain gzip blob and eStargz blobs (converted with
  :func:`stargzfs.convert.convert_layer`, with or without prioritized files);
* ``oci/<variant>``: OCI layouts of the image, ready for ``skopeo copy``.

Run alone (``python scripts/bench_image.py [--rebuild]``) it only builds and prints sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEFAULT_WORK = Path("/var/tmp/stargzfs-bench")
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
LAYER_NAMES = ("base", "python", "app")
BIG_FILE = "app/data/random-100M.bin"
BIG_SIZE = 100 * 1024 * 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
WHITEOUT = ".wh."

APP_SCRIPT = """\
#!/usr/bin/python3
\"\"\"stargzfs benchmark app: imports a few modules and reports.\"\"\"
import json
import sys

print(json.dumps({"python": sys.version.split()[0], "ok": True}))
"""


def log(msg: str) -> None:
    print(f"[image] {msg}", flush=True)


def run(cmd: Sequence[str], **kw: object) -> None:
    subprocess.run(list(cmd), check=True, **kw)  # type: ignore[call-overload]


# -- root file systems -----------------------------------------------------------------------


def ensure_debootstrap() -> None:
    """Install Debian's debootstrap package if it is missing (idempotent)."""
    if shutil.which("debootstrap") or os.path.exists("/usr/sbin/debootstrap"):
        return
    log("installing debootstrap with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "debootstrap"], env=env)


def _is_mount(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


@contextlib.contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    """/proc and /dev bind-mounted into ``root`` and the host's resolv.conf copied in; all
    undone afterwards, whatever happens."""
    mounted: list[Path] = []
    resolv = root / "etc" / "resolv.conf"
    saved = resolv.read_bytes() if resolv.is_file() and not resolv.is_symlink() else None
    try:
        for name, args in (("proc", ["-t", "proc", "proc"]), ("dev", ["--bind", "/dev"])):
            target = root / name
            target.mkdir(exist_ok=True)
            run(["mount", *args, str(target)])
            mounted.append(target)
        with contextlib.suppress(OSError):
            resolv.unlink()
        shutil.copyfile("/etc/resolv.conf", resolv)
        yield
    finally:
        for target in reversed(mounted):
            if subprocess.run(["umount", str(target)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(target)], check=False)
        with contextlib.suppress(OSError):
            resolv.unlink()
        if saved is not None:
            resolv.write_bytes(saved)


def clean_apt(root: Path) -> None:
    """Drop downloaded packages and apt lists, as image builds do (``apt-get clean`` and
    ``rm -rf /var/lib/apt/lists/*``); debootstrap keeps every .deb it installed."""
    for d in (root / "var/cache/apt/archives", root / "var/lib/apt/lists"):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.is_file() and p.name != "lock":
                p.unlink()
    for p in (root / "var/cache/apt").glob("*.bin"):
        p.unlink()


def build_base(work: Path) -> Path:
    out = work / "rootfs" / "base"
    if out.is_dir():
        return out
    ensure_debootstrap()
    tmp = out.with_name("base.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    log(f"debootstrap --variant=minbase {SUITE} → {out}")
    t0 = time.monotonic()
    run(["debootstrap", "--variant=minbase", SUITE, str(tmp), MIRROR], stdout=subprocess.DEVNULL)
    clean_apt(tmp)
    tmp.rename(out)
    log(f"debootstrap done in {time.monotonic() - t0:.0f} s")
    return out


def build_python(work: Path, base: Path) -> Path:
    out = work / "rootfs" / "python"
    if out.is_dir():
        return out
    tmp = out.with_name("python.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    log("copying base and installing python3 in a chroot")
    t0 = time.monotonic()
    run(["cp", "-a", str(base), str(tmp)])
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LANG": "C.UTF-8",
        "HOME": "/root",
    }
    with chroot_mounts(tmp):
        run(["chroot", str(tmp), "apt-get", "update", "-qq"], env=env)
        run(
            [
                "chroot",
                str(tmp),
                "apt-get",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "python3",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
        )
    clean_apt(tmp)
    # A common image-build step, and it gives the diff layer whiteouts to carry.
    for doc in sorted((tmp / "usr/share/doc").iterdir()):
        if doc.is_dir() and not doc.is_symlink():
            shutil.rmtree(doc)
    if _is_mount(tmp / "proc") or _is_mount(tmp / "dev"):
        raise RuntimeError(f"{tmp}: chroot mounts still present")
    tmp.rename(out)
    log(f"python3 installed in {time.monotonic() - t0:.0f} s")
    return out


def build_app(work: Path) -> Path:
    out = work / "rootfs" / "app"
    if (out / BIG_FILE).is_file():
        return out
    tmp = out.with_name("app.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "app" / "data").mkdir(parents=True)
    (tmp / "app" / "main.py").write_text(APP_SCRIPT)
    (tmp / "app" / "main.py").chmod(0o755)
    rnd = random.Random(5)
    with open(tmp / BIG_FILE, "wb") as f:
        for _ in range(BIG_SIZE // (1 << 20)):
            f.write(rnd.randbytes(1 << 20))
    tmp.rename(out)
    return out


# -- layer tars ------------------------------------------------------------------------------


def walk(root: Path) -> Iterator[str]:
    """Relative paths under ``root``, parents before children, sorted, without following
    symlinks."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        names = sorted(dirnames + filenames)
        for name in names:
            yield name if rel == "." else f"{rel}/{name}"


def _signature(st: os.stat_result, path: Path) -> tuple[object, ...]:
    link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
    size = st.st_size if stat.S_ISREG(st.st_mode) else 0
    return (st.st_mode, st.st_uid, st.st_gid, size, st.st_mtime_ns, link, rdev)


def tree_diff(old: Path, new: Path) -> tuple[list[str], list[str]]:
    """(paths new or changed in ``new``, top-most paths deleted from ``old``)."""
    old_sig: dict[str, tuple[object, ...]] = {}
    for rel in walk(old):
        p = old / rel
        old_sig[rel] = _signature(p.lstat(), p)
    changed: list[str] = []
    present: set[str] = set()
    for rel in walk(new):
        p = new / rel
        present.add(rel)
        if old_sig.get(rel) != _signature(p.lstat(), p):
            changed.append(rel)
    deleted = []
    for rel in old_sig:
        if rel in present:
            continue
        parent = rel.rpartition("/")[0]
        if parent and parent not in present:
            continue  # a deleted ancestor's whiteout covers it
        deleted.append(rel)
    return changed, deleted


def write_tar(root: Path, paths: Sequence[str], whiteouts: Sequence[str], dst: Path) -> None:
    """A PAX tar of ``paths`` (relative to ``root``, not recursive) plus empty whiteout files
    for ``whiteouts``; numeric owners only."""
    tmp = dst.with_suffix(".partial")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        by_parent: dict[str, list[str]] = {}
        for rel in whiteouts:
            parent, _, base = rel.rpartition("/")
            by_parent.setdefault(parent, []).append(base)

        def add_whiteouts(parent: str) -> None:
            for base in by_parent.pop(parent, []):
                info = tarfile.TarInfo(f"{parent}/{WHITEOUT}{base}" if parent else WHITEOUT + base)
                info.mtime = 0
                tar.addfile(info)

        add_whiteouts("")
        for rel in paths:
            info = tar.gettarinfo(str(root / rel), arcname=rel)
            info.uname = info.gname = ""
            if info.isreg():
                with open(root / rel, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
            if info.isdir():
                add_whiteouts(rel)
        for parent in list(by_parent):
            add_whiteouts(parent)
    tmp.rename(dst)


def build_layer_tars(work: Path, rebuild: bool = False) -> dict[str, Path]:
    """The three layer tars (built from the cached root file systems)."""
    layers = work / "layers"
    tars = {name: layers / f"{name}.tar" for name in LAYER_NAMES}
    if not rebuild and all(p.is_file() for p in tars.values()):
        return tars
    layers.mkdir(parents=True, exist_ok=True)
    base = build_base(work)
    python = build_python(work, base)
    app = build_app(work)
    t0 = time.monotonic()
    write_tar(base, list(walk(base)), [], tars["base"])
    changed, deleted = tree_diff(base, python)
    log(f"base→python: {len(changed)} new/changed, {len(deleted)} deleted")
    write_tar(python, changed, deleted, tars["python"])
    write_tar(app, list(walk(app)), [], tars["app"])
    log(f"layer tars written in {time.monotonic() - t0:.1f} s")
    return tars


def small_app_tar(work: Path) -> Path:
    """The app layer without the 100 MiB file (for a baseline of the runtime image alone)."""
    dst = work / "layers" / "app-small.tar"
    app = build_app(work)
    if not dst.is_file() or dst.stat().st_mtime < (app / "app" / "main.py").stat().st_mtime:
        write_tar(app, ["app", "app/main.py"], [], dst)
    return dst


def layer_members(tar_path: Path) -> dict[str, str]:
    """Member name → kind ("reg", "dir", ...) of a layer tar (cached next to it)."""
    cache = tar_path.with_suffix(".members.json")
    if cache.is_file() and cache.stat().st_mtime >= tar_path.stat().st_mtime:
        members: dict[str, str] = json.loads(cache.read_text())
        return members
    members = {}
    with tarfile.open(tar_path) as tar:
        for info in tar:
            name = info.name.removeprefix("./").rstrip("/")
            kind = "reg" if info.isreg() else "dir" if info.isdir() else "other"
            members[name] = kind
    cache.write_text(json.dumps(members))
    return members


# -- blobs and OCI layouts -------------------------------------------------------------------


@dataclass
class Blob:
    path: Path
    digest: str
    size: int
    diff_id: str
    media_type: str
    annotations: dict[str, str]

    def to_json(self) -> str:
        d = dict(vars(self))
        d["path"] = str(self.path)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> Blob:
        d = json.loads(text)
        d["path"] = Path(d["path"])
        return cls(**d)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
    return "sha256:" + h.hexdigest()


def gzip_blob(work: Path, name: str, tar_path: Path) -> Blob:
    meta = work / "blobs" / f"{name}.gzip.json"
    if meta.is_file() and meta.stat().st_mtime >= tar_path.stat().st_mtime:
        return Blob.from_json(meta.read_text())
    meta.parent.mkdir(parents=True, exist_ok=True)
    out = work / "blobs" / f"{name}.tar.gz"
    with (
        open(tar_path, "rb") as src,
        open(out, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz,
    ):
        shutil.copyfileobj(src, gz, 1 << 20)
    blob = Blob(out, _sha256_file(out), out.stat().st_size, _sha256_file(tar_path), LAYER_GZIP, {})
    meta.write_text(blob.to_json())
    return blob


def estargz_blob(work: Path, name: str, tar_path: Path, prioritized: Sequence[str] = ()) -> Blob:
    from stargzfs.convert import convert_layer

    tag = hashlib.sha256("\n".join(prioritized).encode()).hexdigest()[:12] if prioritized else ""
    variant = f"esgz-{tag}" if tag else "esgz"
    meta = work / "blobs" / f"{name}.{variant}.json"
    if meta.is_file() and meta.stat().st_mtime >= tar_path.stat().st_mtime:
        return Blob.from_json(meta.read_text())
    meta.parent.mkdir(parents=True, exist_ok=True)
    out = work / "blobs" / f"{name}.{variant}.tar.gz"
    with open(tar_path, "rb") as src, open(out, "wb") as dst:
        res = convert_layer(src, dst, prioritized=list(prioritized))
    blob = Blob(
        out, res.blob_digest, res.blob_size, res.diff_id, res.media_type, dict(res.annotations)
    )
    meta.write_text(blob.to_json())
    return blob


def write_oci_layout(root: Path, blobs: Sequence[Blob], tag: str) -> Path:
    """An OCI image layout holding one linux/amd64 image made of ``blobs``."""
    shutil.rmtree(root, ignore_errors=True)
    store = root / "blobs" / "sha256"
    store.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (store / digest).write_bytes(data)
        return "sha256:" + digest

    layer_descs = []
    for blob in blobs:
        target = store / blob.digest.removeprefix("sha256:")
        if not target.exists():
            try:
                os.link(blob.path, target)
            except OSError:
                shutil.copyfile(blob.path, target)
        desc: dict[str, object] = {
            "mediaType": blob.media_type,
            "digest": blob.digest,
            "size": blob.size,
        }
        if blob.annotations:
            desc["annotations"] = blob.annotations
        layer_descs.append(desc)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/usr/bin/python3", "/app/main.py"]},
            "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in blobs]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": put(config), "size": len(config)},
            "layers": layer_descs,
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": put(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return root


def prioritized_per_layer(tars: dict[str, Path], recorded: Sequence[str]) -> dict[str, list[str]]:
    """Recorded paths, in order, assigned to the top-most layer holding them as a file."""
    members = {name: layer_members(tars[name]) for name in LAYER_NAMES}
    out: dict[str, list[str]] = {name: [] for name in LAYER_NAMES}
    seen: set[str] = set()
    for raw in recorded:
        path = raw.strip().lstrip("/").removeprefix("./")
        if not path or path in seen:
            continue
        seen.add(path)
        for name in reversed(LAYER_NAMES):
            kind = members[name].get(path)
            if kind is not None:
                if kind == "reg":
                    out[name].append(path)
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()
    if args.rebuild:
        shutil.rmtree(args.work / "rootfs", ignore_errors=True)
        shutil.rmtree(args.work / "layers", ignore_errors=True)
        shutil.rmtree(args.work / "blobs", ignore_errors=True)
    tars = build_layer_tars(args.work, rebuild=args.rebuild)
    for name, path in tars.items():
        g = gzip_blob(args.work, name, path)
        e = estargz_blob(args.work, name, path)
        print(
            f"{name:<7} tar {path.stat().st_size / 1e6:8.1f} MB  gzip {g.size / 1e6:8.1f} MB  "
            f"eStargz {e.size / 1e6:8.1f} MB  entries {len(layer_members(path)):>6}"
        )


if __name__ == "__main__":
    main()
