"""Pins: protect an image's layers from gc until a time (`layerwarm pin REF --ttl 6h`).

A pin is recorded per layer and ref in `.meta.db` (table `pins`), so pinning two images
that share a base layer protects it until the later of the two, and unpinning one leaves
the other's protection in place. Refs are resolved against the registry like `plan`; a
ref the registry cannot resolve right now falls back to the layers a warm recorded for it
in the `images` table, so an image already warmed can be pinned offline.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipeline.config import Settings
from pipeline.digest import Digest
from pipeline.manifest import Platform
from pipeline.plan import ImageFailure, resolve_all
from pipeline.reference import Reference
from pipeline.runner import Environment


@dataclass(frozen=True)
class Pinned:
    ref: str
    layers: tuple[Digest, ...]
    until: float
    source: str  # "registry", or "recorded" when resolved from the images table offline


def pin(
    refs: Sequence[Reference],
    ttl: float,
    settings: Settings,
    *,
    platform: Platform | None,
    env: Environment | None = None,
    now: float | None = None,
) -> tuple[list[Pinned], list[ImageFailure]]:
    """Pin every layer of each ref until now + `ttl`; refs that resolve nowhere fail."""
    env = env or Environment.from_settings(settings)
    until = (time.time() if now is None else now) + ttl
    with ThreadPoolExecutor(settings.io_threads, thread_name_prefix="layerwarm-io") as io:
        plan = resolve_all(env.resolver(), list(refs), platform, io)
    layers: dict[str, list[Digest]] = {}
    for image in plan.images:
        layers.setdefault(str(image.ref), []).extend(x.digest for x in image.layers)
    env.disk.root.mkdir(parents=True, exist_ok=True)  # a pin may come before any warm
    out, failures = [], []
    for ref, found in layers.items():
        env.disk.meta.pin(found, ref, until)
        out.append(Pinned(ref, tuple(dict.fromkeys(found)), until, "registry"))
    for failure in plan.failures:
        recorded = [
            Digest.parse(r.layer_digest) for r in env.disk.meta.image_rows() if r.ref == failure.ref
        ]
        if not recorded:
            failures.append(failure)
            continue
        env.disk.meta.pin(recorded, failure.ref, until)
        out.append(Pinned(failure.ref, tuple(dict.fromkeys(recorded)), until, "recorded"))
    return out, failures
