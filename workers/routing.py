"""Queue names and targets.

    layerwarm.fleet            fleet work any worker host may take (target "remote"), plans
    layerwarm.node.<N>.io      host N's IO pool: fetch and publish for N
    layerwarm.node.<N>.cpu     host N's CPU pool: decompress for N

A layer's decompress and publish go to the queues of the host that fetched it, because
its staging file is on that host's disk. When several targets share a tier, the other
targets' fetches go out when the first one's chain ends: its messages carry them along
under the FOLLOWERS keyword.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, zip_longest
from typing import TypeVar

from pipeline.errors import UsageError

T = TypeVar("T")

FLEET_QUEUE = "layerwarm.fleet"
FOLLOWERS = "then"  # a layer task's keyword: the targets whose fetch follows its chain
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


def spread(items: Sequence[T], targets: Sequence[str]) -> list[tuple[T, str]]:
    """Every item for every target, each target starting on its own share of `items`.

    `items` come in the order they should go (the plan's: largest first). Target j of n
    owns items j, j + n, j + 2n, ... and takes them first, then the others in order. With
    several node targets (all-nodes) each node's queue is consumed on its own, side by
    side: in one shared order every node would reach each layer when the others do. The
    plan uses it where every target gets its fetch at once: tiny layers' batches, and
    every layer when there is no shared tier (each node fetches from the registry). The
    pairs come target by target in turn (round robin), so each queue gets its first
    messages first.
    """
    n = len(targets)
    orders = [[*items[j::n], *(x for i, x in enumerate(items) if i % n != j)]
              for j in range(n)]
    turns = zip_longest(*([(x, t) for x in order] for order, t in zip(orders, targets,
                                                                      strict=True)))
    return [pair for pair in chain.from_iterable(turns) if pair is not None]
