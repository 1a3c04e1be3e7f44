"""Which hosts to talk to for a repository: scheme, mirrors, ``registries.conf`` rewrites.

- Plain HTTP is used automatically only for loopback registries (``localhost``,
  127.0.0.0/8, ``[::1]``); any other host needs to be listed as insecure.
- Mirrors come from ``--mirror REGISTRY=MIRROR`` (``mirrors`` option) and from
  ``registries.conf`` (``$CONTAINERS_REGISTRIES_CONF`` or ``/etc/containers/registries.conf``,
  containers-registries.conf(5) v2 format) and are tried in order before the upstream, for
  pulls only. A mirror location may carry a path (``mirror.corp/dockerhub``): it replaces
  the registry part of the repository name.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..reference import DEFAULT_REGISTRY, DOCKER_HUB_API_HOST, Repository

__all__ = [
    "DEFAULT_REGISTRIES_CONF",
    "Endpoint",
    "EndpointResolver",
    "MirrorConfig",
    "RegistryConfig",
    "is_loopback",
    "load_registries_conf",
    "parse_mirror_option",
]

log = logging.getLogger(__name__)

DEFAULT_REGISTRIES_CONF = Path("/etc/containers/registries.conf")
_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


def _split_host_port(host: str) -> str:
    """The host without its port; IPv6 brackets removed."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ``::1`` (with or without a port)."""
    name = _split_host_port(host).lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _canonical_registry(name: str) -> str:
    return DEFAULT_REGISTRY if name in _HUB_NAMES else name


@dataclass(frozen=True)
class Endpoint:
    """One place a repository can be pulled from.

    ``host`` is the network location; ``registry`` the name credentials are looked up by;
    ``prefix`` is prepended to repository paths (mirrors with a path, remapped locations).
    """

    host: str
    scheme: str = "https"
    prefix: str = ""
    registry: str = ""
    mirror: bool = False
    # registries.conf prefix "reg/ns" remapped to a location: "ns" is replaced by `prefix`.
    strip: str = ""

    def repo_path(self, path: str) -> str:
        """The repository's path at this endpoint."""
        if self.strip and (path == self.strip or path.startswith(self.strip + "/")):
            path = path[len(self.strip) :].lstrip("/")
        return "/".join(p for p in (self.prefix, path) if p)

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def __str__(self) -> str:
        return f"{self.host}/{self.prefix}" if self.prefix else self.host


@dataclass(frozen=True)
class MirrorConfig:
    location: str
    insecure: bool = False
    # containers-registries.conf: "all", "digest-only" or "tag-only"
    pull_from_mirror: str = "all"


@dataclass(frozen=True)
class RegistryConfig:
    """One ``[[registry]]`` table."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirrors: tuple[MirrorConfig, ...] = field(default_factory=tuple)

    def matches(self, name: str) -> bool:
        """Does ``registry/path`` fall under this table's prefix?"""
        prefix = self.prefix
        if prefix.startswith("*."):
            host = name.split("/", 1)[0]
            return host.endswith(prefix[1:])
        return name == prefix or name.startswith(prefix + "/")


def _bool(table: Mapping[str, Any], key: str, path: Path) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise UsageError(f"{path}: '{key}' must be true or false")
    return value


def _str(table: Mapping[str, Any], key: str, path: Path) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise UsageError(f"{path}: '{key}' must be a string")
    return value


def parse_registries_conf(text: str, path: Path) -> list[RegistryConfig]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None
    tables = data.get("registry", [])
    if not isinstance(tables, list):
        raise UsageError(f"{path}: [[registry]] must be an array of tables")
    configs: list[RegistryConfig] = []
    for table in tables:
        if not isinstance(table, dict):
            raise UsageError(f"{path}: [[registry]] entries must be tables")
        location = _str(table, "location", path)
        prefix = _str(table, "prefix", path) or location
        if not prefix:
            raise UsageError(f"{path}: a [[registry]] needs 'location' or 'prefix'")
        digest_only = _bool(table, "mirror-by-digest-only", path)
        mirrors: list[MirrorConfig] = []
        for mirror in table.get("mirror", []):
            if not isinstance(mirror, dict) or not _str(mirror, "location", path):
                raise UsageError(f"{path}: [[registry.mirror]] needs a 'location'")
            mode = _str(mirror, "pull-from-mirror", path) or (
                "digest-only" if digest_only else "all"
            )
            if mode not in ("all", "digest-only", "tag-only"):
                raise UsageError(f"{path}: pull-from-mirror must be all, digest-only or tag-only")
            mirrors.append(MirrorConfig(mirror["location"], _bool(mirror, "insecure", path), mode))
        configs.append(
            RegistryConfig(
                _canonical_prefix(prefix),
                _canonical_prefix(location) if location else "",
                _bool(table, "insecure", path),
                _bool(table, "blocked", path),
                tuple(mirrors),
            )
        )
    return configs


def _canonical_prefix(prefix: str) -> str:
    host, slash, rest = prefix.partition("/")
    return _canonical_registry(host) + slash + rest


def load_registries_conf(
    path: Path | None = None, env: Mapping[str, str] | None = None
) -> list[RegistryConfig]:
    """Read ``registries.conf``; a missing file means no configuration."""
    env = os.environ if env is None else env
    if path is None:
        path = (
            Path(env["CONTAINERS_REGISTRIES_CONF"])
            if env.get("CONTAINERS_REGISTRIES_CONF")
            else DEFAULT_REGISTRIES_CONF
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as e:
        log.warning("cannot read %s: %s", path, e.strerror)
        return []
    return parse_registries_conf(text, path)


def parse_mirror_option(values: Iterable[str]) -> dict[str, list[str]]:
    """``REGISTRY=MIRROR`` strings (``--mirror``, repeatable) into the ``mirrors`` option."""
    mirrors: dict[str, list[str]] = {}
    for value in values:
        registry, eq, mirror = value.partition("=")
        if not eq or not registry or not mirror:
            raise UsageError(f"invalid --mirror {value!r}: expected REGISTRY=MIRROR")
        mirrors.setdefault(_canonical_registry(registry.strip()), []).append(mirror.strip())
    return mirrors


class EndpointResolver:
    """Maps a repository to the endpoints to try, in order."""

    def __init__(
        self,
        *,
        mirrors: Mapping[str, Sequence[str]] | None = None,
        insecure: Iterable[str] = (),
        registries: Sequence[RegistryConfig] = (),
    ) -> None:
        self._mirrors = {_canonical_registry(k): list(v) for k, v in (mirrors or {}).items()}
        self._insecure = {_canonical_registry(h) for h in insecure}
        self._registries = list(registries)

    def _config_for(self, name: str) -> RegistryConfig | None:
        best: RegistryConfig | None = None
        for conf in self._registries:
            if conf.matches(name) and (best is None or len(conf.prefix) > len(best.prefix)):
                best = conf
        return best

    def _scheme(self, host: str, insecure: bool = False) -> str:
        if insecure or is_loopback(host) or host in self._insecure:
            return "http"
        return "https"

    def _endpoint(self, location: str, strip: str, insecure: bool, mirror: bool) -> Endpoint:
        """An endpoint for ``location`` (``[scheme://]host[/prefix]``)."""
        scheme_given = None
        for scheme in ("http", "https"):
            if location.startswith(f"{scheme}://"):
                scheme_given, location = scheme, location[len(scheme) + 3 :]
        host, _, prefix = location.rstrip("/").partition("/")
        host = _canonical_registry(host)
        api_host = DOCKER_HUB_API_HOST if host == DEFAULT_REGISTRY else host
        scheme = scheme_given or self._scheme(host, insecure)
        return Endpoint(api_host, scheme, prefix, host, mirror, strip)

    def upstream(self, repo: Repository) -> Endpoint:
        """Where ``repo`` really lives (after registries.conf ``location`` rewrites)."""
        conf = self._config_for(str(repo))
        if conf is not None and conf.blocked:
            raise UsageError(f"registry {repo.registry} is blocked by registries.conf")
        if conf is None or not conf.location or conf.prefix.startswith("*."):
            insecure = conf.insecure if conf is not None else False
            return self._endpoint(repo.registry, "", insecure, mirror=False)
        return self._endpoint(conf.location, _prefix_path(conf.prefix), conf.insecure, False)

    def pull_endpoints(self, repo: Repository, *, by_digest: bool) -> list[Endpoint]:
        """Mirrors that may serve this pull, in order, then the upstream."""
        conf = self._config_for(str(repo))
        upstream = self.upstream(repo)
        endpoints: list[Endpoint] = []
        for location in self._mirrors.get(repo.registry, []):
            endpoints.append(self._endpoint(location, "", False, mirror=True))
        if conf is not None and not conf.prefix.startswith("*."):
            for m in conf.mirrors:
                if m.pull_from_mirror == "digest-only" and not by_digest:
                    continue
                if m.pull_from_mirror == "tag-only" and by_digest:
                    continue
                endpoints.append(
                    self._endpoint(m.location, _prefix_path(conf.prefix), m.insecure, mirror=True)
                )
        endpoints.append(upstream)
        unique: list[Endpoint] = []
        for ep in endpoints:
            if ep not in unique:
                unique.append(ep)
        return unique


def _prefix_path(prefix: str) -> str:
    """The repository part of a registries.conf prefix: ``reg/ns`` → ``ns``."""
    return prefix.partition("/")[2]
