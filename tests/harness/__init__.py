"""Test harness shared by the whole suite: real registry processes, a token server, and a
FUSE mount runner. The pytest fixtures built on it live in ``tests/conftest.py``.

Import as ``from harness import ...`` (``tests/`` is on ``sys.path`` because it holds the
root ``conftest.py`` and has no ``__init__.py``; keep it that way).
"""

from __future__ import annotations

from .mount import MountedProcess, MountError, is_mounted, mounted, unmount
from .registry import (
    OCI_MANIFEST,
    TEST_USER,
    AuthKind,
    Registry,
    RegistryFactory,
    RegistryStartError,
    TLSFiles,
    find_registry_binary,
    make_tls_files,
    running_registry,
    start_registry,
)
from .token_server import TokenRequest, TokenServer

#: Digest of the manifest of ``shared/fixtures/oci-image`` (tag v1): registries must serve
#: exactly these bytes.
FIXTURE_MANIFEST_DIGEST = "sha256:73d2de179c7e746a5848c6899b9a34d5cb7bf3e557e4227dfcebc1ebcfd324b1"

__all__ = [
    "FIXTURE_MANIFEST_DIGEST",
    "OCI_MANIFEST",
    "TEST_USER",
    "AuthKind",
    "MountError",
    "MountedProcess",
    "Registry",
    "RegistryFactory",
    "RegistryStartError",
    "TLSFiles",
    "TokenRequest",
    "TokenServer",
    "find_registry_binary",
    "is_mounted",
    "make_tls_files",
    "mounted",
    "running_registry",
    "start_registry",
    "unmount",
]
