"""Commands that read an image without pulling it: ``layers``, ``ls``, ``cat``, ``get``.

REF is a registry reference (``registry/repo[:tag][@digest]``) or a local OCI layout
(``oci:DIR[:TAG]``). Credentials come from the usual files (docker/podman auth config,
credential helpers), or from ``--creds-stdin`` (one ``USER:PASSWORD`` line on stdin): never
from the command line, where other users could read them.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..index import Entry, LayerIndex, MergedTree, Node
    from ..open_image import OpenedImage
    from ..registry import Credentials
    from ..view import ImageView


def add_network_options(p: argparse.ArgumentParser) -> None:
    """How to reach the registry: the options every command that reads images shares."""
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the registry")
    p.add_argument(
        "--mirror",
        action="append",
        default=[],
        metavar="REGISTRY=MIRROR",
        help="try MIRROR before REGISTRY (repeatable; registries.conf mirrors apply too)",
    )


def add_creds_option(p: argparse.ArgumentParser) -> None:
    """``--creds-stdin``: credentials for the registry, never on the command line."""
    p.add_argument(
        "--creds-stdin",
        action="store_true",
        help="read USER:PASSWORD for the registry from the first line of stdin",
    )


def read_creds_stdin() -> Credentials:
    """The ``USER:PASSWORD`` line ``--creds-stdin`` promises."""
    from ..errors import UsageError
    from ..registry import Credentials

    line = sys.stdin.readline().rstrip("\r\n")
    user, sep, password = line.partition(":")
    if not sep or not user:
        raise UsageError("--creds-stdin: expected USER:PASSWORD on the first line of stdin")
    return Credentials(user, password, source="stdin")


def _common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    p.add_argument("ref", metavar="REF", help="image reference, or oci:DIR[:TAG]")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="default: this machine's")
    add_creds_option(p)
    add_network_options(p)
    p.add_argument("--cache-dir", metavar="DIR", help="keep layer indexes here between runs")
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("layers", help="list an image's layers and their formats")
    _common(p)
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("ls", help="list files of an image (merged layers, or one layer)")
    _common(p)
    p.add_argument("path", metavar="PATH", nargs="?", default="/", help="default: /")
    p.add_argument(
        "--layer",
        metavar="DIGEST",
        help="list this layer alone, whiteout entries included (a digest prefix will do)",
    )
    p.add_argument("-l", dest="long", action="store_true", help="long listing")
    p.add_argument("-R", dest="recursive", action="store_true", help="recursive")
    p.add_argument("-n", dest="numeric", action="store_true", help="numeric uid/gid")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("cat", help="write a file of an image to stdout (fetches only its chunks)")
    _common(p, json_flag=False)
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_cat)

    p = sub.add_parser("get", help="copy files or directories out of an image")
    _common(p)
    p.add_argument("paths", metavar="PATH", nargs="+", help="image paths (files or directories)")
    p.add_argument(
        "dest",
        metavar="DEST",
        help="file or directory to write; with several PATHs, an existing directory",
    )
    p.set_defaults(func=cmd_get)


async def _open(args: argparse.Namespace) -> OpenedImage:
    from ..open_image import open_image

    creds = read_creds_stdin() if args.creds_stdin else None
    return await open_image(
        args.ref,
        platform=args.platform,
        creds=creds,
        insecure=args.insecure,
        mirrors=args.mirror,
        cache_dir=args.cache_dir,
    )


# -- paths ----------------------------------------------------------------------------------------
MAX_SYMLINKS = 40  # as Linux (ELOOP after 40 links in one lookup)


def resolve_in_image(tree: MergedTree, path: str, *, follow_final: bool = False) -> Node:
    """The node at ``path`` in the merged tree, following symlinks as a chroot into the image
    would: absolute targets start again at the image root and ``..`` stops at it. Symlinks
    before the last component are always followed; the last one only with ``follow_final``
    or a trailing ``/``. (The FUSE side never does this: it hands symlinks to the kernel.)

    :raises NotFoundError: a missing name, a non-directory in the middle, or more than
        :data:`MAX_SYMLINKS` symlinks.
    """
    from ..errors import NotFoundError

    follow_final = follow_final or path.endswith("/")
    todo = [p for p in path.split("/") if p and p != "."]
    trail = [tree.root]  # the directories walked through, for ".."
    links = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if len(trail) > 1:
                trail.pop()
            continue
        here = trail[-1]
        if not here.is_dir:
            raise NotFoundError(f"{path}: not a directory in the image")
        node = tree.lookup(here, part)
        if node is None:
            raise NotFoundError(f"{path}: no such file or directory in the image")
        if node.entry.kind == "symlink" and (todo or follow_final):
            links += 1
            if links > MAX_SYMLINKS:
                raise NotFoundError(f"{path}: too many levels of symbolic links in the image")
            target = node.entry.linkname
            if target.startswith("/"):
                trail = [tree.root]
            todo[:0] = [p for p in target.split("/") if p and p != "."]
            continue
        trail.append(node)
    return trail[-1]


# -- layers ---------------------------------------------------------------------------------------
async def layer_rows(img: OpenedImage) -> list[dict[str, Any]]:
    """One dict per layer: digest, size, media type, format, lazy, verified, entries,
    annotations (what ``layers`` and ``inspect`` show)."""
    rows = []
    for i in range(len(img.layers)):
        info = await img.layer_info(i)
        d = info.descriptor
        rows.append(
            {
                "digest": d.digest,
                "size": d.size,
                "media_type": d.media_type,
                "format": info.format,
                "lazy": info.lazy,
                "verified": info.verified,
                "entries": info.entries,
                "annotations": dict(d.annotations),
            }
        )
    return rows


async def cmd_layers(args: argparse.Namespace) -> int:
    import json

    async with await _open(args) as img:
        rows = await layer_rows(img)
    if args.json:
        doc = {"ref": img.ref, "manifest_digest": img.digest, "layers": rows}
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{'DIGEST':<20} {'SIZE':>10}  {'FORMAT':<13} {'VERIFIED':<8} {'ENTRIES':>7}  MEDIA TYPE")
    for r in rows:
        entries = "-" if r["entries"] is None else str(r["entries"])
        print(
            f"{str(r['digest'])[:19]:<20} {r['size']:>10}  {r['format']:<13} "
            f"{'yes' if r['verified'] else 'no':<8} {entries:>7}  {r['media_type']}"
        )
    return 0


# -- ls -------------------------------------------------------------------------------------------
_TYPE_CHAR = {"dir": "d", "reg": "-", "symlink": "l", "char": "c", "block": "b", "fifo": "p"}


def mode_string(kind: str, mode: int) -> str:
    """``drwxr-xr-x``, with s/S/t/T for setuid, setgid and sticky."""
    out = [_TYPE_CHAR.get(kind, "?")]
    for shift, special, char in ((6, 0o4000, "s"), (3, 0o2000, "s"), (0, 0o1000, "t")):
        bits = (mode >> shift) & 7
        out.append("r" if bits & 4 else "-")
        out.append("w" if bits & 2 else "-")
        x = bool(bits & 1)
        if mode & special:
            out.append(char if x else char.upper())
        else:
            out.append("x" if x else "-")
    return "".join(out)


def _mtime(ns: int | None) -> str:
    import datetime

    if ns is None:
        return "-"
    t = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC)
    return t.strftime("%Y-%m-%d %H:%M")


def _record(index: LayerIndex, path: str, e: Entry, layer: int) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "path": path,
        "type": e.kind,
        "mode": e.mode,
        "uid": e.uid,
        "gid": e.gid,
        "uname": e.uname,
        "gname": e.gname,
        "size": e.size if e.kind in ("reg", "symlink") else 0,
        "mtime": None if e.mtime_ns is None else e.mtime_ns // 1_000_000_000,
        "layer": layer,
    }
    if e.kind == "symlink":
        rec["linkname"] = e.linkname
    if e.kind in ("char", "block"):
        rec["dev"] = [e.devmajor, e.devminor]
    return rec


def _node_record(view: ImageView, path: str, node: Node) -> dict[str, Any]:
    return _record(view.tree.layer_of(node), path, node.entry, node.layer)


def _long_line(rec: dict[str, Any], numeric: bool, show: str) -> str:
    owner = str(rec["uid"]) if numeric or not rec["uname"] else rec["uname"]
    group = str(rec["gid"]) if numeric or not rec["gname"] else rec["gname"]
    size = f"{rec['dev'][0]}, {rec['dev'][1]}" if "dev" in rec else str(rec["size"])
    mtime = "-" if rec["mtime"] is None else _mtime(rec["mtime"] * 1_000_000_000)
    line = (
        f"{mode_string(rec['type'], rec['mode'])} {owner:<8} {group:<8} {size:>10} "
        f"{mtime:<16} {show}"
    )
    if "linkname" in rec:
        line += f" -> {rec['linkname']}"
    return line


def _ls_paths(path: str) -> tuple[str, str]:
    base = "/".join(p for p in path.split("/") if p and p != ".")
    return base, base + "/" if base else ""


async def _ls_merged(img: OpenedImage, args: argparse.Namespace) -> tuple[bool, list[Any]]:
    view = await img.view(args.cache_dir)
    top = resolve_in_image(view.tree, args.path)
    base, prefix = _ls_paths(args.path)
    items: list[tuple[str, Node]]
    if not top.is_dir:
        items = [(base, top)]
    elif args.recursive:
        items = list(view.tree.walk(top, prefix))
    else:
        items = [(prefix + c.entry.name, c) for c in view.tree.children(top)]
    return top.is_dir, [_node_record(view, p, n) for p, n in items]


async def _ls_layer(img: OpenedImage, args: argparse.Namespace) -> tuple[bool, list[Any]]:
    """One layer as its tar has it: no overlay rules, whiteout and opaque markers shown."""
    from ..errors import NotFoundError

    position = img.find_layer(args.layer)
    index = (await img.layer_view(position, args.cache_dir)).index
    base, prefix = _ls_paths(args.path)
    top = None if ".." in base.split("/") else index.resolve(base)
    if top is None:
        raise NotFoundError(
            f"{args.path}: no such file or directory in layer {position} "
            f"({img.layers[position].digest})"
        )
    items: list[tuple[str, Entry]]
    if not top.is_dir:
        items = [(base, top)]
    elif args.recursive:
        items = list(index.walk(top.id, prefix))
    else:
        items = [(prefix + c.name, c) for c in index.children(top.id)]
    return top.is_dir, [_record(index, p, e, position) for p, e in items]


async def cmd_ls(args: argparse.Namespace) -> int:
    import json

    async with await _open(args) as img:
        if args.layer is not None:
            is_dir, records = await _ls_layer(img, args)
        else:
            is_dir, records = await _ls_merged(img, args)
    if args.json:
        print(json.dumps(records, indent=1, ensure_ascii=False))
        return 0
    _, prefix = _ls_paths(args.path)
    out = sys.stdout
    for rec in records:
        show = rec["path"] if args.recursive or not is_dir else rec["path"][len(prefix) :]
        if args.long:
            out.write(_long_line(rec, args.numeric, show) + "\n")
        else:
            out.write(show + "\n")
    return 0


# -- cat ------------------------------------------------------------------------------------------
async def cmd_cat(args: argparse.Namespace) -> int:
    from ..errors import UsageError

    async with await _open(args) as img:
        view = await img.view(args.cache_dir)
        node = resolve_in_image(view.tree, args.path, follow_final=True)
        if node.entry.kind != "reg":
            raise UsageError(f"{args.path}: not a regular file ({node.entry.kind})")
        out = sys.stdout.buffer
        async for piece in view.iter_file(node):
            out.write(piece)
        out.flush()
    return 0


# -- get ------------------------------------------------------------------------------------------
def _safe_name(name: str) -> str:
    from ..errors import UnsafePathError

    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafePathError(f"refusing unsafe entry name {name!r}")
    return name


async def _write_file(view: ImageView, node: Node, target: str) -> None:
    import os

    tmp = target + ".stargzfs-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            async for piece in view.iter_file(node):
                f.write(piece)
        os.replace(tmp, target)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _set_meta(node: Node, target: str) -> None:
    import os

    e = node.entry
    if e.kind != "symlink":
        os.chmod(target, e.mode & 0o7777)
    if e.mtime_ns is not None:
        os.utime(target, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


async def _extract(view: ImageView, node: Node, target: str, dirs: list[tuple[Node, str]]) -> int:
    """Write ``node`` at ``target`` (a path that does not leave DEST); returns files skipped."""
    import logging
    import os

    kind = node.entry.kind
    if os.path.islink(target):
        os.unlink(target)  # never write through a symlink that is in the way
    if kind == "dir":
        os.makedirs(target, exist_ok=True)
        os.chmod(target, 0o700)  # writable while we fill it; real mode set at the end
        dirs.append((node, target))
        skipped = 0
        for child in view.tree.children(node):
            name = _safe_name(child.entry.name)
            skipped += await _extract(view, child, os.path.join(target, name), dirs)
        return skipped
    if kind == "reg":
        await _write_file(view, node, target)
    elif kind == "symlink":
        if os.path.lexists(target):
            os.unlink(target)
        os.symlink(node.entry.linkname, target)
    else:
        logging.getLogger("stargzfs").warning(
            "skipping %s: %s (device and fifo nodes are not copied)", target, kind
        )
        return 1
    _set_meta(node, target)
    return 0


def _image_parts(path: str) -> list[str]:
    from ..errors import UsageError

    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise UsageError(f"{path}: '..' is not allowed in an image path")
    return parts


async def cmd_get(args: argparse.Namespace) -> int:
    """One PATH: a directory's contents go into DEST (created if need be), a file becomes
    DEST, or DEST/NAME when DEST is a directory. Several PATHs: each becomes DEST/NAME (the
    root's contents go into DEST), and DEST must be a directory."""
    import json
    import os

    from ..errors import UsageError

    dest = args.dest
    several = len(args.paths) > 1
    dest_is_dir = os.path.isdir(dest) and not os.path.islink(dest)
    if several and not dest_is_dir:
        raise UsageError(f"{dest}: not a directory (needed to copy several paths into)")
    plan: list[tuple[str, list[str]]] = [(p, _image_parts(p)) for p in args.paths]
    if several:
        names = [parts[-1] for _, parts in plan if parts]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise UsageError(f"several paths would be copied to {os.path.join(dest, dup)}")
    async with await _open(args) as img:
        view = await img.view(args.cache_dir)
        # All found before anything is written; a symlink named last is copied as a symlink.
        nodes = [resolve_in_image(view.tree, path) for path, _ in plan]
        copied = []
        skipped = 0
        for (path, parts), node in zip(plan, nodes, strict=True):
            if not parts or (node.is_dir and not several):
                target = dest
            elif several or dest_is_dir:
                target = os.path.join(dest, _safe_name(parts[-1]))
            else:
                target = dest
            dirs: list[tuple[Node, str]] = []
            skipped += await _extract(view, node, target, dirs)
            for dnode, dpath in reversed(dirs):  # deepest first: modes may remove write access
                _set_meta(dnode, dpath)
            copied.append({"path": path, "dest": target, "type": node.entry.kind})
    if args.json:
        print(json.dumps({"copied": copied, "skipped": skipped}, indent=1))
    return 0
