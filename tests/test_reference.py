"""Image references (distribution/reference rules), digests and platforms (containerd rules)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from stargzfs.errors import UnsupportedError, UsageError
from stargzfs.reference import (
    DOCKER_HUB_API_HOST,
    DOCKER_HUB_CREDENTIAL_KEY,
    Platform,
    Reference,
    Repository,
    new_hasher,
    parse_digest,
    parse_reference,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "path", "tag", "digest"),
    [
        ("nginx", "docker.io", "library/nginx", "latest", None),
        ("nginx:1.25", "docker.io", "library/nginx", "1.25", None),
        ("user/app", "docker.io", "user/app", "latest", None),
        ("docker.io/nginx", "docker.io", "library/nginx", "latest", None),
        ("index.docker.io/library/nginx:x", "docker.io", "library/nginx", "x", None),
        ("localhost/foo", "localhost", "foo", "latest", None),
        ("localhost:5000/foo:tag", "localhost:5000", "foo", "tag", None),
        ("example.com/a/b/c:v1.0-rc_1", "example.com", "a/b/c", "v1.0-rc_1", None),
        ("127.0.0.1:5000/x", "127.0.0.1:5000", "x", "latest", None),
        ("[::1]:5000/x:t", "[::1]:5000", "x", "t", None),
        ("quay.io/org/repo", "quay.io", "org/repo", "latest", None),
        # no '.', ':' or localhost: the first component is a namespace on Docker Hub
        ("myhost/foo/bar", "docker.io", "myhost/foo/bar", "latest", None),
        (f"nginx@{DIGEST}", "docker.io", "library/nginx", None, DIGEST),
        (f"nginx:1.25@{DIGEST}", "docker.io", "library/nginx", "1.25", DIGEST),
        ("a__b/c.d/e--f", "docker.io", "a__b/c.d/e--f", "latest", None),
    ],
)
def test_parse_reference(
    text: str, registry: str, path: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, path, tag, digest)
    # The canonical string parses back to the same reference.
    assert parse_reference(str(ref)) == ref


def test_digest_wins_over_tag_but_both_are_kept() -> None:
    ref = parse_reference(f"example.com/app:1.0@{DIGEST}")
    assert ref.selector == DIGEST
    assert str(ref) == f"example.com/app:1.0@{DIGEST}"
    assert parse_reference("example.com/app:1.0").selector == "1.0"


def test_docker_hub_hosts_and_keys() -> None:
    hub = parse_reference("nginx").repo
    assert hub.api_host == DOCKER_HUB_API_HOST == "registry-1.docker.io"
    assert hub.credential_key == DOCKER_HUB_CREDENTIAL_KEY == "https://index.docker.io/v1/"
    other = parse_reference("ghcr.io/o/r").repo
    assert (other.api_host, other.credential_key) == ("ghcr.io", "ghcr.io")


def test_familiar_form() -> None:
    assert parse_reference("docker.io/library/nginx:1").familiar() == "nginx:1"
    assert parse_reference("user/app").familiar() == "user/app:latest"
    assert parse_reference("ghcr.io/o/r:t").familiar() == "ghcr.io/o/r:t"


def test_default_tag_can_be_disabled_and_repository_parse() -> None:
    assert parse_reference("alpine", default_tag=None).tag is None
    assert Repository.parse("alpine") == Repository("docker.io", "library/alpine")
    with pytest.raises(UsageError, match="remove the tag"):
        Repository.parse("alpine:3")


def test_with_digest_and_tag() -> None:
    ref = parse_reference("example.com/app:1")
    assert ref.with_digest(DIGEST).selector == DIGEST
    assert ref.with_digest(DIGEST).tag == "1"
    assert ref.with_tag("2").tag == "2"
    with pytest.raises(UsageError):
        ref.with_digest("sha256:nothex")
    with pytest.raises(UsageError):
        ref.with_tag("-bad")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("Nginx", "must be lowercase"),
        ("example.com/Org/app", "must be lowercase"),
        ("nginx:", "tag ''"),
        ("nginx:-x", "tag '-x'"),
        ("nginx:" + "a" * 129, "1-128"),
        ("nginx@", "empty digest"),
        ("nginx@sha256:abc", "ALGORITHM:HEX"),
        ("nginx@sha256:" + "a" * 40, "64 lowercase hex"),
        ("nginx@sha256:" + "AB" * 32, "lowercase hex"),
        ("nginx@md5", "ALGORITHM:HEX"),
        ("ab" * 32, "image ID"),
        ("a//b", "repository"),
        ("foo_", "repository"),
        ("-foo", "repository"),
        ("example.com/", "missing repository"),
        (" nginx", "whitespace"),
        ("ngi nx", "whitespace"),
        ("exa_mple.com/foo", "registry host"),
        ("example.com/" + "a" * 250, "longer than 255"),
    ],
)
def test_invalid_references(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_reference(text)
    assert info.value.exit_code == 2


def test_digests() -> None:
    assert parse_digest(DIGEST) == ("sha256", "ab" * 32)
    assert parse_digest("sha512:" + "0" * 128)[0] == "sha512"
    with pytest.raises(UsageError):
        parse_digest("sha512:" + "0" * 64)
    h = new_hasher(DIGEST)
    h.update(b"x")
    assert h.hexdigest() == hashlib.sha256(b"x").hexdigest()
    # A syntactically valid but unknown algorithm cannot be verified.
    with pytest.raises(UnsupportedError, match="blake9"):
        new_hasher("blake9:" + "0" * 64)


_component = st.from_regex(r"[a-z0-9]{1,6}(?:[._-][a-z0-9]{1,6}){0,2}", fullmatch=True)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@given(
    registry=st.sampled_from(["", "example.com/", "localhost:5000/", "10.0.0.1:443/", "a.b.c/"]),
    components=st.lists(_component, min_size=1, max_size=3),
    tag=st.none() | _tag,
    digest=st.none()
    | st.binary(min_size=1, max_size=8).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest()),
)
def test_reference_round_trip(
    registry: str, components: list[str], tag: str | None, digest: str | None
) -> None:
    # Without a registry, a first component with a '.' would itself name a registry host.
    assume(registry or "." not in components[0])
    text = registry + "/".join(components)
    if tag:
        text += ":" + tag
    if digest:
        text += "@" + digest
    ref = parse_reference(text)
    assert parse_reference(str(ref)) == ref
    assert ref.digest == digest
    assert ref.tag == (tag or (None if digest else "latest"))
    assert ref.repository.endswith("/".join(components))


# --------------------------------------------------------------------------- platforms


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("linux/amd64", "linux/amd64"),
        ("linux/x86_64", "linux/amd64"),
        ("linux/x86-64", "linux/amd64"),
        ("linux/amd64/v1", "linux/amd64"),
        ("linux/amd64/v3", "linux/amd64/v3"),
        ("linux/aarch64", "linux/arm64"),
        ("linux/arm64/v8", "linux/arm64"),
        ("linux/arm64/v9.0", "linux/arm64/v9"),
        ("linux/armhf", "linux/arm/v7"),
        ("linux/armel", "linux/arm/v6"),
        ("linux/arm", "linux/arm/v7"),
        ("linux/arm/7", "linux/arm/v7"),
        ("linux/arm/v6", "linux/arm/v6"),
        ("linux/i386", "linux/386"),
        ("LINUX/AMD64", "linux/amd64"),
        ("macos/arm64", "darwin/arm64"),
        ("windows/amd64", "windows/amd64"),
    ],
)
def test_platform_normalization(text: str, expected: str) -> None:
    assert str(Platform.parse(text)) == expected


def test_platform_equality_is_normalized() -> None:
    assert Platform("linux", "aarch64") == Platform("linux", "arm64", "v8")
    assert Platform("linux", "arm64").matches(Platform.parse("linux/arm64/v8"))
    assert not Platform.parse("linux/arm/v7").matches(Platform.parse("linux/arm/v6"))
    assert not Platform.parse("linux/amd64").matches(Platform.parse("windows/amd64"))


def test_platform_partial_specifiers_use_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert Platform.host() == Platform("linux", "arm64")
    assert str(Platform.parse("linux")) == "linux/arm64"
    assert str(Platform.parse("amd64")) == "linux/amd64"
    monkeypatch.setattr("platform.machine", lambda: "armv6l")
    assert str(Platform.host()) == "linux/arm/v6"
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert str(Platform.host()) == "linux/amd64"


@pytest.mark.parametrize(
    "text", ["", "linux/", "linux/foo", "beos/amd64", "a/b/c/d", "linux/amd64/v 1", "what"]
)
def test_invalid_platforms(text: str) -> None:
    with pytest.raises(UsageError, match="platform"):
        Platform.parse(text)


def test_compatible_platforms_follow_containerd() -> None:
    def names(text: str) -> list[str]:
        return [str(p) for p in Platform.parse(text).compatible()]

    assert names("linux/arm/v7") == ["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]
    assert names("linux/arm64") == [
        "linux/arm64",
        "linux/arm/v8",
        "linux/arm/v7",
        "linux/arm/v6",
        "linux/arm/v5",
    ]
    assert names("linux/amd64") == ["linux/amd64", "linux/386"]
    assert names("linux/amd64/v3") == [
        "linux/amd64/v3",
        "linux/amd64/v2",
        "linux/amd64",
        "linux/386",
    ]
    assert names("linux/s390x") == ["linux/s390x"]


def test_reference_is_hashable_and_frozen() -> None:
    ref = parse_reference("nginx")
    assert {ref: 1}[Reference(Repository("docker.io", "library/nginx"), "latest")] == 1
