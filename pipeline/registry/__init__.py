"""OCI registry access: authentication (`auth`) and the HTTP client (`client`).

    from pipeline.registry import RegistryClient
    with RegistryClient() as client:
        fetched = client.fetch_manifest(Reference.parse("alpine:3.19"))
"""

from pipeline.registry.auth import Credentials, DockerConfig
from pipeline.registry.client import BlobStream, FetchedManifest, RegistryClient

__all__ = ["BlobStream", "Credentials", "DockerConfig", "FetchedManifest", "RegistryClient"]
