"""Commands about images and registries, not files: ``inspect``, ``tags``, ``catalog``,
``login``, ``logout``."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .image_cmds import _common, _open, add_creds_option, layer_rows, read_creds_stdin

if TYPE_CHECKING:
    from ..open_image import OpenedImage


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("inspect", help="show an image's manifest, config and layers")
    _common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("tags", help="list the tags of a repository")
    p.add_argument("repo", metavar="REPO", help="registry/repository (e.g. ghcr.io/org/app)")
    _registry_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_tags)

    p = sub.add_parser("catalog", help="list the repositories of a registry (if it allows)")
    p.add_argument("registry", metavar="REGISTRY")
    _registry_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_catalog)

    p = sub.add_parser("login", help="check and store credentials for a registry")
    p.add_argument("registry", metavar="REGISTRY")
    p.add_argument("-u", "--username", help="default: asked on the terminal")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin (needs -u)"
    )
    how.add_argument(
        "--creds-stdin",
        action="store_true",
        help="read USER:PASSWORD from the first line of stdin (instead of -u and a password)",
    )
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the registry")
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("logout", help="remove stored credentials for a registry")
    p.add_argument("registry", metavar="REGISTRY")
    p.set_defaults(func=cmd_logout)


def _registry_options(p: argparse.ArgumentParser) -> None:
    """What ``tags`` and ``catalog`` share with the image commands. No ``--mirror``: these
    listings come from the registry itself (a mirror's tags can be stale or partial)."""
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the registry")
    add_creds_option(p)


async def cmd_inspect(args: argparse.Namespace) -> int:
    async with await _open(args) as img:
        layers = await layer_rows(img)
        cfg = img.config
        doc: dict[str, Any] = {
            "ref": img.ref,
            "digest": img.digest,
            "index_digest": img.index_digest,
            "media_type": img.manifest.media_type,
            "platform": str(cfg.platform),
            "created": cfg.created,
            "env": list(cfg.env),
            "entrypoint": list(cfg.entrypoint) if cfg.entrypoint else None,
            "cmd": list(cfg.cmd) if cfg.cmd else None,
            "labels": dict(cfg.labels),
            "platforms": _index_platforms(img),
            "layers": layers,
        }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"Reference:  {doc['ref']}")
    print(f"Digest:     {doc['digest']}")
    if doc["index_digest"]:
        print(f"Index:      {doc['index_digest']}")
    if doc["platforms"] is not None:
        print(f"Platforms:  {len(doc['platforms'])} in the index")
        width = max((len(p["platform"]) for p in doc["platforms"]), default=0)
        for p in doc["platforms"]:
            mark = "  (this one)" if p["digest"] == doc["digest"] else ""
            print(f"  {p['platform']:<{width}}  {p['digest']}{mark}")
    print(f"Media type: {doc['media_type']}")
    print(f"Platform:   {doc['platform']}")
    print(f"Created:    {doc['created'] or '-'}")
    print(f"Entrypoint: {doc['entrypoint'] or '-'}")
    print(f"Cmd:        {doc['cmd'] or '-'}")
    if cfg.env:
        print("Env:")
        for item in cfg.env:
            print(f"  {item}")
    if cfg.labels:
        print("Labels:")
        for key, value in cfg.labels.items():
            print(f"  {key}={value}")
    print("Layers:")
    for layer in layers:
        lazy = "lazy" if layer["lazy"] else "not lazy"
        verified = "verified" if layer["verified"] else "unverified"
        print(f"  {layer['digest']}  {layer['size']:>10}  {layer['format']} ({lazy}, {verified})")
    return 0


def _index_platforms(img: OpenedImage) -> list[dict[str, Any]] | None:
    """The images of the index the manifest was chosen from (None: there was no index)."""
    if img.index is None:
        return None
    return [
        {
            "platform": str(d.platform) if d.platform is not None else "unknown",
            "digest": d.digest,
            "media_type": d.media_type,
            "size": d.size,
        }
        for d in img.index.images()
    ]


def _client(args: argparse.Namespace, registry: str) -> Any:
    from ..registry import RegistryClient

    creds = read_creds_stdin() if args.creds_stdin else None
    return RegistryClient(
        credentials={registry: creds} if creds is not None else None,
        insecure=[registry] if args.insecure else (),
    )


async def cmd_tags(args: argparse.Namespace) -> int:
    from ..reference import Repository

    repo = Repository.parse(args.repo)
    async with _client(args, repo.registry) as client:
        tags = await client.list_tags(repo)
    print(json.dumps(tags, indent=2) if args.json else "\n".join(tags))
    return 0


async def cmd_catalog(args: argparse.Namespace) -> int:
    async with _client(args, args.registry) as client:
        repos = await client.catalog(args.registry)
    print(json.dumps(repos, indent=2) if args.json else "\n".join(repos))
    return 0


def _login_credentials(args: argparse.Namespace) -> tuple[str, str]:
    """(user, password) from --creds-stdin, -u with --password-stdin, or the terminal."""
    if args.creds_stdin:
        if args.username:
            raise UsageError("--creds-stdin carries the user name: leave out -u")
        creds = read_creds_stdin()
        return creds.username, creds.password
    if args.password_stdin:
        if not args.username:
            raise UsageError("--password-stdin needs the user name: add -u USER")
        return args.username, sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise UsageError(
            "no terminal to ask for the password: use -u USER --password-stdin, or --creds-stdin"
        )
    return args.username or input("Username: "), getpass.getpass("Password: ")


async def cmd_login(args: argparse.Namespace) -> int:
    from ..registry import CredentialResolver, Credentials, RegistryClient, store_credentials

    username, password = _login_credentials(args)
    if not username or not password:
        raise UsageError("login needs a username and a password")
    creds = Credentials(username, password, source="login")
    resolver = CredentialResolver({args.registry: creds}, use_files=False)
    # Check them before storing anything: 401/403 raise AuthError (exit 3).
    insecure = [args.registry] if args.insecure else ()
    async with RegistryClient(credentials=resolver, insecure=insecure) as client:
        await client.check_login(args.registry)
    where = await store_credentials(args.registry, username, password)
    print(f"Login succeeded; credentials stored in {where}")
    return 0


async def cmd_logout(args: argparse.Namespace) -> int:
    from ..registry import erase_credentials

    if await erase_credentials(args.registry):
        print(f"Removed credentials for {args.registry}")
        return 0
    print(f"Not logged in to {args.registry}")
    return 0
