"""The benchmark workload: a fleet of images, one big image and many tiny layers.

Deterministic from ``(scale, seed)`` on one machine: the same inputs give the same tar
bytes, blobs and digests. The base layer and the text in every other layer are copied
from real files under ``/usr/lib/python3*`` and ``/usr/share`` (sorted walk), so the
digests depend on what is installed on the machine, not on the clock or on randomness.

    base        real files (~60 MiB gzip at full scale), in every fleet image
    runtime     generated text + random bytes, in every other fleet image
    appNN       1-3 app layers each (1-80 MiB, mixed text and random bytes)
    big         one ~500 MiB text-heavy layer
    tinyNN      many images of many tiny layers (distributed throughput)

Every fleet image and the big image exist as a gzip and a zstd variant (different blobs,
same tar); tiny images only as gzip. Layers are built with the tests' builder
(``tests.support.images``: ``make_tar``, ``File``, ``compress``), so a blob here is byte
for byte ``Layer(tar, compression).blob``.

``build(scale, seed)`` builds everything in memory. With ``cache_dir`` the blobs are kept
on disk (``<cache_dir>/blobs/<hex>``) with an index (``layers.json``), and a later build
with the same scale and seed reads them back instead of compressing again.
"""

from __future__ import annotations

import json
import math
import os
import random
import stat
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from tests.support.images import (
    Dir,
    Entry,
    File,
    Image,
    Layer,
    Symlink,
    compress,
    make_tar,
    sha256_digest,
)

MiB = 1 << 20
KiB = 1 << 10
VERSION = 1  # bump when the generator changes: it is part of the cache directory name
REAL_ROOTS = ("/usr/lib/python3*", "/usr/share")
TEXT_SUFFIXES = frozenset(
    ".py .txt .rst .md .html .htm .xml .css .js .json .c .h .pl .pm .pod .sh .tex .csv "
    ".yaml .yml .ini .cfg .conf .po .svg .el .rb .tcl .awk .sed .desc .list .1 .5 .8".split()
)


@dataclass(frozen=True)
class Scale:
    name: str
    base_bytes: int          # uncompressed budget of real files in the base layer
    runtime_bytes: int
    apps: int                # fleet size (app images)
    app_min: int
    app_max: int
    big_bytes: int
    tiny_images: int
    tiny_layers: int         # per tiny image
    corpus_bytes: int        # real text the generated layers draw from


SCALES = {
    "full": Scale("full", 150 * MiB, 24 * MiB, 12, 1 * MiB, 80 * MiB, 500 * MiB, 20, 100,
                  48 * MiB),
    "quick": Scale("quick", 32 * MiB, 4 * MiB, 4, 1 * MiB, 12 * MiB, 60 * MiB, 4, 50, 8 * MiB),
}  # fmt: skip


# ---------------------------------------------------------------- layer definitions


@dataclass(frozen=True)
class LayerDef:
    """What to build for one layer; ``key`` names it in the cache index."""

    key: str
    kind: str                       # "files" (real files), "mixed", "tiny"
    size: int
    text_ratio: float = 0.0
    max_file: int = 4 * MiB
    variants: tuple[str, ...] = ("gzip", "zstd")


@dataclass(frozen=True)
class Plan:
    layers: dict[str, LayerDef]
    fleet: list[tuple[str, list[str]]]        # (image name, layer keys), fleet images
    big: list[str]
    tiny: list[tuple[str, list[str]]]


def plan(scale: Scale, seed: int) -> Plan:
    """Which layers and images the workload has; pure function of ``(scale, seed)``."""
    rng = random.Random(f"layerwarm-bench|{seed}|plan")
    layers: dict[str, LayerDef] = {
        "base": LayerDef("base", "files", scale.base_bytes),
        "runtime": LayerDef("runtime", "mixed", scale.runtime_bytes, 0.6),
        "big": LayerDef("big", "mixed", scale.big_bytes, 0.9, max_file=8 * MiB),
    }
    fleet = []
    lo, hi = math.log(scale.app_min), math.log(scale.app_max)
    for i in range(1, scale.apps + 1):
        name = f"app{i:02d}"
        keys = ["base"] + (["runtime"] if i % 2 == 0 else [])
        for j in range(1, rng.randint(1, 3) + 1):
            key = f"{name}-{j}"
            size = int(math.exp(rng.uniform(lo, hi)))
            layers[key] = LayerDef(key, "mixed", size, round(rng.uniform(0.3, 0.8), 3))
            keys.append(key)
        fleet.append((name, keys))
    tiny = []
    for i in range(1, scale.tiny_images + 1):
        keys = []
        for j in range(scale.tiny_layers):
            key = f"tiny{i:02d}-{j:03d}"
            layers[key] = LayerDef(key, "tiny", rng.randint(256, 4096), variants=("gzip",))
            keys.append(key)
        tiny.append((f"tiny{i:02d}", keys))
    return Plan(layers, fleet, ["big"], tiny)


# ---------------------------------------------------------------- real files


def _walk(roots: tuple[str, ...]) -> Iterator[Path]:
    """Regular files and symlinks under ``roots``, in sorted order, skipping bytecode."""
    import glob

    for pattern in roots:
        for root in sorted(glob.glob(pattern)):
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
                for name in sorted(filenames):
                    if not name.endswith((".pyc", ".pyo")):
                        yield Path(dirpath) / name


def _tar_name(path: Path) -> str | None:
    name = str(path).lstrip("/")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return name


@cache
def corpus(limit: int) -> bytes:
    """Up to ``limit`` bytes of real text files, concatenated in sorted-walk order."""
    parts, total = [], 0
    for path in _walk(REAL_ROOTS):
        if path.suffix.lower() not in TEXT_SUFFIXES or path.is_symlink():
            continue
        try:
            if not 256 <= path.stat().st_size <= 2 * MiB:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if b"\0" in data[:4096]:
            continue
        parts.append(data)
        total += len(data)
        if total >= limit:
            break
    text = b"".join(parts)[:limit]
    if len(text) < MiB:  # a bare machine: fall back to generated words
        rng = random.Random("corpus")
        words = b"layer blob digest manifest index config registry cache warm tar".split()
        text = b" ".join(rng.choice(words) for _ in range(limit // 6))[:limit]
    return text


def _real_files_entries(budget: int, seed: int) -> list[Entry]:
    entries: list[Entry] = [
        Dir("etc"), File("etc/layerwarm-bench-seed", f"{seed}\n".encode())
    ]
    dirs: set[str] = {"etc"}
    total = 0
    for path in _walk(REAL_ROOTS):
        name = _tar_name(path)
        if name is None:
            continue
        try:
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                entry: Entry = Symlink(name, os.readlink(path))
                size = 0
            elif stat.S_ISREG(st.st_mode) and st.st_size <= 16 * MiB:
                data = path.read_bytes()
                mode = 0o755 if st.st_mode & 0o111 else 0o644
                entry, size = File(name, data, mode), len(data)
            else:
                continue
        except (OSError, UnicodeError):
            continue
        parent = name.rpartition("/")[0]
        missing = []
        while parent and parent not in dirs:
            missing.append(parent)
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
        entries += [Dir(d) for d in reversed(missing)]
        entries.append(entry)
        total += size + 512
        if total >= budget:
            break
    return entries


def _mixed_entries(d: LayerDef, seed: int, text: bytes) -> list[Entry]:
    """Files of text (slices of the real-text corpus) and random bytes, about ``d.size``."""
    rng = random.Random(f"layerwarm-bench|{seed}|{d.key}")
    top = f"opt/{d.key}"
    entries: list[Entry] = [Dir("opt"), Dir(top)]
    remaining, i = d.size, 0
    lo, hi = math.log(4 * KiB), math.log(d.max_file)
    while remaining > 1024:
        if i % 64 == 0:
            sub = f"{top}/d{i // 64:03d}"
            entries.append(Dir(sub))
        n = min(int(math.exp(rng.uniform(lo, hi))), max(remaining - 1024, 1))
        if rng.random() < d.text_ratio:
            off = rng.randrange(len(text))
            data = (text[off:] + text)[:n] if off + n > len(text) else text[off : off + n]
            while len(data) < n:  # a corpus shorter than the file
                data += text[: n - len(data)]
            entries.append(File(f"{sub}/f{i:05d}.txt", data))
        else:
            entries.append(File(f"{sub}/f{i:05d}.bin", rng.randbytes(n), 0o755))
        remaining -= n + 1024
        i += 1
    return entries


def layer_tar(d: LayerDef, scale: Scale, seed: int) -> bytes:
    """The uncompressed tar of one layer."""
    if d.kind == "files":
        return make_tar(_real_files_entries(d.size, seed))
    if d.kind == "mixed":
        return make_tar(_mixed_entries(d, seed, corpus(scale.corpus_bytes)))
    if d.kind == "tiny":
        rng = random.Random(f"layerwarm-bench|{seed}|{d.key}")
        words = corpus(scale.corpus_bytes)
        off = rng.randrange(max(len(words) - d.size, 1))
        return make_tar([Dir("t"), File(f"t/{d.key}.txt", words[off : off + d.size])])
    raise ValueError(f"unknown layer kind {d.kind!r}")


# ---------------------------------------------------------------- built layers


@dataclass
class BuiltLayer:
    """A built blob: quacks like ``tests.support.images.Layer`` for ``Image``.

    The blob is in memory (``data``) or on disk (``path``); ``blob`` reads it.
    """

    key: str
    compression: str
    digest: str
    diff_id: str
    size: int
    uncompressed_size: int
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)
    override_diff_id: None = None

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @property
    def blob(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    def media_type_for(self, fmt: str) -> str:
        return Layer(b"", self.compression).media_type_for(fmt)

    @property
    def media_type(self) -> str:
        return self.media_type_for("oci")

    def descriptor(self, fmt: str = "oci") -> dict[str, object]:
        return {"mediaType": self.media_type_for(fmt), "digest": self.digest, "size": self.size}

    def meta(self) -> dict[str, object]:
        return {"digest": self.digest, "diff_id": self.diff_id, "size": self.size,
                "uncompressed_size": self.uncompressed_size}  # fmt: skip


def _build_layer(
    d: LayerDef, scale: Scale, seed: int, blob_dir: Path | None
) -> dict[str, BuiltLayer]:
    tar = layer_tar(d, scale, seed)
    diff_id = sha256_digest(tar)
    out = {}
    for comp in d.variants:
        blob = compress(tar, comp)
        digest = sha256_digest(blob)
        built = BuiltLayer(d.key, comp, digest, diff_id, len(blob), len(tar))
        if blob_dir is None:
            built.data = blob
        else:
            built.path = blob_dir / built.hex
            if not built.path.exists():
                tmp = built.path.with_name(f".{built.hex}.{os.getpid()}.tmp")
                tmp.write_bytes(blob)
                os.replace(tmp, built.path)
        out[comp] = built
    return out


def _build_layers(
    d_list: list[LayerDef], scale: Scale, seed: int, blob_dir: Path | None
) -> list[dict[str, BuiltLayer]]:
    return [_build_layer(d, scale, seed, blob_dir) for d in d_list]


# ---------------------------------------------------------------- the workload


@dataclass
class Workload:
    """Images by name (``bench/app01:gzip`` ...) and the groups the scenarios use."""

    scale: Scale
    seed: int
    images: dict[str, Image]
    fleet: dict[str, list[str]]     # compression -> fleet image names
    big: dict[str, str]             # compression -> big image name
    tiny: list[str]
    layers: dict[tuple[str, str], BuiltLayer]   # (key, compression) -> layer

    def digests(self) -> dict[str, str]:
        """Manifest digest of every image: equal for equal (scale, seed) on one machine."""
        return {name: img.manifest_digest for name, img in sorted(self.images.items())}

    def unique_layers(self, names: list[str]) -> list[BuiltLayer]:
        seen: dict[str, BuiltLayer] = {}
        for name in names:
            for lay in self.images[name].layers:
                seen.setdefault(lay.digest, lay)  # type: ignore[arg-type]
        return list(seen.values())


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def build(
    scale: str | Scale = "quick", seed: int = 1, cache_dir: Path | None = None, jobs: int = 1
) -> Workload:
    """Build (or, with ``cache_dir``, load) the workload; deterministic for ``(scale, seed)``.

    ``jobs`` > 1 builds layers in that many processes (needs ``cache_dir``).
    """
    sc = SCALES[scale] if isinstance(scale, str) else scale
    p = plan(sc, seed)
    built: dict[tuple[str, str], BuiltLayer] = {}
    index_path = blob_dir = None
    index: dict[str, dict[str, dict]] = {}
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        blob_dir = cache_dir / "blobs"
        blob_dir.mkdir(parents=True, exist_ok=True)
        index_path = cache_dir / "layers.json"
        if index_path.exists():
            index = json.loads(index_path.read_text())
    todo: list[LayerDef] = []
    for key, d in p.layers.items():
        cached = index.get(key, {})
        if blob_dir is not None and all(
            c in cached
            and cached[c].get("def") == repr(d)
            and (blob_dir / cached[c]["digest"].split(":")[1]).exists()
            for c in d.variants
        ):
            for c in d.variants:
                m = cached[c]
                built[(key, c)] = BuiltLayer(
                    key, c, m["digest"], m["diff_id"], m["size"], m["uncompressed_size"],
                    path=blob_dir / m["digest"].split(":")[1],
                )
        else:
            todo.append(d)
    if todo:
        total = sum(d.size for d in todo)
        _log(f"building {len(todo)} layers ({total / MiB:.0f} MiB of tar, gzip + zstd) ...")
        # Big layers first, each its own task; tiny layers in batches.
        todo.sort(key=lambda d: -d.size)
        batches = [[d] for d in todo if d.kind != "tiny"]
        tiny = [d for d in todo if d.kind == "tiny"]
        batches += [tiny[i : i + 200] for i in range(0, len(tiny), 200)]
        if jobs > 1 and blob_dir is not None:
            with ProcessPoolExecutor(jobs) as pool:
                futures = [pool.submit(_build_layers, b, sc, seed, blob_dir) for b in batches]
                results = [f.result() for f in futures]
        else:
            results = [_build_layers(b, sc, seed, blob_dir) for b in batches]
        for batch in results:
            for variants in batch:
                for c, lay in variants.items():
                    built[(lay.key, c)] = lay
                    meta = {**lay.meta(), "def": repr(p.layers[lay.key])}
                    index.setdefault(lay.key, {})[c] = meta
        if index_path is not None:
            tmp = index_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
            os.replace(tmp, index_path)

    images: dict[str, Image] = {}
    fleet: dict[str, list[str]] = {"gzip": [], "zstd": []}
    big: dict[str, str] = {}
    for c in ("gzip", "zstd"):
        for name, keys in p.fleet:
            ref = f"bench/{name}:{c}"
            images[ref] = Image([built[(k, c)] for k in keys])  # type: ignore[misc]
            fleet[c].append(ref)
        ref = f"bench/big:{c}"
        images[ref] = Image([built[(k, c)] for k in p.big])  # type: ignore[misc]
        big[c] = ref
    tiny = []
    for name, keys in p.tiny:
        ref = f"bench/{name}:latest"
        images[ref] = Image([built[(k, "gzip")] for k in keys])  # type: ignore[misc]
        tiny.append(ref)
    return Workload(sc, seed, images, fleet, big, tiny, built)


def cache_root() -> Path:
    """Where the bench keeps what it builds once: workloads, its venv (bench/venv.py)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "layerwarm-bench"


def default_cache_dir(scale: str, seed: int) -> Path:
    return cache_root() / f"{seed}-{scale}-v{VERSION}"
