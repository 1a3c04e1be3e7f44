"""The FUSE adapter, mounted for real over local fixture blobs: what `ls`, `stat`,
`cat`, `getfattr` see must be the reference's expected merged tree."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from layer_helpers import FIXTURES

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures is absent"),
]

RUNNER = Path(__file__).with_name("mount_blobs.py")
TYPES = {
    "dir": stat.S_ISDIR,
    "reg": stat.S_ISREG,
    "symlink": stat.S_ISLNK,
    "hardlink": stat.S_ISREG,
    "char": stat.S_ISCHR,
    "block": stat.S_ISBLK,
    "fifo": stat.S_ISFIFO,
}


def walk(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def check_tree(mnt: Path, exp: dict[str, Any], *, dir_nlink: bool) -> None:
    assert walk(mnt) == [e["path"] for e in exp["entries"]]
    for want in exp["entries"]:
        path = mnt / want["path"]
        st = os.lstat(path)
        assert TYPES[want["type"]](st.st_mode), want["path"]
        assert stat.S_IMODE(st.st_mode) == want["mode"], want["path"]
        assert (st.st_uid, st.st_gid) == (want["uid"], want["gid"]), want["path"]
        if want["mtime"] is not None:
            assert int(st.st_mtime) == want["mtime"], want["path"]
        if want["type"] != "dir" or dir_nlink:
            assert st.st_nlink == want["nlink"], want["path"]
        if want["type"] == "symlink":
            assert os.readlink(path) == want["linkname"]
        if want["type"] in ("char", "block"):
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (
                want["devmajor"],
                want["devminor"],
            )
        if want["sha256"] and want["type"] in ("reg", "hardlink"):
            assert st.st_size == want["size"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == want["sha256"], want["path"]
        for name, value in want["xattrs"].items():
            import base64

            assert os.getxattr(path, name, follow_symlinks=False) == base64.b64decode(value)
    if "inode_path" in json.dumps(exp):
        for want in exp["entries"]:
            if want["type"] == "hardlink":
                a = os.lstat(mnt / want["path"])
                b = os.lstat(mnt / want["inode_path"])
                assert a.st_ino == b.st_ino


def test_single_layer_mount_matches_reference(mounter: Any, mountpoint: Path) -> None:
    exp = json.loads((FIXTURES / "basic.json").read_text())
    mounter(
        [sys.executable, str(RUNNER), str(mountpoint), str(FIXTURES / "basic.esgz")], mountpoint
    )
    check_tree(mountpoint, exp, dir_nlink=True)
    # Read-only, and errors are errno values, not a dead daemon.
    with pytest.raises(OSError) as info:
        (mountpoint / "etc" / "new").write_text("x")
    assert info.value.errno == errno.EROFS
    with pytest.raises(FileNotFoundError):
        os.stat(mountpoint / "nope")
    assert os.listdir(mountpoint)  # still serving
    vfs = os.statvfs(mountpoint)
    assert vfs.f_files > 0


def test_merged_two_layer_mount_matches_reference(mounter: Any, mountpoint: Path) -> None:
    exp = json.loads((FIXTURES / "whiteout-merged.json").read_text())
    blobs = [str(FIXTURES / "basic.esgz"), str(FIXTURES / "whiteout-upper.esgz")]
    mounter([sys.executable, str(RUNNER), str(mountpoint), *blobs], mountpoint)
    check_tree(mountpoint, exp, dir_nlink=True)


def test_zstd_chunked_and_chunked_files(mounter: Any, mountpoint: Path) -> None:
    exp = json.loads((FIXTURES / "chunked.json").read_text())
    mounter(
        [sys.executable, str(RUNNER), str(mountpoint), str(FIXTURES / "chunked.esgz")], mountpoint
    )
    check_tree(mountpoint, exp, dir_nlink=True)
    big = mountpoint / "data" / "random-300000.bin"
    with open(big, "rb") as f:
        f.seek(65530)
        assert len(f.read(20)) == 20


def test_corrupt_chunk_is_eio_and_the_rest_is_served(
    mounter: Any, mountpoint: Path, tmp_path: Path
) -> None:
    import subprocess

    blob = bytearray((FIXTURES / "basic.esgz").read_bytes())
    toc = [json.loads(line) for line in (FIXTURES / "basic.toc.jsonl").read_text().splitlines()]
    target = next(e for e in toc if e["name"] == "usr/bin/su")
    nxt = min(e["offset"] for e in toc if e.get("offset", 0) > target["offset"])
    blob[(target["offset"] + nxt) // 2] ^= 0x55  # inside su's compressed payload
    bad = tmp_path / "bad.esgz"
    bad.write_bytes(bytes(blob))
    proc = mounter([sys.executable, str(RUNNER), str(mountpoint), str(bad)], mountpoint)
    with pytest.raises(OSError) as info:
        (mountpoint / "usr/bin/su").read_bytes()
    assert info.value.errno == errno.EIO
    exp = {e["path"]: e for e in json.loads((FIXTURES / "basic.json").read_text())["entries"]}
    data = (mountpoint / "etc/passwd").read_bytes()
    assert hashlib.sha256(data).hexdigest() == exp["etc/passwd"]["sha256"]
    assert proc.is_mounted()
    subprocess.run(["ls", "-lR", str(mountpoint)], check=True, capture_output=True)


def test_stats_xattr_and_access_recording(mounter: Any, mountpoint: Path, tmp_path: Path) -> None:
    record = tmp_path / "access.txt"
    blob = str(FIXTURES / "basic.esgz")
    mounter(
        [sys.executable, str(RUNNER), "--record-access", str(record), str(mountpoint), blob],
        mountpoint,
    )
    order = ["usr/bin/hello", "etc/passwd", "usr/lib/libdemo.so.1"]
    for path in [*order, "etc/passwd"]:
        (mountpoint / path).read_bytes()
    (mountpoint / "usr/bin/hello-hardlink").read_bytes()  # same inode: already recorded
    stats = json.loads(os.getxattr(mountpoint, "user.stargzfs.stats"))
    assert stats["layers"][0]["chunk_fetches"] >= 3
    assert stats["cache"]["stored"] >= 3
    assert "user.stargzfs.stats" not in os.listxattr(mountpoint)
    assert record.read_text().splitlines() == order


@pytest.mark.parametrize("kernel_open", [True, False], ids=["kernel-open", "stock-open"])
def test_kernel_serves_repeats_without_asking(
    mounter: Any, mountpoint: Path, kernel_open: bool
) -> None:
    """With the patched pyfuse3 the kernel opens files and directories itself and caches
    listings and symlink targets: a second `ls`, `cat` and `readlink` reach no handler (each
    used to be a round trip: ~100 per `python3 -c 'import json'`). Without it (a stock
    pyfuse3), file handles are served as before and the results are the same."""
    from stargzfs.fuse.operations import KERNEL_OPEN

    if kernel_open:
        assert KERNEL_OPEN, "pyfuse3 lacks stargzfs's patch: `make venv` builds it"
    argv = [sys.executable, str(RUNNER), str(mountpoint), str(FIXTURES / "basic.esgz")]
    if not kernel_open:
        argv.insert(2, "--stock-open")
    mounter(argv, mountpoint)

    def requests() -> dict[str, int]:
        stats = json.loads(os.getxattr(mountpoint, "user.stargzfs.stats"))
        assert stats["kernel_open"] is kernel_open
        counts: dict[str, int] = stats["fuse_requests"]  # these very reads not counted
        return counts

    def work() -> list[object]:
        return [
            sorted(os.listdir(mountpoint / "usr/bin")),
            sorted(os.listdir(mountpoint / "usr/share/doc/sizes")),
            (mountpoint / "usr/lib/libdemo.so.1").read_bytes(),
            (mountpoint / "usr/bin/hello").read_bytes(),
            os.readlink(mountpoint / "usr/bin/hi"),
            (mountpoint / "usr/lib/libdemo.so").read_bytes(),  # through a symlink
        ]

    first = work()
    before = requests()
    assert work() == first
    after = requests()
    repeated = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    assert first[4] == "hello" and len(first[2]) == 70000  # type: ignore[arg-type]
    if kernel_open:
        assert repeated == {}
        assert not {"release", "releasedir"} & after.keys()
        assert after["open"] == after["opendir"] == 1  # answered ENOSYS once, then never asked
    else:
        # The kernel asks again each time (exact counts are the kernel's business).
        assert {"opendir", "readdir", "open", "release", "readlink"} <= repeated.keys()
