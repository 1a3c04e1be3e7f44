"""Unit tests of the pull building blocks that need no registry: decompression streams,
the layer applier's non-root behaviour, progress output, the blob cache."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from stargzfs.errors import FormatError
from stargzfs.pull.blob_cache import BlobCache
from stargzfs.pull.extract import LayerApplier, gzip_backend, open_decompressed
from stargzfs.pull.progress import Progress

DATA = os.urandom(300_000) + b"text " * 200_000


def _multi_member_gzip(data: bytes, pieces: int = 7) -> bytes:
    step = len(data) // pieces + 1
    return b"".join(gzip.compress(data[i : i + step], mtime=0) for i in range(0, len(data), step))


@pytest.mark.parametrize("mode", ["inline", "threaded", "process"])
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
        process=mode == "process",
    )
    out = bytearray()
    while chunk := stream.read(10240):
        out += chunk
    stream.close()
    assert bytes(out) == DATA
    assert stream.hasher is not None
    assert stream.hasher.hexdigest() == hashlib.sha256(DATA).hexdigest()


@pytest.mark.parametrize("mode", ["inline", "process"])
def test_truncated_gzip_is_a_format_error(mode: str) -> None:
    blob = gzip.compress(DATA)[:-5000]
    stream = open_decompressed(
        io.BytesIO(blob), "gzip", hash_output=True, process=mode == "process"
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
    finally:
        monkeypatch.delenv("STARGZFS_GZIP")
        gzip_backend.cache_clear()
