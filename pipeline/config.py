"""Settings from the environment (`LAYERWARM_*`), with defaults a single machine can use."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import UsageError
from pipeline.retry import RetryPolicy

if TYPE_CHECKING:
    from pipeline.units import Size

# A real multi-arch index lists a dozen platforms or so (attestations are not fetched);
# thousands would cost two requests each, and are only ever a hostile registry's.
MAX_INDEX_CHILDREN = 64


def default_cache_dir(env: Mapping[str, str]) -> Path:
    # Per user, like other caches: $XDG_CACHE_HOME/layerwarm, else ~/.cache/layerwarm.
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "layerwarm"


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise UsageError(f"{name}={value} must be at least {minimum}")
    return value


def _rate(env: Mapping[str, str], name: str) -> float | None:
    raw = env.get(name)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise UsageError(f"{name}={raw} must be greater than 0")
    return value


@dataclass(frozen=True)
class Limits:
    """Caps on what one layer may expand to: absolute bytes, and output/input ratio.

    The ratio applies only past `ratio_floor` bytes of output, so small, very compressible
    layers (a tar of empty files) are not mistaken for bombs.
    """

    max_layer_bytes: int = 256 << 30
    max_ratio: int = 1000
    ratio_floor: int = 64 << 20

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Limits:
        return cls(
            max_layer_bytes=_int(env, "LAYERWARM_MAX_LAYER_BYTES", cls.max_layer_bytes),
            max_ratio=_int(env, "LAYERWARM_MAX_RATIO", cls.max_ratio),
            ratio_floor=_int(env, "LAYERWARM_RATIO_FLOOR", cls.ratio_floor, minimum=0),
        )


def _fraction(env: Mapping[str, str], name: str, default: float) -> float:
    value = _rate(env, name)  # a number above 0, or None when unset
    if value is None:
        return default
    if value > 1:
        raise UsageError(f"{name}={env[name]} must be a fraction at most 1, e.g. 0.9")
    return value


def _quota(env: Mapping[str, str]) -> dict[str, object]:
    raw = env.get("LAYERWARM_MAX_CACHE_SIZE")
    high = _fraction(env, "LAYERWARM_CACHE_HIGH_WATERMARK", 0.9)
    low = _fraction(env, "LAYERWARM_CACHE_LOW_WATERMARK", 0.8)
    if low > high:
        raise UsageError(f"LAYERWARM_CACHE_LOW_WATERMARK={low} is above the high one ({high})")
    max_size = None
    if raw:  # units (and its regexes) only when there is a size to parse
        from pipeline.units import parse_size

        max_size = parse_size(raw, "LAYERWARM_MAX_CACHE_SIZE")
    return {
        "max_cache_size": max_size,
        "cache_high_watermark": high,
        "cache_low_watermark": low,
    }


def _stored_configs(env: Mapping[str, str]) -> dict[str, object]:
    """What `.meta.db` keeps of image configs: the largest one it stores, and how long an
    unused one stays (gc drops it after). Real configs are a few KiB, a long history some
    tens; one of 7 MiB stored per image grew the file by hundreds of MB."""
    out: dict[str, object] = {}
    size, ttl = env.get("LAYERWARM_MAX_STORED_CONFIG"), env.get("LAYERWARM_STORED_CONFIG_TTL")
    if size or ttl:  # units (and its regexes) only when there is something to parse
        from pipeline.units import parse_duration, parse_size

        if size:
            out["max_stored_config"] = parse_size(size, "LAYERWARM_MAX_STORED_CONFIG").bytes
        if ttl:
            out["stored_config_ttl"] = parse_duration(ttl, "LAYERWARM_STORED_CONFIG_TTL")
    return out


IO_THREADS = 16  # transfers at a time: they wait on the network, not on a core


def _cores() -> int:
    return os.cpu_count() or 2


@dataclass(frozen=True)
class Settings:
    cache_dir: Path
    remote_url: str | None = None
    insecure_registries: tuple[str, ...] = ()
    authfile: Path | None = None  # --authfile; otherwise registry/credentials.py's default places
    io_threads: int = IO_THREADS
    cpu_threads: int = field(default_factory=_cores)
    limits: Limits = field(default_factory=Limits)
    registry_rate: float | None = None  # requests/s per registry host; None: no budget
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Automatic quota of the disk tier: after a warm, above high x max, gc to low x max.
    max_cache_size: Size | None = None  # None: no automatic gc
    cache_high_watermark: float = 0.9
    cache_low_watermark: float = 0.8
    # Image configs kept in .meta.db: larger ones are fetched again each time they are
    # needed; gc drops those unused for longer than the TTL (seconds).
    max_stored_config: int = 256 << 10
    stored_config_ttl: float = 7 * 86400.0
    # Image manifests one index may fan out to with --all-platforms (plan.Resolver).
    max_index_children: int = MAX_INDEX_CHILDREN

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        insecure = tuple(
            h.strip() for h in env.get("LAYERWARM_INSECURE_REGISTRIES", "").split(",") if h.strip()
        )
        return cls(
            cache_dir=Path(env.get("LAYERWARM_CACHE_DIR") or default_cache_dir(env)),
            remote_url=env.get("LAYERWARM_REMOTE") or None,
            insecure_registries=insecure,
            io_threads=_int(env, "LAYERWARM_IO_THREADS", IO_THREADS),
            cpu_threads=_int(env, "LAYERWARM_CPU_THREADS", _cores()),
            limits=Limits.from_env(env),
            registry_rate=_rate(env, "LAYERWARM_REGISTRY_RATE"),
            retry=RetryPolicy.from_env(env),
            **_quota(env),
            **_stored_configs(env),
            max_index_children=_int(env, "LAYERWARM_MAX_INDEX_CHILDREN", MAX_INDEX_CHILDREN),
        )

    def with_overrides(self, **changes: object) -> Settings:
        """Command-line flags win over the environment; None means 'not given'."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})
