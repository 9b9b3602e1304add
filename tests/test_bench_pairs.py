"""The bench's pairing of layerwarm and its peer into per-run samples (paired_runs)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from bench.scenarios.base import paired_runs


def _sides(lw_times: list[float], peer_times: list[float]
           ) -> tuple[Callable[[int], float], Callable[[int], float], list[str]]:
    """Two sides that answer the given times in turn and log who ran, in which run."""
    order: list[str] = []
    lw_it: Iterator[float] = iter(lw_times)
    peer_it: Iterator[float] = iter(peer_times)

    def lw(i: int) -> float:
        order.append(f"lw{i}")
        return next(lw_it)

    def peer(i: int) -> float:
        order.append(f"peer{i}")
        return next(peer_it)

    return lw, peer, order


def test_one_pair_a_run_alternates_who_goes_first_and_divides() -> None:
    lw, peer, order = _sides([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    lws, peers, ratios = paired_runs(3, lw, peer)
    assert order == ["lw0", "peer0", "peer1", "lw1", "lw2", "peer2"]
    assert (lws, peers, ratios) == ([1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [0.5, 1.0, 1.5])


def test_several_pairs_a_run_give_their_medians_and_an_outlier_pair_does_not_move_them(
) -> None:
    # Run 0: pairs (1.0, 1.0), (3.0, 1.0) — an outlier — and (1.1, 1.0); run 1: three
    # pairs of ratio 0.5.
    lw, peer, order = _sides([1.0, 3.0, 1.1, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 2.0, 2.0, 2.0])
    lws, peers, ratios = paired_runs(2, lw, peer, pairs=3)
    assert lws == [1.1, 1.0]
    assert peers == [1.0, 2.0]
    assert ratios == [1.1, 0.5]
    # Who goes first alternates pair by pair, across runs too.
    assert order == ["lw0", "peer0", "peer0", "lw0", "lw0", "peer0",
                     "peer1", "lw1", "lw1", "peer1", "peer1", "lw1"]
