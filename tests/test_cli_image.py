"""``stargzfs layers/ls/cat/get`` against the fixture image: on a real registry and as a
local OCI layout."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from stargzfs.cli.image_cmds import mode_string
from stargzfs.cli.main import main

MERGED = "whiteout-merged.json"


@pytest.fixture(params=["registry", "oci"])
def image_ref(request: pytest.FixtureRequest, oci_layout: Path) -> str:
    if request.param == "registry":
        return str(request.getfixturevalue("fixture_image"))
    return f"oci:{oci_layout}:v1"


def _merged(fixtures_dir: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads((fixtures_dir / MERGED).read_text())["entries"]
    return entries


def test_mode_string() -> None:
    assert mode_string("dir", 0o755) == "drwxr-xr-x"
    assert mode_string("reg", 0o4755) == "-rwsr-xr-x"
    assert mode_string("reg", 0o2644) == "-rw-r-Sr--"
    assert mode_string("dir", 0o1777) == "drwxrwxrwt"
    assert mode_string("symlink", 0o777) == "lrwxrwxrwx"


def test_layers(image_ref: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", "--json", image_ref]) == 0
    doc = json.loads(capsys.readouterr().out)
    layers = doc["layers"]
    assert [layer["format"] for layer in layers] == ["estargz", "estargz"]
    assert all(layer["verified"] and layer["lazy"] for layer in layers)
    assert all(layer["entries"] > 0 for layer in layers)
    assert doc["manifest_digest"].startswith("sha256:")
    assert main(["layers", image_ref]) == 0
    assert capsys.readouterr().out.count("estargz") == 2


def test_ls_recursive_matches_fixture(
    image_ref: str, fixtures_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ls", "-R", image_ref]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed == [e["path"] for e in _merged(fixtures_dir)]


def test_ls_long_and_json(
    image_ref: str, fixtures_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ls", "-l", image_ref, "/usr/bin"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_name = {line.split()[-1] if "->" not in line else line.split()[-3]: line for line in lines}
    assert by_name["su"].startswith("-rwsr-xr-x root")
    assert by_name["hi"].startswith("lrwxrwxrwx") and by_name["hi"].endswith("hi -> hello")
    assert main(["ls", "--json", "-R", image_ref]) == 0
    records = json.loads(capsys.readouterr().out)
    expected = {e["path"]: e for e in _merged(fixtures_dir)}
    for rec in records:
        exp = expected[rec["path"]]
        assert rec["mode"] == exp["mode"], rec["path"]
        assert (rec["uid"], rec["gid"]) == (exp["uid"], exp["gid"])
        if exp["type"] == "reg":
            assert rec["size"] == exp["size"]


def test_cat(image_ref: str, fixtures_dir: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    expected = {e["path"]: e for e in _merged(fixtures_dir)}
    for path in ("etc/passwd", "/usr/share/doc/sizes/size-4096", "etc/motd/10-welcome"):
        assert main(["cat", image_ref, path]) == 0
        data = capfdbinary.readouterr().out
        assert hashlib.sha256(data).hexdigest() == expected[path.lstrip("/")]["sha256"]


def test_get_directory(image_ref: str, fixtures_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    assert main(["get", image_ref, "/", str(dest)]) == 0
    for e in _merged(fixtures_dir):
        p = dest / e["path"]
        if e["type"] in ("char", "block", "fifo"):
            assert not os.path.lexists(p)
            continue
        st = p.lstat()
        if e["type"] == "symlink":
            assert stat.S_ISLNK(st.st_mode) and os.readlink(p) == e["linkname"]
            continue
        assert stat.S_IMODE(st.st_mode) == e["mode"], e["path"]
        if e["mtime"] is not None:
            assert int(st.st_mtime) == e["mtime"], e["path"]
        if e["type"] in ("reg", "hardlink"):
            assert hashlib.sha256(p.read_bytes()).hexdigest() == e["sha256"], e["path"]
        else:
            assert stat.S_ISDIR(st.st_mode)


def test_get_file_into_dir_and_to_file(image_ref: str, tmp_path: Path) -> None:
    assert main(["get", image_ref, "etc/passwd", str(tmp_path)]) == 0
    assert (tmp_path / "passwd").stat().st_size > 0
    assert main(["get", image_ref, "etc/passwd", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy").read_bytes() == (tmp_path / "passwd").read_bytes()


def test_get_refuses_dotdot(image_ref: str, tmp_path: Path) -> None:
    assert main(["get", image_ref, "etc/../etc/passwd", str(tmp_path)]) == 2
    assert list(tmp_path.iterdir()) == []


def test_missing_path_is_4(image_ref: str, tmp_path: Path) -> None:
    assert main(["cat", image_ref, "no/such/file"]) == 4
    assert main(["ls", image_ref, "/nope"]) == 4
    assert main(["get", image_ref, "/nope", str(tmp_path / "x")]) == 4


def test_bad_reference_is_2() -> None:
    assert main(["ls", "Not A Ref"]) == 2
    assert main(["layers", "UPPER/case:v1"]) == 2


def test_missing_tag_in_layout_is_4(oci_layout: Path) -> None:
    assert main(["layers", f"oci:{oci_layout}:nope"]) == 4


def test_basic_auth_without_creds_is_3(
    registry_basic: Any, oci_layout: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ref = registry_basic.push_oci(oci_layout, "v1", "cli-image/basic:v1")
    # No credential files: nothing found.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert main(["layers", ref]) == 3


def test_basic_auth_with_creds_stdin(
    registry_basic: Any,
    oci_layout: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import io

    ref = registry_basic.push_oci(oci_layout, "v1", "cli-image/basic:v1")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    creds = f"{registry_basic.username}:{registry_basic.password}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(creds))
    assert main(["ls", "--creds-stdin", ref, "etc"]) == 0
    assert "passwd" in capsys.readouterr().out.splitlines()


def _write_blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


@pytest.fixture
def plain_layout(tmp_path: Path, fixtures_dir: Path) -> Path:
    """A one-layer OCI layout whose layer is a plain tar.gz (no TOC)."""
    import gzip

    layout = tmp_path / "plain"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    tar = (fixtures_dir / "basic.tar").read_bytes()
    layer = gzip.compress(tar, mtime=0)
    config = json.dumps(
        {
            "os": "linux",
            "architecture": "amd64",
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _write_blob(layout, config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": _write_blob(layout, layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _write_blob(layout, manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "plain"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    return layout


def test_plain_layer_is_not_lazy_but_readable(
    plain_layout: Path,
    fixtures_dir: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert main(["layers", "--json", f"oci:{plain_layout}"]) == 0
    (layer,) = json.loads(capsys.readouterr().out)["layers"]
    assert (layer["format"], layer["lazy"], layer["verified"], layer["entries"]) == (
        "gzip",
        False,
        False,
        None,
    )
    # Not lazy, but it still works: fetched whole, verified, indexed from its tar headers.
    assert main(["ls", "-R", f"oci:{plain_layout}:plain"]) == 0
    captured = capsys.readouterr()
    assert "usr/bin/su" in captured.out
    assert "not lazy" in caplog.text  # the user is told (a warning on stderr)
    assert main(["cat", f"oci:{plain_layout}:plain", "etc/passwd"]) == 0
    exp = {e["path"]: e for e in json.loads((fixtures_dir / "basic.json").read_text())["entries"]}
    out = capsys.readouterr().out.encode()
    assert hashlib.sha256(out).hexdigest() == exp["etc/passwd"]["sha256"]


def test_cat_subprocess(oci_layout: Path, fixtures_dir: Path) -> None:
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "stargzfs", "cat", f"oci:{oci_layout}:v1", "usr/bin/su"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    expected = {e["path"]: e for e in _merged(fixtures_dir)}["usr/bin/su"]["sha256"]
    assert hashlib.sha256(res.stdout).hexdigest() == expected


UPPER = "sha256:5acfda559be13b26c49dd8cf32301a1c9b774ab78d75b6d0dec828b1baf1aae0"
LOWER = "sha256:0ffa2fec3c500b308c2f5a54214d095314301a3c552a2a1e379b8c89fa65c694"


def test_ls_one_layer(
    image_ref: str, fixtures_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upper = json.loads((fixtures_dir / "whiteout-upper.json").read_text())
    assert upper["blob_digest"] == UPPER
    # The layer as its tar has it: whiteouts and the opaque marker are listed, nothing merged.
    for spec in (UPPER, UPPER[:14], UPPER.removeprefix("sha256:")[:8]):
        assert main(["ls", "-R", "--layer", spec, image_ref]) == 0
        assert capsys.readouterr().out.splitlines() == [e["path"] for e in upper["entries"]]
    assert main(["ls", "--layer", UPPER[:12], image_ref, "srv/www"]) == 0
    assert capsys.readouterr().out.splitlines() == [".wh..wh..opq", "index.html"]
    assert main(["ls", "--json", "--layer", LOWER[:12], image_ref, "/usr/bin/su"]) == 0
    (rec,) = json.loads(capsys.readouterr().out)
    assert (rec["path"], rec["layer"], rec["mode"]) == ("usr/bin/su", 0, 0o4755)
    # In the merged tree the lower layer's /etc/hostname is whited out; in the layer it is not.
    assert main(["ls", "--layer", LOWER[:12], image_ref, "etc/hostname"]) == 0
    assert capsys.readouterr().out.splitlines() == ["etc/hostname"]
    assert main(["ls", image_ref, "etc/hostname"]) == 4
    assert main(["ls", "--layer", UPPER[:12], image_ref, "usr"]) == 4


def test_ls_unknown_layer_is_4_and_lists_layers(
    image_ref: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ls", "--layer", "sha256:beef", image_ref]) == 4
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "sha256:beef" in err and LOWER in err and UPPER in err
    assert main(["ls", "--layer", "sha256:", image_ref]) == 2  # a prefix of both: ambiguous
    assert "several layers" in capsys.readouterr().err


def test_get_several_paths_into_a_directory(
    image_ref: str, fixtures_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = {e["path"]: e for e in _merged(fixtures_dir)}
    dest = tmp_path / "out"
    dest.mkdir()
    argv = [
        "get",
        "--json",
        image_ref,
        "etc/passwd",
        "/usr/share/doc/sizes",
        "usr/bin/hi",
        str(dest),
    ]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["skipped"] == 0
    assert [(c["path"], c["dest"], c["type"]) for c in doc["copied"]] == [
        ("etc/passwd", str(dest / "passwd"), "reg"),
        ("/usr/share/doc/sizes", str(dest / "sizes"), "dir"),
        ("usr/bin/hi", str(dest / "hi"), "symlink"),
    ]
    assert sorted(os.listdir(dest)) == ["hi", "passwd", "sizes"]
    digest = hashlib.sha256((dest / "passwd").read_bytes()).hexdigest()
    assert digest == expected["etc/passwd"]["sha256"]
    assert os.readlink(dest / "hi") == "hello"
    sizes = sorted(p for p in expected if p.startswith("usr/share/doc/sizes/"))
    assert sizes and sorted(os.listdir(dest / "sizes")) == [p.rsplit("/", 1)[1] for p in sizes]
    for p in sizes:
        data = (dest / "sizes" / p.rsplit("/", 1)[1]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == expected[p]["sha256"], p


def test_get_several_paths_needs_a_directory(image_ref: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert main(["get", image_ref, "etc/passwd", "etc/group", str(missing)]) == 2
    assert not missing.exists()
    afile = tmp_path / "file"
    afile.write_text("x")
    assert main(["get", image_ref, "etc/passwd", "etc/group", str(afile)]) == 2
    assert afile.read_text() == "x"
    # Two sources with one name would overwrite each other: refused before anything is copied.
    assert main(["get", image_ref, "etc/passwd", "etc/passwd", str(tmp_path)]) == 2
    # A missing path is found out before anything is written.
    assert main(["get", image_ref, "etc/passwd", "no/such", str(tmp_path)]) == 4
    assert sorted(os.listdir(tmp_path)) == ["file"]


def _run_cli(*argv: str) -> Any:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "stargzfs", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_os_errors_are_one_line_without_traceback(oci_layout: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ref = f"oci:{oci_layout}:v1"
    for path in ("etc/passwd", "etc"):  # a file, then a directory, under a regular file
        res = _run_cli("get", ref, path, str(blocker / "sub"))
        assert res.returncode == 1, res.stderr
        assert "Traceback" not in res.stderr
        (line,) = res.stderr.splitlines()
        assert line.startswith("stargzfs: error: ") and str(blocker / "sub") in line
        assert "Not a directory" in line
    assert blocker.read_text() == "x"
    res = _run_cli("--debug", "get", ref, "etc/passwd", str(blocker / "sub"))
    assert res.returncode == 1 and "Traceback" in res.stderr


def test_unexpected_exception_is_an_internal_error(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    oci_layout: Path,
) -> None:
    from stargzfs.cli import image_cmds

    async def broken(args: Any) -> int:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(image_cmds, "cmd_layers", broken)
    assert main(["layers", f"oci:{oci_layout}"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("stargzfs: internal error: RuntimeError: boom second line")
    assert "Traceback" not in caplog.text
    assert main(["--debug", "layers", f"oci:{oci_layout}"]) == 1
    assert "Traceback" in caplog.text  # (a subprocess would have it on stderr)


def test_error_inside_an_exception_group_keeps_its_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], oci_layout: Path
) -> None:
    from stargzfs.cli import image_cmds
    from stargzfs.errors import NotFoundError

    async def grouped(args: Any) -> int:
        raise ExceptionGroup("nursery", [NotFoundError("no such thing")])

    monkeypatch.setattr(image_cmds, "cmd_layers", grouped)
    assert main(["layers", f"oci:{oci_layout}"]) == 4
    assert capsys.readouterr().err == "stargzfs: error: no such thing\n"


def _tar(members: list[tuple[str, str, bytes | str]]) -> bytes:
    """A tar of (name, "file"|"dir"|"symlink", content or link target)."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "symlink":
                assert isinstance(value, str)
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, value, 0o777
                tar.addfile(info)
            else:
                assert isinstance(value, bytes)
                info.size, info.mode = len(value), 0o755
                tar.addfile(info, io.BytesIO(value))
    return buf.getvalue()


@pytest.fixture(scope="module")
def symlink_layout(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two eStargz layers: the symlinks below, the files they lead to in the upper one."""
    from harness.oci import estargz_layer, write_oci_layout

    lower = _tar(
        [
            ("bin", "symlink", "usr/bin"),
            ("lib", "symlink", "/usr/lib"),
            ("usr", "dir", b""),
            ("usr/bin", "dir", b""),
            ("usr/bin/sh", "symlink", "dash"),
            ("usr/bin/up", "symlink", "../../../../usr/lib/libc.so"),  # '..' stops at root
            ("usr/bin/abs", "symlink", "/bin/sh"),
            ("loop-a", "symlink", "loop-b"),
            ("loop-b", "symlink", "/loop-a"),
            ("dangling", "symlink", "/nowhere"),
            # 40 links to reach the file: allowed, as on Linux; one more is too many.
            *((f"chain-{i}", "symlink", f"chain-{i + 1}") for i in range(39)),
            ("chain-39", "symlink", "usr/lib/libc.so"),
            ("chain-x", "symlink", "chain-0"),
        ]
    )
    upper = _tar(
        [
            ("usr/bin/dash", "file", b"#!dash\n"),
            ("usr/lib/libc.so", "file", b"libc\n"),
        ]
    )
    root = tmp_path_factory.mktemp("symlinks")
    write_oci_layout(root, [estargz_layer(lower), estargz_layer(upper)])
    return f"oci:{root}:v1"


@pytest.mark.parametrize(
    ("path", "content"),
    [
        ("/bin/sh", b"#!dash\n"),  # through the bin -> usr/bin parent, then sh -> dash
        ("bin/dash", b"#!dash\n"),
        ("/usr/bin/abs", b"#!dash\n"),  # absolute target: from the image root, not the host's
        ("lib/libc.so", b"libc\n"),
        ("/usr/bin/up", b"libc\n"),
        ("/bin/../lib/libc.so", b"libc\n"),  # '..' after a symlink: from where it led (/usr)
        ("chain-0", b"libc\n"),
    ],
)
def test_cat_follows_symlinks_inside_the_image(
    symlink_layout: str, path: str, content: bytes, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert main(["cat", symlink_layout, path]) == 0
    assert capfdbinary.readouterr().out == content


def test_symlink_errors_and_other_commands(
    symlink_layout: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cat", symlink_layout, "loop-a"]) == 4
    assert "too many levels of symbolic links" in capsys.readouterr().err
    assert main(["cat", symlink_layout, "chain-x"]) == 4
    assert "too many levels of symbolic links" in capsys.readouterr().err
    assert main(["cat", symlink_layout, "dangling"]) == 4
    assert main(["cat", symlink_layout, "bin"]) == 2  # a directory, once followed
    capsys.readouterr()
    # ls follows symlinked parents; the last name only with a trailing slash.
    assert main(["ls", symlink_layout, "bin/"]) == 0
    assert capsys.readouterr().out.split() == ["abs", "dash", "sh", "up"]
    assert main(["ls", "-l", symlink_layout, "/bin/sh"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(" bin/sh -> dash")
    assert main(["ls", "-l", symlink_layout, "bin"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("bin -> usr/bin")
    # get: through symlinked parents, the named symlink itself copied as a symlink.
    assert main(["get", symlink_layout, "/bin/sh", "/bin/dash", "lib/libc.so", str(tmp_path)]) == 0
    assert os.readlink(tmp_path / "sh") == "dash"
    assert (tmp_path / "dash").read_bytes() == b"#!dash\n"
    assert (tmp_path / "libc.so").read_bytes() == b"libc\n"
