"""The one exception tree of stargzfs.

Every error the library raises on purpose is a :class:`StargzfsError`. Each class carries the
process exit code the CLI uses for it and the errno the FUSE layer answers with, so both are
decided here, once, and translated exactly once at the edge (``cli/`` and ``fuse/``).

=====================  =====  ============  ===============================================
class                  exit   errno         meaning
=====================  =====  ============  ===============================================
StargzfsError          1      EIO           anything else we anticipated
UsageError             2      EINVAL        bad arguments, bad reference syntax
AuthError              3      EACCES        401/403, missing or rejected credentials
NotFoundError          4      ENOENT        image, tag, blob, layer or path does not exist
RegistryError          5      EIO           registry/network failure after retries
IntegrityError         6      EIO           digest mismatch, malformed TOC/footer/manifest
  DigestMismatchError  6      EIO           bytes do not match their declared digest
  FormatError          6      EIO           bytes cannot be parsed (TOC, footer, tar, JSON)
    UnsafePathError    6      EIO           hostile entry name (``..``, absolute, NUL)
UnsupportedError       7      EOPNOTSUPP    the registry or the layer cannot do what was asked
  NotLazyError         7      EOPNOTSUPP    the layer has no TOC (plain gzip/zstd/tar)
=====================  =====  ============  ===============================================

Messages are one line, written for a user, and never contain credentials.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "AuthError",
    "DigestMismatchError",
    "FormatError",
    "IntegrityError",
    "NotFoundError",
    "NotLazyError",
    "RegistryError",
    "StargzfsError",
    "UnsafePathError",
    "UnsupportedError",
    "UsageError",
]


class StargzfsError(Exception):
    """Base of every error stargzfs raises on purpose."""

    exit_code: int = 1
    errno: int = _errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(StargzfsError):
    """The caller asked for something malformed (arguments, reference syntax, options)."""

    exit_code = 2
    errno = _errno.EINVAL


class AuthError(StargzfsError):
    """Authentication or authorization failed (401/403, bad or missing credentials)."""

    exit_code = 3
    errno = _errno.EACCES


class NotFoundError(StargzfsError):
    """An image, tag, blob, layer, platform or path does not exist."""

    exit_code = 4
    errno = _errno.ENOENT


class RegistryError(StargzfsError):
    """The registry or the network failed, after the retry budget was spent.

    ``status`` is the HTTP status when there was one, ``code`` the registry's JSON error code.
    """

    exit_code = 5

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class IntegrityError(StargzfsError):
    """Data is not what it claims to be."""

    exit_code = 6


class DigestMismatchError(IntegrityError):
    """Bytes whose sha256 differs from the digest that vouches for them."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"digest mismatch for {what}: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class FormatError(IntegrityError):
    """Bytes that cannot be parsed as the format they should be in."""


class UnsafePathError(FormatError):
    """An entry name that would escape its root (absolute, ``..``, NUL)."""


class UnsupportedError(StargzfsError):
    """The operation is valid but not supported here (by the registry or the layer format)."""

    exit_code = 7
    errno = _errno.EOPNOTSUPP


class NotLazyError(UnsupportedError):
    """The layer has no table of contents: it can only be read whole, not per chunk."""
