"""Image references, repositories, digests and platforms.

References follow distribution/reference's "normalized named" rules (what ``docker pull`` and
``podman pull`` accept): ``nginx`` is ``docker.io/library/nginx:latest``; the first path
component names a registry host only if it contains ``.`` or ``:`` or is ``localhost``; a
digest wins over a tag (both are kept when both are given, the digest is what gets fetched).

Platforms follow containerd/platforms: ``os/arch[/variant]`` with its normalization
(``aarch64`` → ``arm64``, ``x86_64`` → ``amd64``, ``armhf`` → ``arm/v7`` ...) and its
preference order for compatible platforms (``arm/v7`` can run ``arm/v6``).
"""

from __future__ import annotations

import hashlib
import platform as _platform
import re
import sys
from dataclasses import dataclass, field

from .errors import UnsupportedError, UsageError

__all__ = [
    "DEFAULT_REGISTRY",
    "DEFAULT_TAG",
    "DOCKER_HUB_API_HOST",
    "DOCKER_HUB_CREDENTIAL_KEY",
    "Platform",
    "Reference",
    "Repository",
    "new_hasher",
    "parse_digest",
    "parse_reference",
    "registry_credential_key",
    "validate_digest",
]

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
# Docker Hub's name in references is not where its API lives, nor the key docker writes
# its credentials under (a leftover of the v1 index).
DOCKER_HUB_API_HOST = "registry-1.docker.io"
DOCKER_HUB_CREDENTIAL_KEY = "https://index.docker.io/v1/"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_OFFICIAL_PREFIX = "library/"
_NAME_TOTAL_LENGTH_MAX = 255

# The grammar of distribution/reference (regexp.go), piece by piece.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}")
# Lengths of the algorithms we can verify (OCI image-spec "registered algorithms").
_DIGEST_HEX_LEN = {"sha256": 64, "sha384": 96, "sha512": 128}


# --------------------------------------------------------------------------- digests


def parse_digest(digest: str) -> tuple[str, str]:
    """Split ``alg:hex`` after validating it; raise :class:`UsageError` if malformed."""
    if not _DIGEST_RE.fullmatch(digest):
        raise UsageError(f"invalid digest {digest!r}: expected ALGORITHM:HEX, e.g. sha256:<64 hex>")
    alg, hexpart = digest.split(":", 1)
    want = _DIGEST_HEX_LEN.get(alg)
    if want is not None and (len(hexpart) != want or hexpart != hexpart.lower()):
        raise UsageError(f"invalid digest {digest!r}: {alg} needs {want} lowercase hex digits")
    return alg, hexpart


def validate_digest(digest: str) -> str:
    """Return ``digest`` unchanged if well formed, else raise :class:`UsageError`."""
    parse_digest(digest)
    return digest


def new_hasher(digest: str) -> hashlib._Hash:
    """A fresh hash object for the algorithm of ``digest`` (to verify bytes against it)."""
    alg, _ = parse_digest(digest)
    if alg not in _DIGEST_HEX_LEN:
        raise UnsupportedError(f"cannot verify digest algorithm {alg!r} (only sha256/384/512)")
    return hashlib.new(alg)


# --------------------------------------------------------------------------- references


@dataclass(frozen=True, order=True)
class Repository:
    """A repository in a registry: ``docker.io`` + ``library/nginx``."""

    registry: str
    path: str

    @property
    def api_host(self) -> str:
        """Where the registry's HTTP API lives (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API_HOST if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def credential_key(self) -> str:
        """The key credentials for this registry are stored under in docker's config.json."""
        return registry_credential_key(self.registry)

    def __str__(self) -> str:
        return f"{self.registry}/{self.path}"

    @classmethod
    def parse(cls, text: str) -> Repository:
        """Parse ``[registry/]path`` (no tag or digest allowed)."""
        ref = parse_reference(text, default_tag=None)
        if ref.tag is not None or ref.digest is not None:
            raise UsageError(f"invalid repository {text!r}: remove the tag or digest")
        return ref.repo


def registry_credential_key(registry: str) -> str:
    """docker's config.json key for a registry host (Docker Hub's is a v1 URL)."""
    return DOCKER_HUB_CREDENTIAL_KEY if registry in _HUB_ALIASES else registry


@dataclass(frozen=True)
class Reference:
    """A normalized image reference. ``digest`` (if any) is what gets fetched."""

    repo: Repository
    tag: str | None = None
    digest: str | None = None

    @property
    def registry(self) -> str:
        return self.repo.registry

    @property
    def repository(self) -> str:
        return self.repo.path

    @property
    def selector(self) -> str:
        """What goes after ``/manifests/`` in the API: the digest if known, else the tag."""
        if self.digest is not None:
            return self.digest
        if self.tag is not None:
            return self.tag
        return DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.repo, self.tag, validate_digest(digest))

    def with_tag(self, tag: str) -> Reference:
        if not _TAG_RE.fullmatch(tag):
            raise UsageError(f"invalid tag {tag!r}")
        return Reference(self.repo, tag, None)

    def __str__(self) -> str:
        text = str(self.repo)
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def familiar(self) -> str:
        """The short form docker prints: ``nginx:latest`` for ``docker.io/library/nginx``."""
        text = str(self)
        if self.registry == DEFAULT_REGISTRY:
            text = text[len(DEFAULT_REGISTRY) + 1 :]
            if text.startswith(_OFFICIAL_PREFIX) and "/" not in self.repository[8:]:
                text = text[len(_OFFICIAL_PREFIX) :]
        return text


def parse_reference(text: str, *, default_tag: str | None = DEFAULT_TAG) -> Reference:
    """Parse and normalize an image reference; raise :class:`UsageError` if malformed.

    ``default_tag`` is added when neither a tag nor a digest is given (``None`` keeps it bare).
    """
    if not text:
        raise UsageError("invalid reference: empty string")
    if text != text.strip() or any(c.isspace() for c in text):
        raise UsageError(f"invalid reference {text!r}: contains whitespace")
    if _IDENTIFIER_RE.fullmatch(text):
        raise UsageError(
            f"invalid reference {text!r}: a bare 64-hex string is an image ID, not a reference"
        )
    name, at, digest = text.partition("@")
    digest_value: str | None = None
    if at:
        if not digest:
            raise UsageError(f"invalid reference {text!r}: empty digest after '@'")
        try:
            digest_value = validate_digest(digest)
        except UsageError as e:
            raise UsageError(f"invalid reference {text!r}: {e.message}") from None
    # A ':' after the last '/' separates the tag; one before it belongs to host:port.
    tag: str | None = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise UsageError(
                f"invalid reference {text!r}: tag {tag!r} must be 1-128 of [A-Za-z0-9_.-] "
                "and not start with '.' or '-'"
            )
    registry, path = _split_registry(name, text)
    if not path:
        raise UsageError(f"invalid reference {text!r}: missing repository name")
    if path.lower() != path:
        raise UsageError(f"invalid reference {text!r}: repository name {path!r} must be lowercase")
    if not _PATH_RE.fullmatch(path):
        raise UsageError(
            f"invalid reference {text!r}: repository {path!r} must be lowercase letters, digits "
            "and separators ('.', '_', '__', '-') between them, in '/'-separated components"
        )
    if registry and not _DOMAIN_RE.fullmatch(registry):
        raise UsageError(f"invalid reference {text!r}: registry host {registry!r} is malformed")
    if len(registry) + 1 + len(path) > _NAME_TOTAL_LENGTH_MAX:
        raise UsageError(
            f"invalid reference {text!r}: name longer than {_NAME_TOTAL_LENGTH_MAX} characters"
        )
    if tag is None and digest_value is None:
        tag = default_tag
    return Reference(Repository(registry, path), tag, digest_value)


def _split_registry(name: str, text: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
        if not registry:
            raise UsageError(f"invalid reference {text!r}: empty registry host")
    else:
        registry, path = DEFAULT_REGISTRY, name
    if registry == "index.docker.io":
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and path and "/" not in path:
        path = _OFFICIAL_PREFIX + path
    return registry, path


# --------------------------------------------------------------------------- platforms

_KNOWN_OS = frozenset(
    {
        "aix", "android", "darwin", "dragonfly", "freebsd", "illumos", "ios", "js", "linux",
        "netbsd", "openbsd", "plan9", "solaris", "wasip1", "windows",
    }
)  # fmt: skip
_KNOWN_ARCH = frozenset(
    {
        "386", "amd64", "amd64p32", "arm", "armbe", "arm64", "arm64be", "loong64", "mips",
        "mipsle", "mips64", "mips64le", "mips64p32", "mips64p32le", "ppc", "ppc64", "ppc64le",
        "riscv", "riscv64", "s390", "s390x", "sparc", "sparc64", "wasm",
        # spellings normalized below
        "i386", "x86_64", "x86-64", "aarch64", "armhf", "armel",
    }
)  # fmt: skip
_OS_PART_RE = re.compile(r"[a-z0-9_.-]+")


def _normalize_os(os_name: str) -> str:
    os_name = os_name.lower()
    return "darwin" if os_name == "macos" else os_name


def _normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    """containerd/platforms normalizeArch: one spelling per architecture and variant."""
    arch, variant = arch.lower(), variant.lower()
    if arch == "i386":
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        # v8 is arm64's baseline, so "arm64" and "arm64/v8" are the same platform.
        if variant in ("8", "v8", "v8.0"):
            variant = ""
        elif variant in ("9", "9.0", "v9.0"):
            variant = "v9"
        return "arm64", variant
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in ("", "7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = "v" + variant
        return "arm", variant
    return arch, variant


@dataclass(frozen=True)
class Platform:
    """An OS/architecture pair, always stored normalized (compare with ``==``)."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        arch, variant = _normalize_arch(self.architecture, self.variant)
        object.__setattr__(self, "os", _normalize_os(self.os))
        object.__setattr__(self, "architecture", arch)
        object.__setattr__(self, "variant", variant)

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]``, ``os``, or ``arch`` (the rest from the host)."""
        parts = text.strip().lower().split("/")
        parts[0] = _normalize_os(parts[0])
        if not text.strip() or len(parts) > 3 or not all(_OS_PART_RE.fullmatch(p) for p in parts):
            raise UsageError(
                f"invalid platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/arm64/v8"
            )
        if len(parts) == 1:
            host = cls.host()
            if parts[0] in _KNOWN_OS:
                # containerd: an OS alone means that OS on the host's architecture.
                return cls(parts[0], host.architecture, host.variant)
            if parts[0] in _KNOWN_ARCH:
                return cls(host.os, parts[0])
            raise UsageError(
                f"invalid platform {text!r}: unknown operating system or architecture "
                "(expected OS/ARCH[/VARIANT], e.g. linux/amd64)"
            )
        if parts[0] not in _KNOWN_OS:
            raise UsageError(f"invalid platform {text!r}: unknown operating system {parts[0]!r}")
        if parts[1] not in _KNOWN_ARCH:
            raise UsageError(f"invalid platform {text!r}: unknown architecture {parts[1]!r}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def host(cls) -> Platform:
        """The platform of this machine (what an image must be built for to run here)."""
        os_name = "linux" if sys.platform.startswith("linux") else sys.platform
        machine = _platform.machine() or "amd64"
        variant = ""
        if machine.startswith("armv"):
            # "armv7l" → arm/v7, "armv6l" → arm/v6
            digits = "".join(c for c in machine[4:] if c.isdigit())
            machine, variant = "arm", digits
        return cls(os_name, machine, variant)

    def matches(self, other: Platform) -> bool:
        """Same OS, architecture and variant after normalization (``arm64`` == ``arm64/v8``)."""
        return (self.os, self.architecture, self.variant) == (
            other.os,
            other.architecture,
            other.variant,
        )

    def compatible(self) -> tuple[Platform, ...]:
        """Platforms this one can run, best first (containerd's ``platforms.Only`` vector)."""
        vector = [self]
        if self.architecture == "amd64":
            level = _variant_number(self.variant)
            if level is not None and level > 1:
                vector += [Platform(self.os, "amd64", f"v{n}") for n in range(level - 1, 1, -1)]
                vector.append(Platform(self.os, "amd64"))
            vector.append(Platform(self.os, "386"))
        elif self.architecture == "arm":
            level = _variant_number(self.variant)
            if level is not None and level > 5:
                vector += [Platform(self.os, "arm", f"v{n}") for n in range(level - 1, 4, -1)]
        elif self.architecture == "arm64":
            vector += Platform(self.os, "arm", self.variant or "v8").compatible()
        return tuple(vector)


def _variant_number(variant: str) -> int | None:
    digits = variant[1:] if variant.startswith("v") else variant
    return int(digits) if digits.isdigit() else None
