"""stargzfs: use container images without pulling them.

The public facade: the names other programs may import. Everything else is private and may
change. Names that pull in heavy modules (trio, httpx, zstandard) are imported on first use,
so ``import stargzfs`` and ``stargzfs --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .convert import ConvertResult, convert_layer
    from .image import resolve_image
    from .index import LayerIndex, MergedTree, load_index
    from .reference import Platform, Reference, parse_reference
    from .registry import RegistryBlobSource, RegistryClient
    from .source import ByteSource, BytesSource, FileSource
    from .view import ImageView, LayerView

__version__ = "0.1.0"

_LAZY = {
    "ByteSource": "source",
    "BytesSource": "source",
    "FileSource": "source",
    "ConvertResult": "convert",
    "convert_layer": "convert",
    "resolve_image": "image",
    "LayerIndex": "index",
    "MergedTree": "index",
    "load_index": "index",
    "Platform": "reference",
    "Reference": "reference",
    "parse_reference": "reference",
    "RegistryBlobSource": "registry",
    "RegistryClient": "registry",
    "ImageView": "view",
    "LayerView": "view",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stargzfs' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "AuthError",
    "ByteSource",
    "BytesSource",
    "ConvertResult",
    "DigestMismatchError",
    "FileSource",
    "FormatError",
    "ImageView",
    "IntegrityError",
    "LayerIndex",
    "LayerView",
    "MergedTree",
    "NotFoundError",
    "NotLazyError",
    "Platform",
    "Reference",
    "RegistryBlobSource",
    "RegistryClient",
    "RegistryError",
    "StargzfsError",
    "UnsafePathError",
    "UnsupportedError",
    "UsageError",
    "__version__",
    "convert_layer",
    "load_index",
    "parse_reference",
    "resolve_image",
]
