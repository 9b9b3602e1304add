"""Open an image from the cache for reading: its layers' indexes, merged, and a reader.

Each layer's index comes from the first tier that has it, in the cache's order: the disk
tier (stored beside the entry, or made from the entry's tar on first use), the remote
tier (stored beside the object: only the index is fetched, not the layer), else the
layer is warmed from the registry like `warm` would, and indexed on the way. Reads of
file contents then go through `TierReader` (pipeline/layerread.py), range by range.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from pipeline.errors import LayerwarmError, PermanentError
from pipeline.fileindex import LayerIndex
from pipeline.imageview import ImageView
from pipeline.indexing import disk_index, publish_index, remote_index
from pipeline.layer import LayerSpec, Source
from pipeline.layerread import TierReader
from pipeline.manifest import Platform
from pipeline.plan import ResolvedImage, recall, remember
from pipeline.reference import Reference
from pipeline.runner import Environment

log = logging.getLogger("layerwarm")


class NoIndex(PermanentError):
    """A layer whose tar could not be indexed: its files cannot be read from the cache."""


@dataclass
class OpenedImage:
    image: ResolvedImage
    view: ImageView
    reader: TierReader

    def open(self, path: str) -> BinaryIO:
        """A regular file of the image (links followed inside it), seekable, read-only."""
        return self.view.open(path, self.reader.read)

    def close(self) -> None:
        self.reader.close()


PULL_POLICIES = ("missing", "always", "never")


class NotResolvedHere(PermanentError):
    """`--pull never` for an image this cache has never resolved."""


def open_image(ref: Reference, platform: Platform | None, env: Environment,
               pull: str = "missing") -> OpenedImage:
    """Resolve `ref` to one image and open it (see the module docstring).

    `pull` is when to ask the registry what `ref` is, as container engines have it:
    "missing" only when this cache has not resolved it before (a warm, or an earlier
    read, did), "always" every time, "never" not at all."""
    image = _resolve(ref, platform, env, pull)
    warm = functools.partial(_warm, env)
    indexes = [_index(layer, env, warm) for layer in image.layers]
    view = _merged(str(image.manifest_digest), indexes)
    for problem in view.problems[:5]:
        log.warning("%s: %s", ref, problem)
    return OpenedImage(image, view, TierReader(image.layers, indexes, env.chain(), warm))


def _resolve(ref: Reference, platform: Platform | None, env: Environment,
             pull: str) -> ResolvedImage:
    if pull not in PULL_POLICIES:
        raise ValueError(f"pull policy {pull!r}: want one of {', '.join(PULL_POLICIES)}")
    if pull != "always" and (known := recall(env.disk.meta, ref, platform)) is not None:
        return known
    if pull == "never":
        raise NotResolvedHere(f"{ref}: not in the cache at {env.disk.root} (warm it first, "
                              "or let the registry be asked: --pull missing)")
    images = env.resolver(keep_configs=True).resolve(ref, platform)
    if len(images) != 1:
        raise PermanentError(f"{ref}: {len(images)} platforms match; pick one with --platform")
    if env.disk.root.is_dir():
        remember(env.disk.meta, [(ref, platform, images[0])])
    return images[0]


_VIEWS: dict[str, ImageView] = {}  # per manifest digest: a mount reopens the same image


def _merged(manifest_digest: str, indexes: list[LayerIndex]) -> ImageView:
    """The merged view of an image, made once per manifest digest in this process."""
    if manifest_digest not in _VIEWS:
        if len(_VIEWS) >= 8:
            _VIEWS.pop(next(iter(_VIEWS)))
        _VIEWS[manifest_digest] = ImageView.from_layers(indexes)
    return _VIEWS[manifest_digest]


def _index(layer: LayerSpec, env: Environment, warm: Callable[[LayerSpec], Source | None]
           ) -> LayerIndex:
    if (index := disk_index(layer, env.disk)) is not None:
        return index
    remote_lacks_it = False
    if env.remote is not None:
        try:
            if (index := remote_index(layer, env.remote)) is not None:
                return index
            remote_lacks_it = True
        except LayerwarmError as e:  # unreachable, refused: the registry still has it
            log.warning("layer %s: no index from %s (%s); fetching the layer", layer.digest,
                        env.remote.url, e)
    source = warm(layer)
    if (index := disk_index(layer, env.disk)) is None:
        raise NoIndex(f"layer {layer.digest}: its tar could not be indexed (see the warning "
                      "above); its files cannot be read from the cache")
    if remote_lacks_it and source == "remote" and env.remote is not None:
        # A layer published before indexes existed: restored whole this once, and its index
        # put beside it, so the next reader anywhere fetches only what it reads.
        try:
            publish_index(layer, env.disk, env.remote)
        except LayerwarmError as e:
            log.warning("layer %s: could not put its file index in %s: %s", layer.digest,
                        env.remote.url, e)
    return index


def _warm(env: Environment, layer: LayerSpec) -> Source | None:
    """Materialize one layer on disk the way `warm` does (and publish it, as `warm` does);
    where it came from. Raises what the chain raises."""
    return env.chain().materialize(layer).source
