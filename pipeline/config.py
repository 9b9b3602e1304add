"""Settings from the environment (`LAYERWARM_*`), with defaults a single machine can use."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.errors import UsageError


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


@dataclass(frozen=True)
class Settings:
    cache_dir: Path
    remote_url: str | None = None
    insecure_registries: tuple[str, ...] = ()
    io_threads: int = 16
    cpu_threads: int = field(default_factory=lambda: os.cpu_count() or 2)

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
            io_threads=_int(env, "LAYERWARM_IO_THREADS", 16),
            cpu_threads=_int(env, "LAYERWARM_CPU_THREADS", os.cpu_count() or 2),
        )

    def with_overrides(self, **changes: object) -> Settings:
        """Command-line flags win over the environment; None means 'not given'."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})
