"""stargzfs: use container images without pulling them.

The public facade: names other programs may import. Everything else is private and may change.
"""

from .errors import (
    AuthError,
    DigestMismatchError,
    FormatError,
    IntegrityError,
    NotFoundError,
    NotLazyError,
    RegistryError,
    StargzfsError,
    UnsafePathError,
    UnsupportedError,
    UsageError,
)
from .source import ByteSource, BytesSource, FileSource

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "ByteSource",
    "BytesSource",
    "DigestMismatchError",
    "FileSource",
    "FormatError",
    "IntegrityError",
    "NotFoundError",
    "NotLazyError",
    "RegistryError",
    "StargzfsError",
    "UnsafePathError",
    "UnsupportedError",
    "UsageError",
    "__version__",
]
