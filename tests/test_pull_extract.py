"""Unit tests of the pull building blocks that need no registry: decompression streams,
the layer applier's non-root behaviour, progress output, the blob cache."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from stargzfs.errors import FormatError, UnsafePathError
from stargzfs.formats.layer_stream import gzip_backend, open_decompressed
from stargzfs.pull.blob_cache import BlobCache
from stargzfs.pull.extract import LayerApplier
from stargzfs.pull.progress import Progress

DATA = os.urandom(300_000) + b"text " * 200_000


def _multi_member_gzip(data: bytes, pieces: int = 7) -> bytes:
    step = len(data) // pieces + 1
    return b"".join(gzip.compress(data[i : i + step], mtime=0) for i in range(0, len(data), step))


@pytest.mark.parametrize("mode", ["inline", "threaded"])
@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_decompressors_agree(compression: str, mode: str) -> None:
    if compression == "gzip":
        blob = _multi_member_gzip(DATA)
    elif compression == "zstd":
        c = zstandard.ZstdCompressor()
        blob = c.compress(DATA[:100_000]) + c.compress(DATA[100_000:])  # two frames
    else:
        blob = DATA
    stream = open_decompressed(
        io.BytesIO(blob),
        compression,  # type: ignore[arg-type]
        hash_output=True,
        threaded=mode == "threaded",
    )
    out = bytearray()
    while chunk := stream.read(10240):
        out += chunk
    stream.close()
    assert bytes(out) == DATA
    assert stream.hasher is not None
    assert stream.hasher.hexdigest() == hashlib.sha256(DATA).hexdigest()


@pytest.mark.parametrize("mode", ["inline", "threaded"])
def test_truncated_gzip_is_a_format_error(mode: str) -> None:
    blob = gzip.compress(DATA)[:-5000]
    stream = open_decompressed(
        io.BytesIO(blob), "gzip", hash_output=True, threaded=mode == "threaded"
    )
    with pytest.raises(FormatError):
        while stream.read(1 << 20):
            pass
    stream.close()


def test_gzip_backend_is_known() -> None:
    assert gzip_backend()[0] in ("isal", "zlib-ng", "zlib")


def test_devices_skipped_and_owners_kept_when_not_root(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dev = tarfile.TarInfo("dev/null")
        dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(dev)
        f = tarfile.TarInfo("f")
        f.size, f.uid, f.gid, f.mode = 1, 4242, 4242, 0o640
        tar.addfile(f, io.BytesIO(b"x"))
        fifo = tarfile.TarInfo("p")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
    root = tmp_path / "root"
    root.mkdir()
    with LayerApplier(str(root), as_root=False) as applier:
        buf.seek(0)
        applier.apply(buf, "layer")
        applier.finish()
        assert applier.stats.skipped_devices == 1
    assert not (root / "dev/null").exists()
    assert (root / "f").stat().st_uid == os.geteuid()
    assert oct((root / "f").stat().st_mode & 0o7777) == oct(0o640)
    assert (root / "p").is_fifo()


def test_progress_tty_and_plain() -> None:
    out = io.StringIO()
    p = Progress(out, tty=True, interval=0)
    p.start("sha256:a", 100)
    p.advance("sha256:a", 50)
    p.tick()
    p.advance("sha256:a", 50)
    p.finish("sha256:a")
    p.tick()
    p.message("all done")  # goes below the live display
    text = out.getvalue()
    first, second = text.split("\x1b[2F")  # the second frame redraws the first's 2 lines
    assert first.startswith("\r\x1b[K  a")
    assert "50 B / 100 B" in first and "0/1 blobs, 50 B of 100 B" in first
    assert "100 B / 100 B" in second and "done" in second and "1/1 blobs" in second
    assert second.endswith("ETA 0s\nall done\n")
    out = io.StringIO()
    p = Progress(out, tty=False, interval=0)
    p.cached("sha256:b", 2048)
    p.tick()
    assert out.getvalue().startswith("downloading: 1/1 blobs, 2.0 KiB of 2.0 KiB")
    out = io.StringIO()
    p = Progress(out, quiet=True, interval=0)
    p.tick()
    p.message("x")
    assert out.getvalue() == ""


def test_blob_cache_paths_and_size_check(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    digest = "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert cache.lookup(digest) is None
    opened = cache.open_partial(digest)
    assert opened is not None
    fd, partial = opened
    assert cache.open_partial(digest) is None  # locked by the first writer
    os.write(fd, b"abc")
    final = cache.commit(digest, partial)
    os.close(fd)
    assert final == tmp_path / "blobs/sha256" / digest.split(":")[1]
    assert cache.lookup(digest, 3) == final
    assert cache.lookup(digest, 4) is None and not final.exists()  # wrong size: dropped


def test_layer_root_entry_sets_root_metadata(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        root = tarfile.TarInfo("./")
        root.type, root.mode, root.mtime = tarfile.DIRTYPE, 0o750, 1_600_000_000
        tar.addfile(root)
        f = tarfile.TarInfo("./a")
        f.size = 1
        tar.addfile(f, io.BytesIO(b"a"))
    dest = tmp_path / "root"
    dest.mkdir()
    with LayerApplier(str(dest)) as applier:
        buf.seek(0)
        applier.apply(buf, "layer")
        applier.finish()
    st = dest.stat()
    assert oct(st.st_mode & 0o7777) == oct(0o750) and int(st.st_mtime) == 1_600_000_000
    assert (dest / "a").read_bytes() == b"a"


@pytest.mark.parametrize("backend", ["zlib", "zlib-ng", "isal"])
def test_every_gzip_backend_inflates_multi_member(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STARGZFS_GZIP", backend)
    gzip_backend.cache_clear()
    try:
        # an optional backend that is not installed falls back to another (zlib at worst)
        assert gzip_backend()[0] == backend or backend != "zlib"
        stream = open_decompressed(io.BytesIO(_multi_member_gzip(DATA)), "gzip", hash_output=True)
        assert stream.read() == DATA
        bad = open_decompressed(
            io.BytesIO(b"\x1f\x8b\x08\x00garbage" * 10), "gzip", hash_output=False
        )
        with pytest.raises(FormatError):
            bad.read()
        # eStargz-like: thousands of tiny members, read through a raw stream without
        # readinto (the pull's follower of a growing file), in small reads
        many = b"".join(gzip.compress(DATA[i : i + 100], 1) for i in range(0, 200_000, 100))

        class Plain:
            def __init__(self, data: bytes) -> None:
                self.f = io.BytesIO(data)

            def read(self, n: int = -1) -> bytes:
                return self.f.read(n)

        stream = open_decompressed(Plain(many), "gzip", hash_output=True)
        out = bytearray()
        while chunk := stream.read(7000):
            out += chunk
        assert bytes(out) == DATA[:200_000]
        assert stream.hasher is not None
        assert stream.hasher.hexdigest() == hashlib.sha256(DATA[:200_000]).hexdigest()
        one = bytearray(gzip.compress(DATA))
        one[-6] ^= 0xFF  # the CRC-32 in the member's trailer
        for damaged in (bytes(one), gzip.compress(DATA)[:-3], many[:-50_000] + many[-49_000:]):
            with pytest.raises(FormatError):
                open_decompressed(io.BytesIO(damaged), "gzip", hash_output=False).read()
        # every backend alike: zero padding after the last member is fine (as gzip(1) takes
        # it), bytes after the padding or zeros instead of any member are not
        whole = gzip.compress(DATA)
        for padded in (whole + bytes(1000), whole + whole + bytes(300_000)):
            out = open_decompressed(io.BytesIO(padded), "gzip", hash_output=False).read()
            assert out == DATA * (padded.count(whole[:20]))
        for bad in (whole + bytes(10) + b"x", bytes(600)):
            with pytest.raises(FormatError):
                open_decompressed(io.BytesIO(bad), "gzip", hash_output=False).read()
    finally:
        monkeypatch.delenv("STARGZFS_GZIP")
        gzip_backend.cache_clear()


# --------------------------------------------------------------------------- symlinked parents

Entry = tuple[str, str, str | bytes]  # (name, "dir" | "file" | "sym" | "link", target/data)


def _layer(entries: list[Entry]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, arg in entries:
            info = tarfile.TarInfo(name)
            info.mode = 0o755
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "file":
                data = arg.encode() if isinstance(arg, str) else arg
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                assert isinstance(arg, str)
                info.linkname = arg
                tar.addfile(info)
    buf.seek(0)
    return buf


def _apply(root: Path, *layers: list[Entry]) -> None:
    root.mkdir(exist_ok=True)
    with LayerApplier(str(root), as_root=False) as applier:
        for i, entries in enumerate(layers):
            applier.apply(_layer(entries), f"layer {i}")
        applier.finish()


MERGED_USR: list[Entry] = [
    ("usr", "dir", ""),
    ("usr/lib", "dir", ""),
    ("usr/lib/a.so", "file", "a"),
]


@pytest.mark.parametrize("target", ["usr/lib", "/usr/lib", "./usr//lib/", "usr/../usr/lib"])
def test_write_through_symlinked_parent_lands_inside(tmp_path: Path, target: str) -> None:
    """Debian's merged /usr: a later layer's ``lib/foo.so`` goes to ``usr/lib/foo.so``."""
    root = tmp_path / "root"
    _apply(
        root,
        [*MERGED_USR, ("lib", "sym", target)],
        [
            ("lib/foo.so", "file", "foo"),
            ("lib/x86_64/bar.so", "file", "bar"),  # created below the link's directory
            ("lib/sub", "dir", ""),
            ("lib/sub/baz", "file", "baz"),
            ("h", "link", "lib/foo.so"),  # a hardlink target through the link
        ],
    )
    assert os.readlink(root / "lib") == target
    assert (root / "usr/lib/foo.so").read_bytes() == b"foo"
    assert (root / "usr/lib/x86_64/bar.so").read_bytes() == b"bar"
    assert (root / "usr/lib/sub/baz").read_bytes() == b"baz"
    assert oct((root / "usr/lib/sub").stat().st_mode & 0o7777) == oct(0o755)  # its metadata
    assert (root / "h").stat().st_ino == (root / "usr/lib/foo.so").stat().st_ino
    assert sorted(os.listdir(root)) == ["h", "lib", "usr"]


def test_chain_of_symlinked_parents(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _apply(
        root,
        [
            *MERGED_USR,
            ("a", "sym", "b"),  # -> b -> /usr/lib64 -> (in usr/) ../usr/lib
            ("b", "sym", "/usr/lib64"),
            ("usr/lib64", "sym", "../usr/lib"),
        ],
        [("a/x", "file", "x"), ("a/y/z", "file", "z"), ("b/w", "file", "w")],
    )
    assert (root / "usr/lib/x").read_bytes() == b"x"
    assert (root / "usr/lib/y/z").read_bytes() == b"z"
    assert (root / "usr/lib/w").read_bytes() == b"w"
    assert os.readlink(root / "a") == "b" and os.readlink(root / "usr/lib64") == "../usr/lib"


def test_whiteouts_through_symlinked_parent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _apply(
        root,
        [*MERGED_USR, ("usr/lib/keep", "file", "k"), ("lib", "sym", "/usr/lib")],
        [("lib/.wh.a.so", "file", "")],
    )
    assert sorted(os.listdir(root / "usr/lib")) == ["keep"]
    assert os.readlink(root / "lib") == "/usr/lib"
    # an opaque directory through the link hides the lower children, not this layer's own
    _apply(root, [("lib/new", "file", "n"), ("lib/.wh..wh..opq", "file", "")])
    assert sorted(os.listdir(root / "usr/lib")) == ["new"]


def test_removed_directory_or_link_is_not_reached_through_a_stale_fd(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _apply(
        root,
        [*MERGED_USR, ("lib", "sym", "usr/lib"), ("lib/one", "file", "1")],
        # the link's target directory is deleted and made again: lib/two goes in the new one
        [("usr/.wh.lib", "file", ""), ("usr/lib", "dir", ""), ("lib/two", "file", "2")],
        # the link itself is replaced by a directory: lib/three goes in it, not in usr/lib
        [("lib", "dir", ""), ("lib/three", "file", "3")],
    )
    assert sorted(os.listdir(root / "usr/lib")) == ["two"]
    assert not (root / "lib").is_symlink()
    assert sorted(os.listdir(root / "lib")) == ["three"]


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        (  # climbs above the root
            [("d/e", "dir", ""), ("d/e/esc", "sym", "../../.."), ("d/e/esc/victim", "file", "x")],
            "leading outside the root",
        ),
        (  # the same, a link deeper in a chain, planted by the same layer
            [
                ("a", "sym", "usr/up"),
                ("usr", "dir", ""),
                ("usr/up", "sym", "../.."),
                ("a/v", "file", "x"),
            ],
            "leading outside the root",
        ),
        ([("esc", "sym", "OUTSIDE"), ("esc/victim", "file", "x")], "does not lead to an existing"),
        ([("a", "sym", "b"), ("b", "sym", "a"), ("a/x", "file", "x")], "symlink loop"),
        ([("a", "sym", "a"), ("a/x", "file", "x")], "symlink loop"),
        ([("f", "file", "x"), ("l", "sym", "f"), ("l/x", "file", "x")], "not a directory"),
    ],
)
def test_unsafe_symlinked_parents_are_refused(
    tmp_path: Path, entries: list[Entry], why: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"original")
    entries = [(n, k, str(outside) if a == "OUTSIDE" else a) for n, k, a in entries]
    with pytest.raises(UnsafePathError) as info:
        # planted by an earlier layer, then written through
        _apply(tmp_path / "root", entries[:-1], entries[-1:])
    assert why in str(info.value) and repr(entries[-1][0]) in str(info.value)
    assert "refusing" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["outside", "root"]
    assert os.listdir(outside) == ["victim"] and (outside / "victim").read_bytes() == b"original"
    # a whiteout through it hides nothing outside either
    with pytest.raises(UnsafePathError) if "exist" not in why else contextlib.nullcontext():
        _apply(tmp_path / "root", [(entries[-1][0].rsplit("/", 1)[0] + "/.wh.victim", "file", "")])
    assert (outside / "victim").read_bytes() == b"original"


# --------------------------------------------------------------------------- the tar reader


def _one_file_layer(name: str = "dir/file", data: bytes = b"x" * 5000) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", r"layer: not a tar stream \(empty file\)"),
        (b"not a tar at all" * 100, r"layer: not a tar stream \(bad header checksum at offset 0\)"),
        (b"\x00" * 100, r"layer: not a tar stream \(truncated header at offset 0"),
        (
            _one_file_layer()[:3000],
            r"layer: malformed tar \(entry 'dir/file': data is truncated \(the stream ends after "
            r"2488 of its 5000 bytes\)\)",
        ),
        (
            _one_file_layer("a", b"a")[:1024] + b"junk" * 128,
            r"layer: malformed tar \(bad header checksum at offset 1024 \(after entry 'a'\)\)",
        ),
    ],
)
def test_malformed_layers_are_format_errors(tmp_path: Path, blob: bytes, message: str) -> None:
    with (
        LayerApplier(str(tmp_path), as_root=False) as applier,
        pytest.raises(FormatError, match=message),
    ):
        applier.apply(io.BytesIO(blob), "layer")


def test_unsupported_member_type_is_named(tmp_path: Path) -> None:
    info = tarfile.TarInfo("dump")
    info.type = b"D"
    blob = info.tobuf(tarfile.GNU_FORMAT) + bytes(1024)
    with (
        LayerApplier(str(tmp_path), as_root=False) as applier,
        pytest.raises(FormatError, match=r"layer: entry 'dump' has unsupported tar type b'D'"),
    ):
        applier.apply(io.BytesIO(blob), "layer")


def test_xattrs_from_schily_and_libarchive_records() -> None:
    from stargzfs.pull.extract import _xattrs
    from stargzfs.pull.tarstream import TarMember

    m = TarMember("f", "reg", b"0", 0o644, 0, 0, 0, 0, "", "", "", 0, 0)
    assert _xattrs(m) == {}
    m.pax_headers = {
        "SCHILY.xattr.user.both": "from schily \udcff",
        "LIBARCHIVE.xattr.user.both": base64.b64encode(b"from libarchive").decode(),
        "LIBARCHIVE.xattr.user.a%3Db%20c": base64.b64encode(b"\x00\x01\x02\x03").decode()[:-2],
        "LIBARCHIVE.xattr.user.bad": "not base64!",
        "mtime": "1.5",
    }
    assert _xattrs(m) == {
        "user.both": b"from schily \xff",
        "user.a=b c": b"\x00\x01\x02\x03",
    }
