"""Queue names and targets.

    layerwarm.fleet            fleet work any worker host may take (target "remote"), plans
    layerwarm.node.<N>.io      host N's IO pool: fetch and publish for N
    layerwarm.node.<N>.cpu     host N's CPU pool: decompress for N

A layer's decompress and publish go to the queues of the host that fetched it, because
its staging file is on that host's disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import UsageError

FLEET_QUEUE = "layerwarm.fleet"
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_node(name: str) -> str:
    if not _NODE.fullmatch(name or ""):
        raise UsageError(f"invalid node name {name!r}: letters, digits, '.', '_', '-' (max 63)")
    return name


def node_io_queue(node: str) -> str:
    return f"layerwarm.node.{check_node(node)}.io"


def node_cpu_queue(node: str) -> str:
    return f"layerwarm.node.{check_node(node)}.cpu"


@dataclass(frozen=True)
class Target:
    """Where a job puts layers: the shared remote tier, or one node's disk (+ remote)."""

    node: str | None  # None: the remote tier, any worker may do it

    @classmethod
    def parse(cls, text: str) -> Target:
        if text == "remote":
            return cls(None)
        if text.startswith("node:"):
            return cls(check_node(text[5:]))
        raise UsageError(f"invalid target {text!r}: want remote, node:NAME or all-nodes")

    @property
    def fetch_queue(self) -> str:
        return FLEET_QUEUE if self.node is None else node_io_queue(self.node)

    def __str__(self) -> str:
        return "remote" if self.node is None else f"node:{self.node}"
