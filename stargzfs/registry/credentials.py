"""Registry credentials: where docker and podman keep them, and how to ask their helpers.

Lookup order (first source that has credentials for the host wins):

1. explicit credentials given to the client (``--username``/``--password``, tests);
2. ``$REGISTRY_AUTH_FILE`` (podman/skopeo);
3. ``${XDG_RUNTIME_DIR}/containers/auth.json`` (podman's default);
4. ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json`` (docker's).

Inside each file: ``credHelpers[host]`` → ``credsStore`` → ``auths[host].auth``. A helper is
the program ``docker-credential-NAME``; ``get`` reads the server URL on stdin and prints
``{"ServerURL", "Username", "Secret"}``. Docker Hub's key is ``https://index.docker.io/v1/``
(podman writes ``docker.io``; both are tried). podman also allows keys scoped to a repository
(``quay.io/org/repo``): the most specific key wins.

Secrets never reach a log line or an exception message: only the *source* is named.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..errors import AuthError, UsageError
from ..reference import DOCKER_HUB_CREDENTIAL_KEY, registry_credential_key

__all__ = [
    "CredentialResolver",
    "Credentials",
    "docker_config_path",
    "erase_credentials",
    "store_credentials",
]

log = logging.getLogger(__name__)

# A helper that hangs (a locked keychain waiting for a GUI prompt) must not hang a mount.
HELPER_TIMEOUT = 30.0
_HUB_KEYS = (DOCKER_HUB_CREDENTIAL_KEY, "docker.io", "index.docker.io", "registry-1.docker.io")
# What helpers print (docker-credential-helpers' errCredentialsNotFoundMessage).
_NOT_FOUND_MARKERS = ("credentials not found", "not found in native keychain")
# A helper Username meaning "Secret is an OAuth2 refresh (identity) token".
_IDENTITY_TOKEN_USER = "<token>"


@dataclass(frozen=True)
class Credentials:
    """A username and secret for one registry, and where they came from (for logs).

    ``identity_token`` is an OAuth2 refresh token (``docker login`` with some registries,
    e.g. ACR), exchanged at the token endpoint instead of a password.
    """

    username: str
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)
    source: str = "explicit credentials"

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def docker_config_path(env: Mapping[str, str] | None = None) -> Path:
    """``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``."""
    env = os.environ if env is None else env
    base = env.get("DOCKER_CONFIG")
    if base:
        return Path(base) / "config.json"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".docker" / "config.json"


def _candidate_files(env: Mapping[str, str]) -> list[tuple[Path, str]]:
    files: list[tuple[Path, str]] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append((Path(env["REGISTRY_AUTH_FILE"]), "$REGISTRY_AUTH_FILE"))
    if env.get("XDG_RUNTIME_DIR"):
        files.append(
            (Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json", "containers auth.json")
        )
    files.append((docker_config_path(env), "docker config.json"))
    return files


def _lookup_keys(registry: str, repository: str | None) -> list[str]:
    """Keys to try in a config file, most specific first."""
    is_hub = registry_credential_key(registry) == DOCKER_HUB_CREDENTIAL_KEY
    host = "docker.io" if is_hub else registry
    keys: list[str] = []
    if repository:
        # podman: "registry/ns/repo", then "registry/ns", before the bare host.
        parts = repository.split("/")
        keys += [f"{host}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)]
    keys += list(_HUB_KEYS) if is_hub else [registry]
    return keys


def _normalize_key(key: str) -> str:
    """docker accepts ``https://host/v1/``-style keys: compare on the host[/path] part."""
    if key == DOCKER_HUB_CREDENTIAL_KEY:
        return key
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    return key.removesuffix("/").removesuffix("/v1").removesuffix("/v2")


def _load_config(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cannot read %s: %s", path, e.strerror)
        return None
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return data


def _find_key(mapping: object, keys: list[str]) -> str | None:
    """The first of ``keys`` present in ``mapping`` (comparing normalized keys)."""
    if not isinstance(mapping, dict):
        return None
    normalized = {_normalize_key(k): k for k in mapping if isinstance(k, str)}
    for key in keys:
        if key in mapping:
            return key
        found = normalized.get(_normalize_key(key))
        if found is not None:
            return found
    return None


def _decode_auth(entry: Mapping[str, Any], source: str) -> Credentials | None:
    identity = entry.get("identitytoken")
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, sep, secret = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError(f"{source}: the 'auth' entry is not base64 of user:password") from None
        if not sep:
            raise AuthError(f"{source}: the 'auth' entry is not base64 of user:password")
        return Credentials(
            user, secret, identity if isinstance(identity, str) and identity else None, source
        )
    if isinstance(identity, str) and identity:
        return Credentials("", "", identity, source)
    return None


async def _run_helper(
    name: str, action: str, stdin: bytes, *, env: Mapping[str, str] | None = None
) -> tuple[int, bytes, bytes] | None:
    """Run ``docker-credential-NAME ACTION``; ``None`` if it is not installed."""
    program = f"docker-credential-{name}"
    try:
        with trio.fail_after(HELPER_TIMEOUT):
            proc = await trio.run_process(
                [program, action],
                stdin=stdin,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=dict(env) if env is not None else None,
            )
    except FileNotFoundError:
        return None
    except trio.TooSlowError:
        raise AuthError(
            f"credential helper {program} did not answer within {HELPER_TIMEOUT:.0f} s"
        ) from None
    except OSError as e:
        raise AuthError(f"cannot run credential helper {program}: {e.strerror}") from None
    return proc.returncode, proc.stdout, proc.stderr


def _helper_failure(program: str, action: str, stdout: bytes, stderr: bytes) -> str:
    # Helpers print their error on stdout (docker-credential-helpers) or stderr; neither
    # contains the secret, but keep it to one short line.
    text = (stderr or stdout).decode(errors="replace").strip().splitlines()
    return f"credential helper {program} {action} failed: {text[0][:200] if text else 'no output'}"


async def helper_get(
    name: str, server_url: str, *, env: Mapping[str, str] | None = None
) -> Credentials | None:
    """Ask ``docker-credential-NAME get`` for ``server_url``; ``None`` if it has none."""
    program = f"docker-credential-{name}"
    result = await _run_helper(name, "get", server_url.encode(), env=env)
    if result is None:
        log.warning("credential helper %s is configured but not installed; ignoring it", program)
        return None
    code, out, err = result
    if code != 0:
        if any(m in (out + err).decode(errors="replace").lower() for m in _NOT_FOUND_MARKERS):
            return None
        raise AuthError(_helper_failure(program, "get", out, err))
    try:
        data = json.loads(out)
        user, secret = data["Username"], data["Secret"]
    except (ValueError, KeyError, TypeError):
        raise AuthError(f"credential helper {program} printed an unexpected answer") from None
    if not isinstance(user, str) or not isinstance(secret, str):
        raise AuthError(f"credential helper {program} printed an unexpected answer")
    source = f"credential helper {program}"
    if user == _IDENTITY_TOKEN_USER:
        return Credentials("", "", secret, source)
    if not user and not secret:
        return None
    return Credentials(user, secret, None, source)


class CredentialResolver:
    """Finds credentials for a registry host, once per (host, repository), and caches them.

    ``explicit`` maps a registry name (as written in references, ``docker.io`` for Hub) to
    credentials that win over every file.
    """

    def __init__(
        self,
        explicit: Mapping[str, Credentials] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        use_files: bool = True,
    ) -> None:
        self._explicit = dict(explicit or {})
        self._env = dict(os.environ if env is None else env)
        self._use_files = use_files
        self._cache: dict[tuple[str, str | None], Credentials | None] = {}
        self._lock = trio.Lock()

    async def lookup(self, registry: str, repository: str | None = None) -> Credentials | None:
        key = (registry, repository)
        # One lookup at a time: helpers are slow, and N concurrent first requests must not
        # start N helper processes.
        async with self._lock:
            if key not in self._cache:
                creds = await self._lookup(registry, repository)
                if creds is None:
                    log.debug("no credentials for %s: anonymous", registry)
                else:
                    log.debug("credentials for %s from %s", registry, creds.source)
                self._cache[key] = creds
            return self._cache[key]

    def forget(self, registry: str) -> None:
        """Drop cached lookups for ``registry`` (after a login/logout)."""
        for key in [k for k in self._cache if k[0] == registry]:
            del self._cache[key]

    async def _lookup(self, registry: str, repository: str | None) -> Credentials | None:
        for name in (registry, registry_credential_key(registry)):
            if name in self._explicit:
                return self._explicit[name]
        if not self._use_files:
            return None
        keys = _lookup_keys(registry, repository)
        for path, label in _candidate_files(self._env):
            config = _load_config(path)
            if config is None:
                continue
            creds = await self._from_config(config, keys, f"{label} {path}")
            if creds is not None:
                return creds
        return None

    async def _from_config(
        self, config: Mapping[str, Any], keys: list[str], source: str
    ) -> Credentials | None:
        helpers = config.get("credHelpers")
        helper_key = _find_key(helpers, keys)
        if isinstance(helpers, dict) and helper_key is not None:
            name = helpers[helper_key]
            if isinstance(name, str) and name:
                creds = await helper_get(name, helper_key, env=self._env)
                if creds is not None:
                    return creds
        store = config.get("credsStore")
        if isinstance(store, str) and store:
            # The helper knows the key docker used when logging in, i.e. the credential key.
            creds = await helper_get(store, _store_key(keys), env=self._env)
            if creds is not None:
                return creds
        auths = config.get("auths")
        auth_key = _find_key(auths, keys)
        if isinstance(auths, dict) and auth_key is not None:
            entry = auths[auth_key]
            if isinstance(entry, dict):
                return _decode_auth(entry, f"{source} auths[{auth_key!r}]")
        return None


def _store_key(keys: list[str]) -> str:
    # The bare host key (or Hub's v1 URL): repository-scoped keys are a podman file feature.
    for key in keys:
        if key == DOCKER_HUB_CREDENTIAL_KEY or "/" not in key:
            return key
    return keys[-1]


# --------------------------------------------------------------------------- login/logout


def _write_config(path: Path, config: Mapping[str, Any]) -> None:
    """Write ``config`` atomically with mode 0600 (it may hold base64 passwords)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config.json.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(config, f, indent="\t")
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _configured_helper(config: Mapping[str, Any], key: str) -> str | None:
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        found = _find_key(helpers, [key])
        if found is not None and isinstance(helpers[found], str) and helpers[found]:
            return str(helpers[found])
    store = config.get("credsStore")
    return store if isinstance(store, str) and store else None


async def store_credentials(
    registry: str,
    username: str,
    password: str,
    *,
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Save credentials like ``docker login``: in the configured helper, else config.json.

    Returns a description of where they went (for the user; no secret in it).
    """
    path = config_path or docker_config_path(env)
    config = await trio.to_thread.run_sync(_load_config, path) or {}
    key = registry_credential_key(registry)
    helper = _configured_helper(config, key)
    auths = config.setdefault("auths", {})
    if not isinstance(auths, dict):
        raise UsageError(f"{path}: 'auths' is not an object")
    if helper is not None:
        program = f"docker-credential-{helper}"
        payload = json.dumps({"ServerURL": key, "Username": username, "Secret": password})
        result = await _run_helper(helper, "store", payload.encode(), env=env)
        if result is None:
            raise AuthError(f"credential helper {program} is configured in {path} but not found")
        code, out, err = result
        if code != 0:
            raise AuthError(_helper_failure(program, "store", out, err))
        # docker keeps an empty entry so `docker info`/logout know the host is logged in.
        auths[key] = {}
        where = f"credential helper {program}"
    else:
        auth = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        entry = auths.get(key)
        auths[key] = {**(entry if isinstance(entry, dict) else {}), "auth": auth}
        where = str(path)
    await trio.to_thread.run_sync(_write_config, path, config)
    return where


async def erase_credentials(
    registry: str, *, config_path: Path | None = None, env: Mapping[str, str] | None = None
) -> bool:
    """Remove credentials like ``docker logout``; ``False`` if there were none."""
    path = config_path or docker_config_path(env)
    config = await trio.to_thread.run_sync(_load_config, path)
    if config is None:
        return False
    key = registry_credential_key(registry)
    removed = False
    helper = _configured_helper(config, key)
    if helper is not None:
        program = f"docker-credential-{helper}"
        result = await _run_helper(helper, "erase", key.encode(), env=env)
        if result is not None:
            code, out, err = result
            text = (out + err).decode(errors="replace").lower()
            if code == 0:
                removed = True
            elif not any(m in text for m in _NOT_FOUND_MARKERS):
                raise AuthError(_helper_failure(program, "erase", out, err))
    auths = config.get("auths")
    found = _find_key(auths, [key])
    if isinstance(auths, dict) and found is not None:
        entry = auths.pop(found)
        removed = removed or bool(entry)
        await trio.to_thread.run_sync(_write_config, path, config)
    return removed
