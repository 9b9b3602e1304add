"""Resolve image references to layers, and dedupe layers across a whole set of images.

Resolution asks each unique manifest and config once (memoised, also across threads), so
a fleet of many tags over few images costs one request per unique document.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from pipeline.config import MAX_INDEX_CHILDREN, Settings
from pipeline.digest import Digest
from pipeline.errors import InvalidManifest, LayerwarmError, describe_error
from pipeline.layer import LayerSpec
from pipeline.manifest import (
    IMAGE_TYPES,
    ImageConfig,
    ImageIndex,
    ImageManifest,
    Platform,
    parse_config,
    parse_manifest,
)
from pipeline.reference import Reference
from pipeline.table import counted

if TYPE_CHECKING:  # annotations only: reading an image from the cache needs no HTTP client
    from pipeline.registry.client import RegistryClient

log = logging.getLogger("layerwarm")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Memo(Generic[K, V]):
    """Computes each key once; concurrent callers of one key wait for the first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[K, Future[V]] = {}

    def get(self, key: K, compute: Callable[[], V]) -> V:
        with self._lock:
            fut = self._futures.get(key)
            owner = fut is None
            if owner:
                fut = self._futures[key] = Future()
        assert fut is not None
        if owner:
            try:
                fut.set_result(compute())
            except BaseException as e:
                fut.set_exception(e)
        return fut.result()


@dataclass(frozen=True)
class ResolvedImage:
    ref: Reference
    manifest_digest: Digest
    platform: Platform | None
    layers: tuple[LayerSpec, ...]


@dataclass(frozen=True)
class ImageFailure:
    ref: str
    error: str


@dataclass(frozen=True)
class Plan:
    images: tuple[ResolvedImage, ...] = ()
    failures: tuple[ImageFailure, ...] = ()

    @functools.cached_property
    def layers(self) -> list[LayerSpec]:
        """Unique layers over all images, first-seen order, each with every repo that has it.

        Worked out once per plan (a warm reads it several times, and for a fleet of 10,000
        refs each pass costs about 0.1 s). Linear in the layers listed: a layer in many
        images of many repositories gathers its sources in one ordered set, not by comparing
        tuples at each image."""
        first: dict[Digest, LayerSpec] = {}
        sources: dict[Digest, dict[Reference, None]] = {}
        for image in self.images:
            for layer in image.layers:
                seen = sources.get(layer.digest)
                if seen is None:
                    first[layer.digest] = layer
                    sources[layer.digest] = dict.fromkeys(layer.sources)
                else:
                    seen.update(dict.fromkeys(layer.sources))
        out = []
        for digest, layer in first.items():
            merged, own = sources[digest], len(set(layer.sources))
            if len(merged) > own:  # other repositories have it too: theirs come after its own
                layer = LayerSpec(layer.digest, layer.diff_id, layer.media_type, layer.size,
                                  layer.sources + tuple(merged)[own:])
            out.append(layer)
        return out


class ResolvedStore(Protocol):
    """What each (ref, platform) resolved to last (the disk tier's `.meta.db`)."""

    def resolved(self, ref: str, platform: str) -> tuple[Digest, str] | None: ...
    def record_resolved(self, rows: Sequence[tuple[str, str, Digest, str]]) -> None: ...


def _key(ref: Reference, platform: Platform | None) -> tuple[str, str]:
    # The request, not the answer: no platform asked means this host's.
    return str(ref), str(platform or Platform.host())


def remember(store: ResolvedStore,
             images: Sequence[tuple[Reference, Platform | None, ResolvedImage]]) -> None:
    """Keep what each (ref, platform asked) resolved to, for `recall`."""
    store.record_resolved([
        (*_key(ref, platform), image.manifest_digest, json.dumps({
            "platform": str(image.platform) if image.platform else None,
            "layers": [[str(x.digest), str(x.diff_id), x.media_type, x.size]
                       for x in image.layers]}))
        for ref, platform, image in images])


def recall(store: ResolvedStore, ref: Reference, platform: Platform | None
           ) -> ResolvedImage | None:
    """The image `ref` resolved to when last resolved for `platform` here (the way a
    container engine's image store answers for a pulled tag), or None."""
    known = store.resolved(*_key(ref, platform))
    if known is None:
        return None
    manifest_digest, doc = known
    try:
        data = json.loads(doc)
        layers = tuple(LayerSpec(Digest.parse(d), Digest.parse(diff_id), str(media_type),
                                 int(size), (ref,))
                       for d, diff_id, media_type, size in data["layers"])
        found = Platform.parse(data["platform"]) if data["platform"] else None
    except (ValueError, KeyError, TypeError, LayerwarmError) as e:  # resolve it again
        log.debug("%s: the record of its last resolution is unusable: %s", ref, e)
        return None
    return ResolvedImage(ref, manifest_digest, found, layers)


class ConfigStore(Protocol):
    """Image configs kept between runs (the disk tier's `.meta.db`)."""

    def config(self, digest: Digest) -> bytes | None: ...
    def record_config(self, digest: Digest, data: bytes) -> None: ...


class Resolver:
    """Turns references into ResolvedImages; thread-safe, one request per unique document.

    With a `ConfigStore`, image configs come from it when it has them (verified against
    their digest like a download), and downloaded ones of at most `max_stored` bytes are
    kept there (a larger one is fetched again when needed: it would bloat the store).
    """

    def __init__(
        self, client: RegistryClient, configs: ConfigStore | None = None, *,
        max_stored: int = Settings.max_stored_config,
        max_children: int = MAX_INDEX_CHILDREN,
    ) -> None:
        self.client = client
        self._stored = configs
        self._max_stored = max_stored
        self._max_children = max_children
        self._manifests: _Memo[tuple[str, str], tuple[ImageManifest | ImageIndex, Digest]] = (
            _Memo()
        )
        self._configs: _Memo[Digest, ImageConfig] = _Memo()

    def resolve(self, ref: Reference, platform: Platform | None) -> list[ResolvedImage]:
        """The image(s) `ref` names: one for `platform`, or every platform when None."""
        doc, digest = self._manifest(ref)
        if isinstance(doc, ImageManifest):
            return [self._image(ref, doc, digest)]
        chosen = doc.images() if platform is None else (doc.select(platform),)
        if len(chosen) > self._max_children:  # before any child: each costs two requests
            raise InvalidManifest(
                f"index lists {len(chosen)} image manifests; the limit is "
                f"{self._max_children} (LAYERWARM_MAX_INDEX_CHILDREN)")
        out = []
        for desc in chosen:
            child, child_digest = self._manifest(ref.with_digest(desc.digest))
            if not isinstance(child, ImageManifest):
                raise InvalidManifest(f"{ref}: index entry {desc.digest} is not an image manifest")
            out.append(self._image(ref, child, child_digest, desc.platform))
        return out

    def _manifest(self, ref: Reference) -> tuple[ImageManifest | ImageIndex, Digest]:
        def load() -> tuple[ImageManifest | ImageIndex, Digest]:
            fetched = self.client.fetch_manifest(ref)
            return parse_manifest(fetched.data, fetched.media_type), fetched.digest

        # By digest the document is the same in every repository (it is verified against
        # the digest), so a fleet of repos sharing an index child asks for it once.
        key = ("", str(ref.digest)) if ref.digest else (ref.name, f"tag:{ref.tag}")
        return self._manifests.get(key, load)

    def _image(
        self,
        ref: Reference,
        manifest: ImageManifest,
        digest: Digest,
        platform: Platform | None = None,
    ) -> ResolvedImage:
        if manifest.media_type not in IMAGE_TYPES:
            raise InvalidManifest(f"{ref}: {manifest.media_type} is not an image manifest")
        config = self._configs.get(
            manifest.config.digest,
            lambda: parse_config(self._config_bytes(ref, manifest.config.digest)),
        )
        if len(config.diff_ids) != len(manifest.layers):
            raise InvalidManifest(
                f"{ref}: manifest lists {counted(len(manifest.layers), 'layer')} but the image "
                f"config has {counted(len(config.diff_ids), 'diff_id')}"
            )
        source = Reference(ref.registry, ref.repository)
        layers = tuple(
            LayerSpec(d.digest, diff_id, d.media_type, d.size, (source,))
            for d, diff_id in zip(manifest.layers, config.diff_ids, strict=True)
        )
        return ResolvedImage(ref, digest, platform or config.platform, layers)


    def _config_bytes(self, ref: Reference, digest: Digest) -> bytes:
        if self._stored is not None and (data := self._stored.config(digest)) is not None:
            if Digest.of_bytes(data, digest.algorithm) == digest:
                return data
            log.warning("stored image config %s does not match its digest; fetching it", digest)
        data = self.client.fetch_blob(ref, digest)
        if self._stored is not None and len(data) <= self._max_stored:
            self._stored.record_config(digest, data)
        elif self._stored is not None:
            log.info("image config %s is %d bytes, above LAYERWARM_MAX_STORED_CONFIG (%d): "
                     "not stored, fetched again when needed", digest, len(data),
                     self._max_stored)
        return data


def resolve_all(
    resolver: Resolver,
    refs: list[Reference],
    platform: Platform | None,
    executor: Executor,
    on_image: Callable[[ResolvedImage], None] | None = None,
) -> Plan:
    """Resolve every ref concurrently on `executor` into one Plan; failures are per ref.
    `on_image` hears of each image as it resolves, on the resolving thread (the embedded
    runner starts its layers there); it must not raise."""

    def one(ref: Reference) -> list[ResolvedImage] | ImageFailure:
        try:
            images = resolver.resolve(ref, platform)
        except LayerwarmError as e:
            return ImageFailure(str(ref), str(e))
        except Exception as e:  # a bug met on one reference must not end the others ...
            log.debug("resolving %s failed unexpectedly", ref, exc_info=True)
            return ImageFailure(str(ref), describe_error(e))  # ... and still says what it is
        for image in images if on_image is not None else ():
            on_image(image)
        return images

    images: list[ResolvedImage] = []
    failures: list[ImageFailure] = []
    for outcome in executor.map(one, list(dict.fromkeys(refs))):
        if isinstance(outcome, ImageFailure):
            failures.append(outcome)
        else:
            images.extend(outcome)
    return Plan(tuple(images), tuple(failures))
