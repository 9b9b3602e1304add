"""Bench scenario 8 reads each worker host's decompression time from its Celery log."""

from __future__ import annotations

from bench.scenarios.distributed import decompress_seconds

AT = "[2026-12-04 20:15:35,089: INFO/MainProcess] Task layerwarm."
LOG = "\n".join([
    AT + "fetch[c223e6d2] received",
    AT + "fetch[273dc92b] succeeded in 0.2218791110001348s: {'digest': 'sha256:8e74'}",
    AT + "decompress[a695ffa2] succeeded in 0.7141165020000244s: {'digest': 'sha256:74d5'}",
    AT + "decompress[1262b30a] succeeded in 0.374011666999877s: {'digest': 'sha256:ee6f'}",
    "[2026-12-04 20:15:35,500: ERROR/MainProcess] Task layerwarm.decompress[9e35a31f] "
    "raised unexpected: OSError('disk full')",
    AT + "publish[a21594c3] succeeded in 0.12905099999989034s: {'digest': 'sha256:2e7e'}",
])


def test_only_decompress_tasks_that_succeeded_are_summed() -> None:
    assert abs(decompress_seconds(LOG) - (0.7141165020000244 + 0.374011666999877)) < 1e-9


def test_a_host_that_decompressed_nothing_spent_nothing() -> None:
    assert decompress_seconds("") == 0.0
    assert decompress_seconds(LOG.replace("layerwarm.decompress", "layerwarm.fetch")) == 0.0
