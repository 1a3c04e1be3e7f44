"""Authentication: WWW-Authenticate parsing, tokens and their expiry, credential stores."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from fake_registry import AUTH, REGISTRY, FakeRegistry, error_body

from stargzfs.errors import AuthError, UsageError
from stargzfs.reference import parse_reference
from stargzfs.registry import (
    Authenticator,
    AuthTarget,
    Challenge,
    CredentialResolver,
    Credentials,
    erase_credentials,
    parse_www_authenticate,
    store_credentials,
)

# --------------------------------------------------------------------------- challenges


def test_parse_bearer_challenge() -> None:
    [c] = parse_www_authenticate(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:samalba/my-app:pull,push"'
    )
    assert c.scheme == "bearer"
    assert c.realm == "https://auth.docker.io/token"
    assert c.service == "registry.docker.io"
    # The comma inside the quoted scope does not split it.
    assert c.scopes == ("repository:samalba/my-app:pull,push",)


def test_parse_several_challenges_in_one_header_and_escapes() -> None:
    challenges = parse_www_authenticate(
        'Basic realm="a \\"quoted\\" realm", charset=UTF-8, '
        'BEARER realm="https://x/t", scope="a:b:pull c:d:push", error=insufficient_scope'
    )
    assert [c.scheme for c in challenges] == ["basic", "bearer"]
    assert challenges[0].params == {"realm": 'a "quoted" realm', "charset": "UTF-8"}
    assert challenges[1].scopes == ("a:b:pull", "c:d:push")
    assert challenges[1].params["error"] == "insufficient_scope"


def test_parse_multiple_header_values_and_garbage() -> None:
    challenges = parse_www_authenticate(['Basic realm="r"', 'Bearer realm="https://t"'])
    assert [c.scheme for c in challenges] == ["basic", "bearer"]
    assert parse_www_authenticate("") == []
    assert parse_www_authenticate("@@@") == []
    assert parse_www_authenticate("Negotiate") == [Challenge("negotiate", {})]


# --------------------------------------------------------------------------- tokens


class TokenEndpoint:
    """A token realm for :class:`Authenticator` unit tests."""

    def __init__(self, body: dict[str, object] | None = None, status: int = 200) -> None:
        self.body = body
        self.status = status
        self.requests: list[httpx.Request] = []

    async def send(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = self.body or {"token": f"t{len(self.requests)}", "expires_in": 300}
        return httpx.Response(self.status, json=body, request=request)


def bearer_401(scope: str = "repository:app:pull") -> httpx.Response:
    header = f'Bearer realm="https://{AUTH}/token",service="svc",scope="{scope}"'
    return httpx.Response(401, headers={"WWW-Authenticate": header})


TARGET = AuthTarget(REGISTRY, REGISTRY, "app")
PULL = ("repository:app:pull",)


async def test_tokens_are_cached_per_scope_set_until_expiry(
    mock_clock: trio.testing.MockClock,
) -> None:
    endpoint = TokenEndpoint()
    auth = Authenticator(CredentialResolver(env={}, use_files=False), endpoint.send)
    assert await auth.authorization(TARGET, PULL) is None  # no challenge seen yet
    assert await auth.on_unauthorized(TARGET, PULL, bearer_401(), None)
    first = await auth.authorization(TARGET, PULL)
    assert first == "Bearer t1"
    assert await auth.authorization(TARGET, PULL) == first  # cached
    other = await auth.authorization(TARGET, ("repository:app:pull", "repository:lib:pull"))
    assert other == "Bearer t2"  # another scope set, another token
    mock_clock.jump(250)
    assert await auth.authorization(TARGET, PULL) == first  # still valid
    mock_clock.jump(60)  # past expires_in = 300
    assert await auth.authorization(TARGET, PULL) == "Bearer t3"
    request = endpoint.requests[0]
    assert request.url.params.get_list("scope") == ["repository:app:pull"]
    assert request.url.params["service"] == "svc"
    assert "authorization" not in request.headers  # anonymous: no credentials known


async def test_default_lifetime_and_access_token(mock_clock: trio.testing.MockClock) -> None:
    endpoint = TokenEndpoint({"access_token": "oauth"})
    auth = Authenticator(CredentialResolver(env={}, use_files=False), endpoint.send)
    await auth.on_unauthorized(TARGET, PULL, bearer_401(), None)
    assert await auth.authorization(TARGET, PULL) == "Bearer oauth"
    mock_clock.jump(45)
    await auth.authorization(TARGET, PULL)
    assert len(endpoint.requests) == 1
    mock_clock.jump(20)  # 65 s > the 60 s default
    await auth.authorization(TARGET, PULL)
    assert len(endpoint.requests) == 2


async def test_token_request_carries_basic_credentials() -> None:
    endpoint = TokenEndpoint()
    creds = CredentialResolver({REGISTRY: Credentials("bob", "s3cret")}, env={})
    auth = Authenticator(creds, endpoint.send)
    await auth.on_unauthorized(TARGET, PULL, bearer_401(), None)
    assert await auth.authorization(TARGET, PULL) == "Bearer t1"
    sent = endpoint.requests[0].headers["authorization"]
    assert base64.b64decode(sent.split()[1]) == b"bob:s3cret"
    assert endpoint.requests[0].url.params["account"] == "bob"


async def test_identity_token_uses_refresh_grant() -> None:
    endpoint = TokenEndpoint({"access_token": "from-refresh", "expires_in": 100})
    creds = CredentialResolver({REGISTRY: Credentials("", "", identity_token="rt-1")}, env={})
    auth = Authenticator(creds, endpoint.send)
    await auth.on_unauthorized(TARGET, PULL, bearer_401(), None)
    assert await auth.authorization(TARGET, PULL) == "Bearer from-refresh"
    request = endpoint.requests[0]
    assert request.method == "POST"
    form = dict(x.split("=", 1) for x in request.content.decode().split("&"))
    assert form["grant_type"] == "refresh_token"
    assert form["refresh_token"] == "rt-1"


async def test_a_revoked_token_is_replaced() -> None:
    endpoint = TokenEndpoint()
    auth = Authenticator(CredentialResolver(env={}, use_files=False), endpoint.send)
    await auth.on_unauthorized(TARGET, PULL, bearer_401(), None)
    old = await auth.authorization(TARGET, PULL)
    assert await auth.on_unauthorized(TARGET, PULL, bearer_401(), old)
    assert await auth.authorization(TARGET, PULL) == "Bearer t2"


async def test_refused_basic_credentials_are_not_retried() -> None:
    creds = CredentialResolver({REGISTRY: Credentials("bob", "wrong")}, env={})
    auth = Authenticator(creds, TokenEndpoint().send)
    basic = httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
    assert await auth.on_unauthorized(TARGET, PULL, basic, None)
    header = await auth.authorization(TARGET, PULL)
    assert header is not None and header.startswith("Basic ")
    assert not await auth.on_unauthorized(TARGET, PULL, basic, header)
    anonymous = Authenticator(CredentialResolver(env={}, use_files=False), TokenEndpoint().send)
    assert not await anonymous.on_unauthorized(TARGET, PULL, basic, None)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"errors": []}, 401, "refused explicit credentials access"),
        ({"nothing": 1}, 200, "without a token"),
        ({"token": ""}, 200, "without a token"),
        (None, 404, "HTTP 404"),
    ],
)
async def test_token_endpoint_failures(
    body: dict[str, object] | None, status: int, message: str
) -> None:
    endpoint = TokenEndpoint(body or {"x": 1}, status)
    creds = CredentialResolver({REGISTRY: Credentials("bob", "hunter2")}, env={})
    auth = Authenticator(creds, endpoint.send)
    await auth.on_unauthorized(TARGET, PULL, bearer_401(), None)
    with pytest.raises(AuthError, match=message) as info:
        await auth.authorization(TARGET, PULL)
    assert "hunter2" not in str(info.value)
    assert info.value.exit_code == 3


# --------------------------------------------------------------------------- through the client

MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'


async def test_bearer_flow_fetches_one_token_for_many_requests() -> None:
    fake = FakeRegistry(auth="bearer")
    fake.add_manifest("app", MANIFEST, tag="v1")
    async with fake.client() as client:
        for _ in range(5):
            got = await client.get_manifest(parse_reference(f"{REGISTRY}/app:v1"))
            assert got.data == MANIFEST
    assert fake.tokens_issued == 1
    assert client.tokens_fetched == 1


async def test_concurrent_first_requests_share_one_token() -> None:
    fake = FakeRegistry(auth="bearer")
    fake.add_manifest("app", MANIFEST, tag="v1")
    results: list[bytes] = []
    async with fake.client() as client:

        async def fetch() -> None:
            results.append((await client.get_manifest(parse_reference(f"{REGISTRY}/app:v1"))).data)

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(fetch)
    assert results == [MANIFEST] * 10
    assert fake.tokens_issued == 1


async def test_token_revoked_mid_session_is_refreshed_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeRegistry(auth="bearer", token_expires_in=3600)
    fake.add_manifest("app", MANIFEST, tag="v1")
    ref = parse_reference(f"{REGISTRY}/app:v1")
    async with fake.client() as client:
        assert (await client.get_manifest(ref)).data == MANIFEST
        fake.tokens.clear()  # the registry forgets every token (restart, key rotation)
        assert (await client.get_manifest(ref)).data == MANIFEST
    assert fake.tokens_issued == 2


async def test_token_expiry_uses_the_trio_clock(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeRegistry(auth="bearer", token_expires_in=30)
    fake.add_manifest("app", MANIFEST, tag="v1")
    ref = parse_reference(f"{REGISTRY}/app:v1")
    async with fake.client() as client:
        await client.get_manifest(ref)
        await trio.sleep(20)
        await client.get_manifest(ref)
        assert fake.tokens_issued == 1
        await trio.sleep(20)  # 40 s > 30 s: refreshed before use, no 401 needed
        registry_requests = fake.count(REGISTRY)
        await client.get_manifest(ref)
        assert fake.tokens_issued == 2
        assert fake.count(REGISTRY) == registry_requests + 1


async def test_anonymous_without_access_is_an_auth_error() -> None:
    fake = FakeRegistry(auth="bearer")
    fake.add_manifest("app", MANIFEST, tag="v1")
    client = fake.client(credentials=CredentialResolver(env={}, use_files=False))
    async with client:
        with pytest.raises(AuthError, match="no credentials found"):
            await client.get_manifest(parse_reference(f"{REGISTRY}/app:v1"))


async def test_wrong_password_never_shows_in_errors_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for kind in ("basic", "bearer"):
        fake = FakeRegistry(auth=kind)  # type: ignore[arg-type]
        fake.add_manifest("app", MANIFEST, tag="v1")
        secret = "correct-horse-battery"
        creds = CredentialResolver({REGISTRY: Credentials("alice", secret)}, env={})
        async with fake.client(credentials=creds) as client:
            with pytest.raises(AuthError) as info:
                await client.get_manifest(parse_reference(f"{REGISTRY}/app:v1"))
        encoded = base64.b64encode(f"alice:{secret}".encode()).decode()
        for text in (str(info.value), caplog.text):
            assert secret not in text and encoded not in text
        assert "explicit credentials" in str(info.value)


async def test_basic_registry_with_credentials() -> None:
    fake = FakeRegistry(auth="basic")
    fake.add_manifest("app", MANIFEST, tag="v1")
    async with fake.client() as client:
        for _ in range(3):
            assert (await client.get_manifest(parse_reference(f"{REGISTRY}/app:v1"))).data
    # One anonymous probe answered 401, then credentials are sent up front.
    assert sum(1 for r in fake.requests if "authorization" not in r.headers) == 1


async def test_token_server_outage_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeRegistry(auth="bearer")
    fake.add_manifest("app", MANIFEST, tag="v1")
    failures = [503, 503]

    def flaky_auth(request: httpx.Request) -> httpx.Response | None:
        if request.url.host == AUTH and failures:
            return httpx.Response(failures.pop(), content=error_body("UNAVAILABLE", "down"))
        return None

    fake.before = flaky_auth
    async with fake.client() as client:
        assert (await client.get_manifest(parse_reference(f"{REGISTRY}/app:v1"))).data == MANIFEST
    assert fake.tokens_issued == 1 and not failures


# --------------------------------------------------------------------------- credential files


def b64(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def fake_helper(bin_dir: Path, name: str = "test", fail: bool = False) -> Path:
    """``docker-credential-NAME`` backed by a JSON file next to it (``store.json``)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    store = bin_dir / f"{name}-store.json"
    script = bin_dir / f"docker-credential-{name}"
    script.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(
            f"""
            import json, sys
            store_path = {str(store)!r}
            try:
                store = json.load(open(store_path))
            except FileNotFoundError:
                store = {{}}
            action = sys.argv[1]
            data = sys.stdin.read()
            if {fail!r}:
                print("keychain is locked", file=sys.stderr)
                sys.exit(1)
            if action == "get":
                entry = store.get(data.strip())
                if entry is None:
                    print("credentials not found in native keychain")
                    sys.exit(1)
                print(json.dumps({{"ServerURL": data.strip(), **entry}}))
            elif action == "store":
                req = json.loads(data)
                store[req["ServerURL"]] = {{"Username": req["Username"], "Secret": req["Secret"]}}
                json.dump(store, open(store_path, "w"))
            elif action == "erase":
                if store.pop(data.strip(), None) is None:
                    print("credentials not found in native keychain")
                    sys.exit(1)
                json.dump(store, open(store_path, "w"))
            """
        )
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return store


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {"HOME": str(tmp_path / "home"), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    env.update(extra)
    return env


async def test_lookup_order_of_files(tmp_path: Path) -> None:
    auth_file = write_json(tmp_path / "authfile.json", {"auths": {"r.io": {"auth": b64("a", "1")}}})
    xdg = tmp_path / "xdg"
    write_json(xdg / "containers" / "auth.json", {"auths": {"r.io": {"auth": b64("b", "2")}}})
    docker = tmp_path / "docker"
    write_json(docker / "config.json", {"auths": {"r.io": {"auth": b64("c", "3")}}})
    env = env_for(tmp_path, XDG_RUNTIME_DIR=str(xdg), DOCKER_CONFIG=str(docker))

    found = await CredentialResolver(env={**env, "REGISTRY_AUTH_FILE": str(auth_file)}).lookup(
        "r.io"
    )
    assert found is not None and (found.username, found.password) == ("a", "1")
    assert "REGISTRY_AUTH_FILE" in found.source
    found = await CredentialResolver(env=env).lookup("r.io")
    assert found is not None and found.username == "b"
    del env["XDG_RUNTIME_DIR"]
    found = await CredentialResolver(env=env).lookup("r.io")
    assert found is not None and found.username == "c" and "config.json" in found.source
    explicit = {"r.io": Credentials("x", "y")}
    found = await CredentialResolver(explicit, env=env).lookup("r.io")
    assert found is not None and found.username == "x"
    assert await CredentialResolver(env=env).lookup("other.io") is None


async def test_home_docker_config_and_hub_key(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    write_json(
        tmp_path / "home" / ".docker" / "config.json",
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": b64("hubuser", "pw")},
                "https://ghcr.io": {"auth": b64("gh", "pw2")},
            }
        },
    )
    resolver = CredentialResolver(env=env)
    hub = await resolver.lookup(parse_reference("nginx").registry, "library/nginx")
    assert hub is not None and hub.username == "hubuser"
    gh = await resolver.lookup("ghcr.io")  # "https://ghcr.io" key normalizes to the host
    assert gh is not None and gh.username == "gh"


async def test_podman_repository_scoped_keys(tmp_path: Path) -> None:
    auth_file = write_json(
        tmp_path / "auth.json",
        {
            "auths": {
                "quay.io": {"auth": b64("any", "1")},
                "quay.io/team": {"auth": b64("team", "2")},
                "quay.io/team/app": {"auth": b64("app", "3")},
                "docker.io": {"auth": b64("hub", "4")},
            }
        },
    )
    resolver = CredentialResolver(env={"REGISTRY_AUTH_FILE": str(auth_file), "HOME": str(tmp_path)})
    users = [
        (await resolver.lookup("quay.io", repo)) for repo in ("team/app", "team/other", "else/x")
    ]
    assert [u.username if u else None for u in users] == ["app", "team", "any"]
    hub = await resolver.lookup("docker.io", "library/nginx")
    assert hub is not None and hub.username == "hub"


async def test_cred_helpers_then_store_then_auths(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    helper_store = fake_helper(tmp_path / "bin", "test")
    write_json(helper_store, {"r.io": {"Username": "from-helper", "Secret": "helper-secret"}})
    store2 = fake_helper(tmp_path / "bin", "other")
    write_json(store2, {"s.io": {"Username": "from-store", "Secret": "store-secret"}})
    docker = tmp_path / "docker"
    write_json(
        docker / "config.json",
        {
            "credHelpers": {"r.io": "test", "t.io": "test"},
            "credsStore": "other",
            "auths": {"t.io": {"auth": b64("from-auths", "auths-secret")}},
        },
    )
    resolver = CredentialResolver(env=env_for(tmp_path, DOCKER_CONFIG=str(docker)))
    r = await resolver.lookup("r.io")
    s = await resolver.lookup("s.io")
    t = await resolver.lookup("t.io")  # the helper has nothing, nor the store: auths
    assert r is not None and (r.username, r.password) == ("from-helper", "helper-secret")
    assert "docker-credential-test" in r.source
    assert s is not None and s.username == "from-store"
    assert t is not None and t.username == "from-auths"
    assert await resolver.lookup("u.io") is None
    assert "credentials for r.io from credential helper docker-credential-test" in caplog.text
    for secret in ("helper-secret", "store-secret", "auths-secret"):
        assert secret not in caplog.text


async def test_broken_and_missing_helpers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake_helper(tmp_path / "bin", "locked", fail=True)
    docker = tmp_path / "docker"
    write_json(docker / "config.json", {"credsStore": "locked"})
    resolver = CredentialResolver(env=env_for(tmp_path, DOCKER_CONFIG=str(docker)))
    with pytest.raises(AuthError, match="docker-credential-locked get failed: keychain is locked"):
        await resolver.lookup("r.io")
    write_json(
        docker / "config.json",
        {"credsStore": "notinstalled", "auths": {"r.io": {"auth": b64("u", "p")}}},
    )
    found = await CredentialResolver(env=env_for(tmp_path, DOCKER_CONFIG=str(docker))).lookup(
        "r.io"
    )
    assert found is not None and found.username == "u"
    assert "docker-credential-notinstalled is configured but not installed" in caplog.text


async def test_malformed_files(tmp_path: Path) -> None:
    bad = tmp_path / "auth.json"
    bad.write_text("{nope")
    with pytest.raises(UsageError, match="not valid JSON"):
        await CredentialResolver(
            env={"REGISTRY_AUTH_FILE": str(bad), "HOME": str(tmp_path)}
        ).lookup("r")
    write_json(bad, {"auths": {"r": {"auth": "!!!notbase64"}}})
    with pytest.raises(AuthError, match="not base64"):
        await CredentialResolver(
            env={"REGISTRY_AUTH_FILE": str(bad), "HOME": str(tmp_path)}
        ).lookup("r")


async def test_store_and_erase_in_config_json(tmp_path: Path) -> None:
    config = tmp_path / "docker" / "config.json"
    write_json(config, {"auths": {}, "psFormat": "keep me"})
    env = env_for(tmp_path, DOCKER_CONFIG=str(config.parent))
    where = await store_credentials("r.io", "me", "pw", env=env)
    assert where == str(config)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    data = json.loads(config.read_text())
    assert data["psFormat"] == "keep me"
    assert data["auths"]["r.io"]["auth"] == b64("me", "pw")
    found = await CredentialResolver(env=env).lookup("r.io")
    assert found is not None and found.password == "pw"
    await store_credentials("docker.io", "hub", "pw", env=env)
    assert "https://index.docker.io/v1/" in json.loads(config.read_text())["auths"]
    assert await erase_credentials("r.io", env=env)
    assert not await erase_credentials("r.io", env=env)
    assert await CredentialResolver(env=env).lookup("r.io") is None


async def test_store_and_erase_through_the_configured_helper(tmp_path: Path) -> None:
    helper_store = fake_helper(tmp_path / "bin", "test")
    config = write_json(tmp_path / "docker" / "config.json", {"credsStore": "test"})
    env = env_for(tmp_path, DOCKER_CONFIG=str(config.parent))
    where = await store_credentials("r.io", "me", "pw", env=env)
    assert where == "credential helper docker-credential-test"
    assert json.loads(helper_store.read_text())["r.io"] == {"Username": "me", "Secret": "pw"}
    # Like docker: an empty auths entry, no secret in the file.
    assert json.loads(config.read_text())["auths"] == {"r.io": {}}
    found = await CredentialResolver(env=env).lookup("r.io")
    assert found is not None and (found.username, found.password) == ("me", "pw")
    assert await erase_credentials("r.io", env=env)
    assert json.loads(helper_store.read_text()) == {}
    assert await CredentialResolver(env=env).lookup("r.io") is None
