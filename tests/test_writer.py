"""The eStargz writer (``convert_layer`` / ``stargzfs convert-layer``).

The blob is checked by hand here (footer, TOC member, gzip members, offsets) rather than with
the project's reader, so a bug shared by writer and reader cannot hide; one test at the end
also reads our blobs back through the reader against the reference fixtures' expectations.
"""

from __future__ import annotations

import base64
import codecs
import gzip
import hashlib
import io
import itertools
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stargzfs.cli.main import main as cli_main
from stargzfs.convert import ConvertResult, convert_layer
from stargzfs.errors import FormatError, NotFoundError, UnsafePathError, UsageError
from stargzfs.formats import estargz_writer

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
CASES = ["basic", "chunked", "prioritized", "noprio", "implicit-dirs", "whiteout-upper"]
HIDDEN = {"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"}
FOOTER = 51


# ------------------------------------------------------------------------------------------
# Reading a blob by hand
# ------------------------------------------------------------------------------------------


@dataclass
class Blob:
    data: bytes
    toc_offset: int
    toc_json: bytes
    toc: dict[str, Any]
    members: list[int]  # offsets of every gzip member before the footer

    @property
    def entries(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.toc["entries"]
        return entries


def nts(b: bytes) -> bytes:
    return b.split(b"\0", 1)[0]


def parse_blob(data: bytes) -> Blob:
    footer = data[-FOOTER:]
    # RFC 1952 header: magic, CM=8, FLG=FEXTRA, MTIME, XFL, OS; then XLEN=26 and one subfield.
    assert footer[:4] == b"\x1f\x8b\x08\x04"
    assert footer[10:12] == (26).to_bytes(2, "little")
    assert footer[12:14] == b"SG" and footer[14:16] == (22).to_bytes(2, "little")
    assert footer[32:38] == b"STARGZ"
    toc_offset = int(footer[16:32], 16)
    d = zlib.decompressobj(31)
    assert d.decompress(footer) == b"" and d.eof and not d.unused_data
    members = []
    off = 0
    view = memoryview(data)
    while off < len(data) - FOOTER:
        members.append(off)
        d = zlib.decompressobj(31)
        d.decompress(view[off : len(data) - FOOTER])
        assert d.eof, f"gzip member at {off} is incomplete"
        off = len(data) - FOOTER - len(d.unused_data)
    assert toc_offset == members[-1], "the TOC must be the last member"
    d = zlib.decompressobj(31)
    toc_tar = d.decompress(data[toc_offset:-FOOTER])
    assert d.eof and not d.unused_data
    assert nts(toc_tar[:100]) == b"stargz.index.json"
    assert toc_tar[156:157] == b"0"
    size = int(nts(toc_tar[124:136]), 8)
    toc_json = toc_tar[512 : 512 + size]
    assert not any(toc_tar[512 + size :]), "padding and end-of-archive after the TOC"
    assert len(toc_tar) == 512 + size + (-size) % 512 + 1024
    toc = json.loads(toc_json)
    assert toc["version"] == 1
    return Blob(data, toc_offset, toc_json, toc, members)


def gunzip(data: bytes) -> bytes:
    return gzip.decompress(data)


def tar_view(raw: bytes) -> list[dict[str, Any]]:
    """Every entry of a tar, as tarfile sees it, with content digests."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        for ti in tf:
            f = tf.extractfile(ti) if ti.isreg() else None
            out.append(
                {
                    "name": ti.name,
                    "type": ti.type,
                    "mode": ti.mode,
                    "uid": ti.uid,
                    "gid": ti.gid,
                    "uname": ti.uname,
                    "gname": ti.gname,
                    "mtime": ti.mtime,
                    "linkname": ti.linkname,
                    "size": ti.size,
                    "dev": (ti.devmajor, ti.devminor) if ti.ischr() or ti.isblk() else None,
                    "xattrs": {
                        k: v for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")
                    },
                    "sha256": hashlib.sha256(f.read()).hexdigest() if f else None,
                }
            )
    return out


def tar_contents(raw: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        for ti in tf:
            if ti.isreg():
                f = tf.extractfile(ti)
                assert f is not None
                out[clean(ti.name)] = f.read()
    return out


def clean(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def convert(tar: bytes, **kw: Any) -> tuple[bytes, ConvertResult]:
    out = io.BytesIO()
    result = convert_layer(io.BytesIO(tar), out, **kw)
    return out.getvalue(), result


def check_blob(tar: bytes, blob: bytes, result: ConvertResult) -> Blob:
    """Everything that must hold for any blob we write from ``tar``."""
    b = parse_blob(blob)
    raw = gunzip(blob)
    assert result.blob_size == len(blob)
    assert result.media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert result.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert result.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert result.uncompressed_size == len(raw)
    assert result.toc_offset == b.toc_offset
    assert result.toc_digest == "sha256:" + hashlib.sha256(b.toc_json).hexdigest()
    assert result.annotations == {
        "containerd.io/snapshot/stargz/toc.digest": result.toc_digest,
        "io.containers.estargz.uncompressed-size": str(len(raw)),
    }
    json.loads(result.to_json())

    # gunzip gives the input's entries, plus the TOC and one landmark.
    got = [e for e in tar_view(raw) if clean(e["name"]) not in HIDDEN]
    want = [e for e in tar_view(tar) if clean(e["name"]) not in HIDDEN]
    key = lambda e: clean(e["name"])  # noqa: E731
    assert sorted(got, key=key) == sorted(want, key=key)
    hidden = [clean(e["name"]) for e in tar_view(raw) if clean(e["name"]) in HIDDEN]
    assert hidden[-1] == "stargz.index.json" and len(hidden) == 2

    check_toc_payloads(b, tar_contents(raw))
    return b


def check_toc_payloads(b: Blob, contents: dict[str, bytes]) -> None:
    """Each offset starts a member whose stream holds the chunk at innerOffset; digests match."""
    members = set(b.members)
    current: dict[str, Any] | None = None
    expected_next = 0
    for e in b.entries:
        if e["type"] == "chunk":
            assert current is not None and e["name"] == current["name"]
            assert e["chunkOffset"] == expected_next
            assert set(e) <= {
                "name",
                "type",
                "offset",
                "innerOffset",
                "chunkOffset",
                "chunkSize",
                "chunkDigest",
            }
            entry_size = current["size"]
        elif e["type"] == "reg":
            current = e
            expected_next = 0
            entry_size = e.get("size", 0)
            data = contents[clean(e["name"])]
            assert len(data) == entry_size
            assert e["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
            if entry_size == 0:
                assert "offset" not in e and "chunkDigest" not in e
                continue
            assert e.get("chunkOffset", 0) == 0
        else:
            assert "offset" not in e and "digest" not in e
            continue
        data = contents[clean(e["name"])]
        start = e.get("chunkOffset", 0)
        length = e.get("chunkSize") or entry_size - start
        chunk = data[start : start + length]
        assert len(chunk) == length and length > 0
        assert e["chunkDigest"] == "sha256:" + hashlib.sha256(chunk).hexdigest()
        assert e["offset"] in members, f"{e['name']}: offset {e['offset']} is not a member start"
        d = zlib.decompressobj(31)  # one member only: Python stops at its end
        stream = d.decompress(b.data[e["offset"] : b.toc_offset])
        inner = e.get("innerOffset", 0)
        assert stream[inner : inner + length] == chunk, e["name"]
        expected_next = start + length


def fixture_tar(case: str) -> bytes:
    return (FIXTURES / f"{case}.tar").read_bytes()


def fixture_meta(case: str) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((FIXTURES / f"{case}.json").read_text())
    return meta


def fixture_convert(case: str, **kw: Any) -> tuple[bytes, ConvertResult]:
    opts = fixture_meta(case)["build_options"]
    return convert(
        fixture_tar(case),
        chunk_size=opts["chunk_size"],
        prioritized=opts["prioritized_files"],
        **kw,
    )


# ------------------------------------------------------------------------------------------
# Tar building helpers
# ------------------------------------------------------------------------------------------


def make_tar(
    members: list[tuple[tarfile.TarInfo, bytes | None]],
    fmt: int = tarfile.PAX_FORMAT,
    pax_headers: dict[str, str] | None = None,
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=pax_headers) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def reg(name: str, data: bytes, **kw: Any) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = kw.pop("mode", 0o644)
    ti.mtime = kw.pop("mtime", 1_700_000_000)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, data


def special(name: str, type_: bytes, **kw: Any) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = kw.pop("mode", 0o755 if type_ == tarfile.DIRTYPE else 0o777)
    ti.mtime = kw.pop("mtime", 1_700_000_000)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, None


def raw_header(name: bytes, typeflag: bytes = b"0", size: int = 0, linkname: bytes = b"") -> bytes:
    """A ustar header block built by hand, for names tarfile would refuse or rewrite."""
    b = bytearray(512)
    b[0 : len(name)] = name
    b[100:108] = b"0000644\0"
    b[108:116] = b"0000000\0"
    b[116:124] = b"0000000\0"
    b[124:136] = b"%011o\0" % size
    b[136:148] = b"14524770400\0"
    b[156:157] = typeflag
    b[157 : 157 + len(linkname)] = linkname
    b[257:265] = b"ustar\x0000"
    b[148:156] = b"        "
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def raw_tar(*parts: bytes) -> bytes:
    return b"".join(parts) + bytes(1024)


def pax_block(records: dict[bytes, bytes]) -> bytes:
    body = b""
    for k, v in records.items():
        rec = b" " + k + b"=" + v + b"\n"
        n = len(rec) + 1
        while len(str(n).encode() + rec) != n:
            n += 1
        body += str(n).encode() + rec
    return raw_header(b"PaxHeader", b"x", len(body)) + body + bytes(-len(body) % 512)


# ------------------------------------------------------------------------------------------
# Reference fixtures
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_fixture_roundtrip(case: str) -> None:
    tar = fixture_tar(case)
    blob, result = fixture_convert(case)
    b = check_blob(tar, blob, result)
    meta = fixture_meta(case)
    assert result.uncompressed_size == meta["uncompressed_size"]  # same tar bytes as upstream
    names = [clean(e["name"]) for e in b.entries]
    landmark = meta["landmark"]
    assert names.count(landmark) == 1
    assert not (HIDDEN - {landmark}) & set(names)
    if landmark == ".no.prefetch.landmark":
        assert names[0] == landmark
    else:
        prefetch = meta["prefetch_entries"]
        assert names[: len(prefetch) + 1] == [*prefetch, landmark]
    # The landmark always has a member of its own holding exactly one byte 0x0f.
    lm = next(e for e in b.entries if e["name"] == landmark)
    d = zlib.decompressobj(31)
    assert d.decompress(blob[lm["offset"] :]).startswith(b"\x0f")
    for case_chunks in meta.get("expected_chunks", {}).items():
        path, chunks = case_chunks
        got = [
            (e.get("chunkOffset", 0), e["chunkDigest"])
            for e in b.entries
            if clean(e["name"]) == path and e["type"] in ("reg", "chunk")
        ]
        assert got == [(c["offset"], "sha256:" + c["sha256"]) for c in chunks]


def resolved_owner_names(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """userName/groupName carried forward per uid/gid, as readers do."""
    users: dict[int, str] = {}
    groups: dict[int, str] = {}
    out = []
    for e in entries:
        if e["type"] == "chunk":
            continue
        if "userName" in e:
            users[e.get("uid", 0)] = e["userName"]
        if "groupName" in e:
            groups[e.get("gid", 0)] = e["groupName"]
        out.append((users.get(e.get("uid", 0), ""), groups.get(e.get("gid", 0), "")))
    return out


@pytest.mark.parametrize("case", CASES)
def test_toc_matches_reference_field_by_field(case: str) -> None:
    """Same entries, same fields, same values as upstream's TOC; only offsets may differ.

    userName/groupName may also sit on different entries: upstream (``--procs 2``) restarts
    the "only when it changes" rule at each sub-blob. Carried forward, they must agree.
    """
    blob, _ = fixture_convert(case)
    ours = parse_blob(blob).entries
    theirs = [json.loads(line) for line in (FIXTURES / f"{case}.toc.jsonl").open()]
    assert len(ours) == len(theirs)
    ignore = {"offset", "userName", "groupName"}
    for a, b in zip(ours, theirs, strict=True):
        assert {k: v for k, v in a.items() if k not in ignore} == {
            k: v for k, v in b.items() if k not in ignore
        }
        assert ("offset" in a) == ("offset" in b), a["name"]
        # Same key order as Go's struct, for whoever diffs TOCs.
        assert [k for k in a if k in b] == [k for k in b if k in a]
    assert resolved_owner_names(ours) == resolved_owner_names(theirs)
    if fixture_meta(case)["build_options"]["procs"] == 1:
        # Without upstream's sub-blob split even the placement of the names is identical.
        assert [(e.get("userName"), e.get("groupName")) for e in ours] == [
            (e.get("userName"), e.get("groupName")) for e in theirs
        ]


def test_toc_json_layout_is_gos_marshalindent() -> None:
    """With upstream's offsets substituted, our TOC JSON would be byte-identical to Go's."""
    data = (FIXTURES / "noprio.esgz").read_bytes()
    theirs = parse_blob(data)
    rendered = (
        '{\n\t"version": 1,\n\t"entries": [\n'
        + ",\n".join(estargz_writer._format_toc_entry(e) for e in theirs.entries)
        + "\n\t]\n}"
    )
    assert rendered.encode() == theirs.toc_json
    basic = parse_blob((FIXTURES / "basic.esgz").read_bytes())  # unicode names, xattrs
    rendered = (
        '{\n\t"version": 1,\n\t"entries": [\n'
        + ",\n".join(estargz_writer._format_toc_entry(e) for e in basic.entries)
        + "\n\t]\n}"
    )
    assert rendered.encode() == basic.toc_json


def test_landmark_and_toc_headers_are_byte_identical_to_upstream() -> None:
    theirs = (FIXTURES / "noprio.esgz").read_bytes()
    blob, _ = fixture_convert("noprio")
    assert gunzip(blob)[:1024] == gunzip(theirs)[:1024]  # landmark header + its payload block
    up = parse_blob(theirs)
    ours = parse_blob(blob)
    d1, d2 = zlib.decompressobj(31), zlib.decompressobj(31)
    h1 = d1.decompress(theirs[up.toc_offset :])[:512]
    h2 = d2.decompress(blob[ours.toc_offset :])[:512]
    assert h1[124:136] != b"" and (h1[:124], h1[136:148]) == (h2[:124], h2[136:148])
    assert blob[-FOOTER : -FOOTER + 16] == theirs[-FOOTER : -FOOTER + 16]


@pytest.mark.parametrize("case", CASES)
def test_real_gzip_binary_agrees(case: str) -> None:
    if shutil.which("gzip") is None:
        pytest.skip("no gzip binary")
    blob, _ = fixture_convert(case)
    proc = subprocess.run(["gzip", "-dc"], input=blob, capture_output=True, check=True)
    assert proc.stdout == gunzip(blob)
    subprocess.run(["gzip", "-t"], input=blob, check=True)


@pytest.mark.parametrize("case", ["basic", "prioritized"])
def test_deterministic_across_workers_and_input_compression(case: str) -> None:
    tar = fixture_tar(case)
    opts = fixture_meta(case)["build_options"]
    kw = {"chunk_size": opts["chunk_size"], "prioritized": opts["prioritized_files"]}
    first, _ = convert(tar, workers=1, **kw)
    for workers in (1, 2, 3, 8):
        assert convert(tar, workers=workers, **kw)[0] == first
    assert convert(gzip.compress(tar, mtime=0), **kw)[0] == first
    # Multi-member gzip input, as an eStargz layer itself would be.
    two = gzip.compress(tar[:1024], mtime=0) + gzip.compress(tar[1024:], mtime=0)
    assert convert(two, **kw)[0] == first
    assert convert(zstandard.ZstdCompressor().compress(tar), **kw)[0] == first


def test_reconverting_an_estargz_blob_keeps_one_toc_and_one_landmark() -> None:
    esgz = (FIXTURES / "basic.esgz").read_bytes()  # a tar.gz holding a TOC and a landmark
    blob, result = convert(esgz, chunk_size=65536)
    b = parse_blob(blob)
    names = [clean(e["name"]) for e in b.entries]
    assert names.count(".no.prefetch.landmark") == 1 and "stargz.index.json" not in names
    raw_names = [clean(e["name"]) for e in tar_view(gunzip(blob))]
    assert raw_names.count("stargz.index.json") == 1
    assert raw_names.count(".no.prefetch.landmark") == 1
    check_blob(gunzip(esgz), blob, result)  # the upstream blob's own entries, minus its TOC


# ------------------------------------------------------------------------------------------
# Chunking, packing, ordering
# ------------------------------------------------------------------------------------------


def test_chunk_boundaries() -> None:
    cs = 1000
    sizes = [0, 1, cs - 1, cs, cs + 1, 2 * cs, 2 * cs + 1, 5 * cs - 3]
    members = [
        reg(f"f{i}", bytes((i * 7 + j) % 251 for j in range(s))) for i, s in enumerate(sizes)
    ]
    tar = make_tar(members)
    blob, result = convert(tar, chunk_size=cs)
    b = check_blob(tar, blob, result)
    for i, size in enumerate(sizes):
        rows = [e for e in b.entries if e["name"] == f"f{i}"]
        assert len(rows) == max(1, -(-size // cs))
        for k, e in enumerate(rows):
            remain = size - k * cs
            # chunkSize is written only for a full chunk; 0/absent means "to the end".
            assert e.get("chunkSize") == (cs if remain >= cs else None)
        offsets = [e["offset"] for e in rows if "offset" in e]
        assert len(set(offsets)) == len(offsets)  # each chunk its own member


def test_each_payload_starts_a_member_and_headers_close_the_previous_one() -> None:
    tar = fixture_tar("noprio")
    blob, _ = fixture_convert("noprio")
    b = parse_blob(blob)
    for e in b.entries:
        if "offset" in e:
            d = zlib.decompressobj(31)
            stream = d.decompress(blob[e["offset"] : b.toc_offset])
            size = e.get("chunkSize") or e["size"]
            # The member: payload, tar padding, then the headers of what follows.
            assert len(stream) >= size + (-size) % 512
            rest = stream[size + (-size) % 512 :]
            assert len(rest) % 512 == 0
            assert not any(stream[size : size + (-size) % 512])
    assert len(gunzip(blob)) > len(tar) - 1024  # everything but the input's end blocks


def test_min_chunk_size_packs_small_files_with_inner_offsets() -> None:
    files = [reg(f"d/f{i:03d}", (f"file {i} " * (i % 17 + 1)).encode()) for i in range(200)]
    files.append(reg("big", bytes(range(256)) * 40))
    tar = make_tar(files)
    unpacked, _ = convert(tar, chunk_size=4096)
    min_size = 2000
    blob, result = convert(tar, chunk_size=4096, min_chunk_size=min_size)
    b = check_blob(tar, blob, result)
    payload_rows = [e for e in b.entries if "offset" in e]
    offsets = [e["offset"] for e in payload_rows]
    assert any("innerOffset" in e for e in payload_rows)
    assert len(set(offsets)) < len(offsets) / 5  # heavily packed
    assert len(blob) < len(unpacked)
    lm = b.entries[0]
    assert lm["name"] == ".no.prefetch.landmark" and "innerOffset" not in lm
    # Upstream's rule: a payload opens a new member only once the current one has reached
    # min_chunk_size compressed bytes (landmarks always do).
    starts = sorted(set(offsets))
    for prev, nxt in itertools.pairwise(starts):
        if prev != lm["offset"]:
            assert nxt - prev >= min_size
    # Files sharing a member follow each other: innerOffsets grow within a member.
    by_member: dict[int, list[int]] = {}
    for e in payload_rows:
        by_member.setdefault(e["offset"], []).append(e.get("innerOffset", 0))
    for inners in by_member.values():
        assert inners == sorted(inners) and inners[0] == 0
    # Deterministic too, and independent of workers (packing is sequential).
    assert convert(tar, chunk_size=4096, min_chunk_size=min_size, workers=1)[0] == blob


def test_incompressible_chunks_are_stored_compressible_ones_deflated() -> None:
    noise = hashlib.shake_256(b"noise").digest(600_000)
    text = b"".join(b"line %d of some text\n" % i for i in range(30_000))
    tar = make_tar([reg("noise.bin", noise), reg("text.txt", text)])
    blob, result = convert(tar, chunk_size=300_000)
    b = check_blob(tar, blob, result)
    for e in b.entries:
        if e["name"] in ("noise.bin", "text.txt") and "offset" in e:
            # First deflate block header right after the 10-byte gzip header: BTYPE 00 = stored.
            btype = (blob[e["offset"] + 10] >> 1) & 3
            assert (btype == 0) == (e["name"] == "noise.bin"), e
    assert len(blob) < len(noise) + len(text) // 4


def test_prioritized_order_follows_upstream_move_rule() -> None:
    members = [
        special("a", tarfile.DIRTYPE),
        special("a/b", tarfile.DIRTYPE),
        reg("a/b/target", b"target data"),
        reg("a/other", b"other"),
        special("z", tarfile.DIRTYPE),
        special("z/link", tarfile.LNKTYPE, linkname="a/b/target"),
        reg("implicit/parent/file", b"deep"),
        reg("last", b"last"),
    ]
    tar = make_tar(members)
    blob, result = convert(tar, prioritized=["/last", "z/link", "./implicit/parent/file"])
    b = check_blob(tar, blob, result)
    names = [clean(e["name"]) for e in b.entries]
    # Parents first, a hardlink's target (with its parents) before the link, implicit parents
    # skipped, then the landmark, then the rest in input order.
    assert names == [
        "last",
        "z",
        "a",
        "a/b",
        "a/b/target",
        "z/link",
        "implicit/parent/file",
        ".prefetch.landmark",
        "a/other",
    ]


def test_missing_prioritized_file_is_not_found() -> None:
    tar = make_tar([reg("a", b"x")])
    with pytest.raises(NotFoundError, match="nope"):
        convert(tar, prioritized=["a", "nope"])


def test_duplicate_names_last_one_wins() -> None:
    tar = make_tar([reg("f", b"first" * 300), reg("g", b"g"), reg("f", b"second")])
    # Streaming: the earlier copy stays in the tar stream (an extractor overwrites it) but
    # only the last one is in the TOC.
    blob, _ = convert(tar, chunk_size=512)
    b = parse_blob(blob)
    rows = [e for e in b.entries if e["name"] == "f"]
    assert [e["type"] for e in rows] == ["reg"] and rows[0]["size"] == 6
    contents = tar_contents(gunzip(blob))
    assert contents["f"] == b"second"
    check_toc_payloads(b, contents)
    # Spooled (prioritized): the earlier copy is gone from the blob too, as upstream does.
    blob, _ = convert(tar, prioritized=["g"])
    names = [e["name"] for e in tar_view(gunzip(blob))]
    assert names.count("f") == 1
    assert [clean(e["name"]) for e in parse_blob(blob).entries] == [
        "g",
        ".prefetch.landmark",
        "f",
    ]


def test_long_runs_of_headers_are_split_without_breaking_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(estargz_writer, "_MAX_HEADER_RUN", 4096)
    members = [special(f"l{i:04d}", tarfile.SYMTYPE, linkname="x" * 200) for i in range(100)]
    members.append(reg("after", b"payload"))
    tar = make_tar(members)
    blob, result = convert(tar)
    b = check_blob(tar, blob, result)
    assert len(b.members) > 10
    before, _ = convert(tar, workers=1)
    assert before == blob


def test_gnu_format_and_pax_globals() -> None:
    long = "d/" + "n" * 150
    members = [reg(long, b"long name"), special("d/s", tarfile.SYMTYPE, linkname="t" * 150)]
    tar = make_tar(members, fmt=tarfile.GNU_FORMAT)
    blob, result = convert(tar)
    b = check_blob(tar, blob, result)
    assert {e["name"] for e in b.entries} >= {long, "d/s"}
    assert next(e for e in b.entries if e["name"] == "d/s")["linkName"] == "t" * 150
    # A PAX global header applies to the entries after it, in the TOC as in tarfile.
    tar = make_tar([reg("x", b"1"), reg("y", b"2")], pax_headers={"uname": "globalname"})
    blob, result = convert(tar)
    b = check_blob(tar, blob, result)
    assert [e.get("userName") for e in b.entries if e["name"] in "xy"] == ["globalname", None]


def test_xattrs_and_special_files() -> None:
    ti, data = reg("cap", b"bin")
    ti.pax_headers = {
        "SCHILY.xattr.security.capability": "\x01\x00\udc80",
        "SCHILY.xattr.user.a": "b",
    }
    members = [
        (ti, data),
        special("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        special("dev/loop0", tarfile.BLKTYPE, devmajor=7, devminor=0, mode=0o660),
        special("fifo", tarfile.FIFOTYPE, mode=0o600),
        special("sticky", tarfile.DIRTYPE, mode=0o1777, uid=1000, gid=5, uname="u", gname="g"),
    ]
    tar = make_tar(members)
    blob, result = convert(tar)
    b = check_blob(tar, blob, result)
    by = {e["name"]: e for e in b.entries}
    assert by["cap"]["xattrs"] == {
        "security.capability": base64.b64encode(b"\x01\x00\x80").decode(),
        "user.a": "Yg==",
    }
    assert (by["dev/null"]["devMajor"], by["dev/null"]["devMinor"]) == (1, 3)
    assert by["dev/loop0"]["devMajor"] == 7 and "devMinor" not in by["dev/loop0"]
    assert by["fifo"]["type"] == "fifo" and by["fifo"]["mode"] == 0o600
    assert by["sticky/"]["mode"] == 0o1777 and by["sticky/"]["uid"] == 1000


def test_empty_layer() -> None:
    tar = make_tar([])
    blob, _ = convert(tar)
    b = parse_blob(blob)
    assert [e["name"] for e in b.entries] == [".no.prefetch.landmark"]


def test_modtime_rounding_and_epoch() -> None:
    a, _ = reg("a", b"", mtime=0)
    b_, _ = reg("b", b"")
    b_.pax_headers = {"mtime": "1700000000.5"}
    c, _ = reg("c", b"")
    c.pax_headers = {"mtime": "1700000000.499999999"}
    tar = make_tar([(a, b""), (b_, b""), (c, b"")])
    by = {e["name"]: e for e in parse_blob(convert(tar)[0]).entries}
    assert "modtime" not in by["a"]  # the epoch means "unspecified" upstream
    assert by["b"]["modtime"] == "2023-11-14T22:13:21Z"  # Go's Round: halves go up
    assert by["c"]["modtime"] == "2023-11-14T22:13:20Z"


# ------------------------------------------------------------------------------------------
# Hostile and broken input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [b"../escape", b"a/../../b", b"ok/./../../x", b"/../x", b"./.."],
)
def test_hostile_names_are_rejected(name: bytes) -> None:
    tar = raw_tar(raw_header(b"fine"), raw_header(name))
    with pytest.raises(UnsafePathError) as exc:
        convert(tar)
    assert repr(name.decode()) in str(exc.value)


def test_nul_in_pax_path_is_rejected() -> None:
    tar = raw_tar(pax_block({b"path": b"evil\x00name"}), raw_header(b"placeholder"))
    with pytest.raises(UnsafePathError, match="NUL"):
        convert(tar)


@pytest.mark.parametrize("target", [b"../etc/shadow", b"/../etc/shadow", b"x/../../y"])
def test_hostile_hardlink_targets_are_rejected(target: bytes) -> None:
    tar = raw_tar(raw_header(b"link", b"1", linkname=target))
    with pytest.raises(UnsafePathError, match="link"):
        convert(tar)


async def test_absolute_and_dotted_names_are_cleaned_like_upstream() -> None:
    """Upstream's writer takes absolute member names (GNU tar -P makes them) and its reader
    cleans them: so do ours. The TOC keeps the name as stored; readers clean it."""
    from stargzfs.index import load_index
    from stargzfs.reader import iter_file
    from stargzfs.source import BytesSource

    tar = raw_tar(
        raw_header(b"/", b"5"),
        raw_header(b"/etc", b"5"),
        raw_header(b"/etc/passwd", size=4) + b"root" + bytes(508),
        raw_header(b"//etc//group", size=2) + b"gr" + bytes(510),
        raw_header(b"/etc/link", b"1", linkname=b"/etc/passwd"),
        raw_header(b"./usr/../opt/x", b"5"),
    )
    blob, result = convert(tar)
    b = check_blob(tar, blob, result)
    assert [e["name"] for e in b.entries][1:] == [
        "/",
        "/etc",
        "/etc/passwd",
        "//etc//group",
        "/etc/link",
        "./usr/../opt/x",
    ]
    source = BytesSource(blob)
    index = await load_index(source, result.annotations)
    assert [p for p, _ in index.walk()] == [
        "etc",
        "etc/group",
        "etc/link",
        "etc/passwd",
        "opt",
        "opt/x",
    ]
    link = index.resolve("etc/link")
    assert link is not None and link.hardlink and link.nlink == 2
    assert b"".join([p async for p in iter_file(source, index, link)]) == b"root"
    # Absolute names go through the prioritized (spooled) path too.
    blob, result = convert(tar, prioritized=["/etc/passwd"])
    names = [e["name"] for e in parse_blob(blob).entries]
    assert names.index("/etc/passwd") < names.index(".prefetch.landmark")


def test_dangling_hardlink_is_a_format_error() -> None:
    tar = raw_tar(raw_header(b"link", b"1", linkname=b"missing"))
    with pytest.raises(FormatError, match="missing"):
        convert(tar)


def test_hostile_name_in_prioritized_mode_too() -> None:
    tar = raw_tar(raw_header(b"a"), raw_header(b"../b"))
    with pytest.raises(UnsafePathError, match=r"\.\./b"):
        convert(tar, prioritized=["a"])


def broken_inputs() -> Iterator[tuple[str, bytes]]:
    tar = fixture_tar("basic")
    yield "mid-payload", tar[: 1536 + 5]
    yield "mid-header", tar[:700]
    yield "mid-extension-header", raw_tar(pax_block({b"path": b"x" * 10}))[:520]
    bad = bytearray(tar)
    bad[0] ^= 0x55  # first header no longer matches its checksum
    yield "bad-checksum", bytes(bad)
    yield "not-a-tar", b"hello world, this is not a tar" * 40
    yield "truncated-gzip", gzip.compress(tar, mtime=0)[:-100]
    yield "corrupt-gzip", gzip.compress(tar, mtime=0)[:50] + b"\xff" * 200
    yield "zero-block-then-data", raw_tar()[:512] + raw_header(b"x") + bytes(512)
    yield "bad-octal", raw_tar(raw_header(b"x").replace(b"00000000000\0", b"0000000009x\0", 1))
    yield (
        "bad-pax",
        raw_tar(raw_header(b"PaxHeader", b"x", 10) + b"garbage!!\n" + bytes(502), raw_header(b"x")),
    )


@pytest.mark.parametrize(
    "what,data", list(broken_inputs()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_broken_input_is_a_format_error(what: str, data: bytes) -> None:
    with pytest.raises(FormatError):
        convert(data)


def test_truncated_zstd_is_a_format_error() -> None:
    tar = fixture_tar("chunked")
    data = zstandard.ZstdCompressor().compress(tar)
    with pytest.raises(FormatError):
        convert(data[: len(data) // 2])


def test_bad_options_are_usage_errors() -> None:
    tar = make_tar([])
    for kw in (
        {"chunk_size": 0},
        {"min_chunk_size": -1},
        {"compression_level": 10},
        {"workers": 0},
        {"prioritized": "a/b"},
    ):
        with pytest.raises(UsageError):
            convert(tar, **kw)


# ------------------------------------------------------------------------------------------
# Generated trees
# ------------------------------------------------------------------------------------------

CS = 256
_segment = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", ".."))
_size = st.one_of(
    st.sampled_from([0, 1, CS - 1, CS, CS + 1, 2 * CS, 3 * CS - 1, 511, 512, 513]),
    st.integers(0, 4 * CS),
)


@st.composite
def trees(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    n = draw(st.integers(1, 25))
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    files: list[str] = []
    used: set[str] = set()
    for i in range(n):
        parts = draw(st.lists(_segment, min_size=1, max_size=3))
        name = "/".join(parts)
        if name in used or any(name.startswith(u + "/") or u.startswith(name + "/") for u in used):
            continue
        used.add(name)
        kind = draw(st.sampled_from(["reg", "reg", "reg", "dir", "symlink", "hardlink"]))
        if kind == "hardlink" and not files:
            kind = "reg"
        if kind == "reg":
            size = draw(_size)
            seed = draw(st.integers(0, 3))
            data = (
                (bytes([i % 256]) * size)
                if seed == 0
                else hashlib.shake_256(f"{i}-{seed}".encode()).digest(size)
                if size
                else b""
            )
            ti, _ = reg(
                name,
                data,
                mode=draw(st.sampled_from([0o644, 0o755, 0o4755, 0o600])),
                uid=draw(st.sampled_from([0, 1000])),
                uname=draw(st.sampled_from(["", "root", "u"])),
            )
            if draw(st.booleans()):
                ti.pax_headers = {"SCHILY.xattr.user.k": draw(st.text(max_size=5))}
            members.append((ti, data))
            files.append(name)
        elif kind == "dir":
            members.append(
                special(name, tarfile.DIRTYPE, mode=draw(st.sampled_from([0o755, 0o1777])))
            )
        elif kind == "symlink":
            members.append(
                special(
                    name,
                    tarfile.SYMTYPE,
                    linkname=draw(
                        st.text(min_size=1, max_size=120).filter(lambda s: "\x00" not in s)
                    ),
                )
            )
        else:
            members.append(special(name, tarfile.LNKTYPE, linkname=draw(st.sampled_from(files))))
    prioritized = (
        draw(st.lists(st.sampled_from(sorted(used)), max_size=3, unique=True))
        if draw(st.booleans())
        else []
    )
    return make_tar(members), prioritized


def tar_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [m.name.rstrip("/") for m in tf]


def landmark_of(prioritized: list[str]) -> str:
    return ".prefetch.landmark" if prioritized else ".no.prefetch.landmark"


def system_tar_listing(blob: bytes) -> list[str] | None:
    """The member names ``gzip -dc | tar -tf -`` prints (None without those tools)."""
    if shutil.which("gzip") is None or shutil.which("tar") is None:
        return None
    env = {**os.environ, "LC_ALL": "C"}  # every non-ASCII byte printed as an octal escape
    gz = subprocess.Popen(["gzip", "-dc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert gz.stdin is not None
    tar = subprocess.Popen(
        ["tar", "--quoting-style=escape", "-tf", "-"],
        stdin=gz.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert gz.stdout is not None
    gz.stdout.close()  # tar holds the read end now
    gz.stdin.write(blob)
    gz.stdin.close()
    out, err = tar.communicate()
    assert gz.wait() == 0 and tar.returncode == 0, err
    return [
        codecs.escape_decode(line)[0].decode("utf-8", "surrogateescape").rstrip("/")
        for line in out.split(b"\n")[:-1]
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees(), min_chunk=st.sampled_from([0, 0, 64, 700]), workers=st.sampled_from([1, 2]))
def test_generated_trees(tree: tuple[bytes, list[str]], min_chunk: int, workers: int) -> None:
    tar, prioritized = tree
    blob, result = convert(
        tar, chunk_size=CS, min_chunk_size=min_chunk, prioritized=prioritized, workers=workers
    )
    b = check_blob(tar, blob, result)
    # A plain `gzip -dc | tar -t` (no Python in the loop) lists the input plus TOC and landmark.
    listing = system_tar_listing(blob)
    if listing is not None:
        assert listing == tar_names(gunzip(blob))
        expected = [*tar_names(tar), "stargz.index.json", landmark_of(prioritized)]
        assert sorted(listing) == sorted(expected)
    names = [clean(e["name"]) for e in b.entries]
    landmark = landmark_of(prioritized)
    assert names.count(landmark) == 1
    before = names[: names.index(landmark)]
    assert set(map(clean, prioritized)) <= set(before)
    if not prioritized:
        assert names[0] == landmark
    if min_chunk == 0:
        offsets = [e["offset"] for e in b.entries if "offset" in e]
        assert len(set(offsets)) == len(offsets)
    # Hardlink targets precede their links.
    seen: set[str] = set()
    for e in b.entries:
        if e["type"] == "hardlink":
            assert clean(e["linkName"]) in seen
        seen.add(clean(e["name"]))


# ------------------------------------------------------------------------------------------
# zstd:chunked (stargz-snapshotter dialect)
# ------------------------------------------------------------------------------------------

SKIPPABLE = b"\x50\x2a\x4d\x18"


@dataclass
class ZstdBlob:
    data: bytes
    toc_offset: int
    toc_json: bytes
    toc_packed: bytes
    entries: list[dict[str, Any]]
    frames: list[int]


def parse_zstd_blob(data: bytes) -> ZstdBlob:
    footer = data[-48:]
    assert footer[:4] == SKIPPABLE and footer[4:8] == (40).to_bytes(4, "little")
    toc_offset, packed_size, raw_size, kind = struct.unpack("<QQQQ", footer[8:40])
    assert footer[40:] == b"GnUlInUx" and kind == 1
    assert data[toc_offset - 8 : toc_offset - 4] == SKIPPABLE
    assert int.from_bytes(data[toc_offset - 4 : toc_offset], "little") == packed_size
    assert toc_offset + packed_size == len(data) - 48
    packed = data[toc_offset : toc_offset + packed_size]
    toc_json = zstandard.ZstdDecompressor().decompress(packed, max_output_size=raw_size)
    assert len(toc_json) == raw_size
    frames = []
    off = 0
    end = toc_offset - 8
    while off < end:
        frames.append(off)
        d = zstandard.ZstdDecompressor().decompressobj()
        d.decompress(data[off:end])
        assert d.eof
        off = end - len(d.unused_data)
    toc = json.loads(toc_json)
    return ZstdBlob(data, toc_offset, toc_json, packed, toc["entries"], frames)


def zstd_convert(tar: bytes, **kw: Any) -> tuple[bytes, ConvertResult]:
    return convert(tar, layer_format="zstd:chunked", **kw)


def check_zstd_blob(tar: bytes, blob: bytes, result: ConvertResult) -> ZstdBlob:
    z = parse_zstd_blob(blob)
    raw = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True).read()
    assert result.media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert result.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    # The TOC sits in skippable frames: the uncompressed stream is the entries only.
    assert result.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert result.uncompressed_size == len(raw)
    assert result.toc_offset == z.toc_offset
    assert result.toc_digest == "sha256:" + hashlib.sha256(z.toc_json).hexdigest()
    assert result.annotations == {
        "containerd.io/snapshot/stargz/toc.digest": result.toc_digest,
        "io.containers.estargz.uncompressed-size": str(len(raw)),
        "io.containers.zstd-chunked.manifest-checksum": "sha256:"
        + hashlib.sha256(z.toc_packed).hexdigest(),
        "io.containers.zstd-chunked.manifest-position": (
            f"{z.toc_offset}:{len(z.toc_packed)}:{len(z.toc_json)}:1"
        ),
    }
    got = [e for e in tar_view(raw) if clean(e["name"]) not in HIDDEN]
    want = [e for e in tar_view(tar) if clean(e["name"]) not in HIDDEN]
    assert sorted(got, key=lambda e: e["name"]) == sorted(want, key=lambda e: e["name"])
    # Same payload checks as for gzip, frames instead of members.
    contents = tar_contents(raw)
    frames = set(z.frames)
    sizes: dict[str, int] = {}
    for e in z.entries:
        if e["type"] == "reg":
            sizes[e["name"]] = e.get("size", 0)
        if "offset" not in e:
            continue
        assert e["offset"] in frames
        data = contents[clean(e["name"])]
        start = e.get("chunkOffset", 0)
        length = e.get("chunkSize") or sizes[e["name"]] - start
        chunk = data[start : start + length]
        assert e["chunkDigest"] == "sha256:" + hashlib.sha256(chunk).hexdigest()
        d = zstandard.ZstdDecompressor().decompressobj()
        stream = d.decompress(blob[e["offset"] : z.toc_offset - 8])
        inner = e.get("innerOffset", 0)
        assert stream[inner : inner + length] == chunk, e["name"]
    return z


def test_zstd_chunked_matches_reference() -> None:
    tar = fixture_tar("zstdchunked")
    meta = fixture_meta("zstdchunked")
    blob, result = zstd_convert(tar, chunk_size=65536)
    z = check_zstd_blob(tar, blob, result)
    assert result.uncompressed_size == meta["uncompressed_size"]
    theirs = [json.loads(line) for line in (FIXTURES / "zstdchunked.toc.jsonl").open()]
    ignore = {"offset", "userName", "groupName"}
    assert [{k: v for k, v in e.items() if k not in ignore} for e in z.entries] == [
        {k: v for k, v in e.items() if k not in ignore} for e in theirs
    ]
    assert resolved_owner_names(z.entries) == resolved_owner_names(theirs)
    # Upstream's own blob satisfies the same hand checks (our parser is not just our mirror).
    up = parse_zstd_blob((FIXTURES / "zstdchunked.zstdchunked").read_bytes())
    assert up.toc_offset == meta["toc_info"]["toc_offset"]
    assert [e.get("offset") is None for e in up.entries] == [
        e.get("offset") is None for e in z.entries
    ]


def test_zstd_chunked_deterministic_packed_and_prioritized() -> None:
    tar = fixture_tar("prioritized")
    prio = fixture_meta("prioritized")["build_options"]["prioritized_files"]
    blob, result = zstd_convert(tar, chunk_size=65536, prioritized=prio, workers=1)
    check_zstd_blob(tar, blob, result)
    assert zstd_convert(tar, chunk_size=65536, prioritized=prio, workers=3)[0] == blob
    blob, result = zstd_convert(tar, chunk_size=65536, min_chunk_size=1500)
    z = check_zstd_blob(tar, blob, result)
    assert any("innerOffset" in e for e in z.entries)


def test_zstd_chunked_level_range() -> None:
    with pytest.raises(UsageError):
        zstd_convert(make_tar([]), compression_level=0)
    with pytest.raises(UsageError):
        convert(make_tar([]), layer_format="zstd")


async def test_reader_reads_our_zstd_chunked() -> None:
    from stargzfs.index import load_index
    from stargzfs.reader import iter_file
    from stargzfs.source import BytesSource

    meta = fixture_meta("zstdchunked")
    blob, result = zstd_convert(fixture_tar("zstdchunked"), chunk_size=65536)
    source = BytesSource(blob)
    index = await load_index(source, result.annotations)
    got = dict(index.walk())
    assert sorted(got) == [e["path"] for e in meta["entries"]]
    for want in meta["entries"]:
        if want["sha256"] is not None:
            digest = hashlib.sha256()
            async for piece in iter_file(source, index, got[want["path"]]):
                digest.update(piece)
            assert digest.hexdigest() == want["sha256"], want["path"]


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def test_cli_convert_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prio = tmp_path / "prio.txt"
    prio.write_text("app/bin/server\n\n/app/lib/libcore.so\n./app/etc/config.yaml\n")
    out = tmp_path / "out.esgz"
    rc = cli_main(
        [
            "convert-layer",
            str(FIXTURES / "prioritized.tar"),
            str(out),
            "--chunk-size",
            "64K",
            "--prioritize",
            str(prio),
            "--level",
            "9",
        ]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    blob = out.read_bytes()
    assert printed["blob_digest"] == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert printed["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
    lib, _ = convert(
        fixture_tar("prioritized"),
        chunk_size=65536,
        compression_level=9,
        prioritized=["app/bin/server", "/app/lib/libcore.so", "./app/etc/config.yaml"],
    )
    assert blob == lib
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it


def test_cli_zstd_chunked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "z.zst"
    argv = ["convert-layer", str(FIXTURES / "noprio.tar"), str(out), "--format", "zstd:chunked"]
    assert cli_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["media_type"].endswith("+zstd")
    check_zstd_blob(fixture_tar("noprio"), out.read_bytes(), convert_result(printed))


def test_cli_convert_layer_from_a_pipe(tmp_path: Path) -> None:
    """IN may be "-": a pipe, read once front to back."""
    out = tmp_path / "piped.esgz"
    tar = fixture_tar("chunked")
    proc = subprocess.run(
        [sys.executable, "-m", "stargzfs", "convert-layer", "-", str(out), "--chunk-size", "64K"],
        input=gzip.compress(tar, mtime=0),  # compressed input through the pipe, too
        capture_output=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    printed = json.loads(proc.stdout)
    blob = out.read_bytes()
    assert printed["blob_digest"] == "sha256:" + hashlib.sha256(blob).hexdigest()
    lib, result = convert(tar, chunk_size=65536)
    assert blob == lib and printed["annotations"] == result.annotations


def test_cli_convert_layer_tar_zst_with_min_chunk_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tar = fixture_tar("basic")
    src = tmp_path / "layer.tar.zst"
    src.write_bytes(zstandard.ZstdCompressor(level=3).compress(tar))
    out = tmp_path / "packed.esgz"
    argv = ["convert-layer", str(src), str(out), "--min-chunk-size", "16K", "--chunk-size", "64K"]
    assert cli_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    blob = out.read_bytes()
    lib, result = convert(tar, chunk_size=65536, min_chunk_size=16384)
    assert blob == lib and printed["toc_digest"] == result.toc_digest
    b = check_blob(tar, blob, result)
    assert any(e.get("innerOffset") for e in b.entries)  # small files share members
    plain, _ = convert(tar, chunk_size=65536)
    assert len(blob) < len(plain)


def convert_result(d: dict[str, Any]) -> ConvertResult:
    return ConvertResult(**d)


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.esgz"
    assert cli_main(["convert-layer", str(tmp_path / "missing.tar"), str(out)]) == 4
    hostile = tmp_path / "hostile.tar"
    hostile.write_bytes(raw_tar(raw_header(b"../x")))
    assert cli_main(["convert-layer", str(hostile), str(out)]) == 6
    assert "../x" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [hostile]  # no partial output
    with pytest.raises(SystemExit):
        cli_main(["convert-layer", str(hostile), str(out), "--chunk-size", "lots"])


# ------------------------------------------------------------------------------------------
# Through the project's reader
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
async def test_reader_sees_the_reference_view(case: str) -> None:
    """Our blob of each fixture tar, read lazily by stargzfs, gives the fixture's expected view."""
    from stargzfs.index import load_index
    from stargzfs.reader import iter_file
    from stargzfs.source import BytesSource

    meta = fixture_meta(case)
    blob, result = fixture_convert(case)
    source = BytesSource(blob)
    index = await load_index(source, result.annotations)
    got = dict(index.walk())
    assert sorted(got) == [e["path"] for e in meta["entries"]]
    assert index.landmark == meta["landmark"]
    for want in meta["entries"]:
        entry = got[want["path"]]
        assert entry.mode == want["mode"] and entry.uid == want["uid"], want["path"]
        assert index.uname(entry.uid) == want["uname"] or entry.implicit
        assert entry.linkname == want["linkname"]
        assert {k: base64.b64encode(v).decode() for k, v in entry.xattrs.items()} == want["xattrs"]
        if want["sha256"] is not None:
            digest = hashlib.sha256()
            async for piece in iter_file(source, index, entry):
                digest.update(piece)
            assert digest.hexdigest() == want["sha256"], want["path"]
