"""Test infrastructure: image builder, real registry and S3 servers, a fault-injecting proxy.

Modules (import them directly, e.g. ``from tests.support.images import Image``):

- ``images``   deterministic layers, images, indexes; re-exports ``tars`` (no pytest, so
               benchmarks reuse it)
- ``tars``     deterministic tar entries (files, dirs, links, whiteouts), ``random_tar``
- ``registry`` ``RegistryServer``: docker-registry subprocess + push client
- ``proxy``    ``Proxy``: counting, fault-injecting HTTP reverse proxy
- ``s3``       ``S3Server``: moto_server subprocess
- ``procs``    ``ServiceError`` and the shared subprocess runner
"""
