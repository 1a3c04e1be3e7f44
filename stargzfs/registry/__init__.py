"""The async registry client: references in, manifests and blob bytes out.

Import from here, not from the submodules (their layout may change)::

    from stargzfs.registry import RegistryClient, RegistryBlobSource
"""

from .auth import Authenticator, AuthTarget, Challenge, parse_www_authenticate
from .blob_source import RegistryBlobSource
from .client import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    BlobStats,
    ClientStats,
    ManifestHead,
    ManifestResponse,
    RegistryClient,
)
from .credentials import (
    CredentialResolver,
    Credentials,
    docker_config_path,
    erase_credentials,
    store_credentials,
)
from .endpoints import (
    Endpoint,
    EndpointResolver,
    RegistryConfig,
    is_loopback,
    load_registries_conf,
    parse_mirror_option,
)
from .retry import RetryPolicy
from .spill import SpillFactory, SpillWriter, TempSpill

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MANIFEST_MEDIA_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "AuthTarget",
    "Authenticator",
    "BlobStats",
    "Challenge",
    "ClientStats",
    "CredentialResolver",
    "Credentials",
    "Endpoint",
    "EndpointResolver",
    "ManifestHead",
    "ManifestResponse",
    "RegistryBlobSource",
    "RegistryClient",
    "RegistryConfig",
    "RetryPolicy",
    "SpillFactory",
    "SpillWriter",
    "TempSpill",
    "docker_config_path",
    "erase_credentials",
    "is_loopback",
    "load_registries_conf",
    "parse_mirror_option",
    "parse_www_authenticate",
    "store_credentials",
]
