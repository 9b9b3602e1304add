"""OCI registry access: credentials (`credentials`), authentication (`auth`) and the HTTP
client (`client`).

    from pipeline.registry import RegistryClient
    with RegistryClient() as client:
        fetched = client.fetch_manifest(Reference.parse("alpine:3.19"))
"""

from pipeline.registry.client import BlobStream, FetchedManifest, RegistryClient
from pipeline.registry.credentials import Credentials, DockerConfig

__all__ = ["BlobStream", "Credentials", "DockerConfig", "FetchedManifest", "RegistryClient"]
