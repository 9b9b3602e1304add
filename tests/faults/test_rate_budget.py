"""The registry request budget: a token bucket per host, and a 429 that pauses everyone.

The embedded runner uses the in-process bucket; the Redis bucket is shared by every
process that uses it (here several limiter instances stand for several workers). The
assertions are upper bounds on request rates, which a slow machine only makes easier.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import redis

from pipeline.ratelimit import LocalRateLimiter
from tests.support.cli import run_layerwarm
from tests.support.faults import max_in_window
from tests.support.images import Image, Layer, random_tar
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer
from workers.ratelimit import RedisRateLimiter


def test_local_bucket_spaces_requests_and_honours_a_penalty() -> None:
    now = [0.0]
    waits: list[float] = []

    def sleep(s: float) -> None:
        waits.append(s)
        now[0] += s

    limiter = LocalRateLimiter(4, burst=2, clock=lambda: now[0], sleep=sleep)
    for _ in range(6):
        limiter.acquire("r.example")
    assert waits == [0.25, 0.25, 0.25, 0.25]  # 2 from the burst, then 4 a second
    limiter.acquire("other.example")  # hosts have separate budgets
    assert len(waits) == 4
    limiter.penalize("r.example", 3.0)
    limiter.acquire("r.example")
    assert waits[4] == 3.0


def test_embedded_warm_stays_under_the_budget(
    registry: RegistryServer, registry_proxy: Proxy, tmp_path: Path
) -> None:
    layers = [Layer(random_tar(200 + i, 20_000), "gzip") for i in range(20)]
    r = f"t/{uuid.uuid4().hex[:10]}"
    registry.push_image(r, "1", Image(layers))
    registry_proxy.reset()
    p = run_layerwarm(
        "warm", f"{registry_proxy.host}/{r}:1", cache_dir=tmp_path / "c",
        env={"LAYERWARM_REGISTRY_RATE": "5"},
    )
    assert p.returncode == 0, p.stderr
    hits = registry_proxy.requests_log
    assert len(hits) >= 22  # manifest, config, 20 blobs: unthrottled, well under a second
    assert max_in_window([h.at for h in hits]) <= 5 + 5  # a burst of 5, then 5 a second


def test_a_429_pauses_the_host_for_every_user_of_the_budget(
    registry: RegistryServer, registry_proxy: Proxy, tmp_path: Path
) -> None:
    layers = [Layer(random_tar(220 + i, 20_000), "gzip") for i in range(6)]
    r = f"t/{uuid.uuid4().hex[:10]}"
    registry.push_image(r, "1", Image(layers))
    # One request a second (no burst): the first blob request, whichever layer's, says 429,
    # and every other thread's next request is a second away, long enough for the client
    # to have heard it (with 5 a second and the 429 mid-way, a busy machine let a request
    # slip in between). Not one named layer's: the threads race for tokens, and when that
    # layer came last no other request was left to come after its 429.
    any_blob = "/blobs/(?:" + "|".join(str(x.digest) for x in layers) + ")"
    registry_proxy.fail(any_blob, 429, times=1, headers={"Retry-After": "2"})
    p = run_layerwarm(
        "warm", "--io-threads", "4", f"{registry_proxy.host}/{r}:1", cache_dir=tmp_path / "c",
        env={"LAYERWARM_REGISTRY_RATE": "1"},
    )
    assert p.returncode == 0, p.stderr
    hits = registry_proxy.requests_log
    refused = next(h for h in hits if h.status == 429)
    after = sorted(h.at - refused.at for h in hits if h.at > refused.at + 0.1)
    assert len(after) >= 3, "requests for other layers and the retry came after the 429"
    # None of them, for any layer, was sent before Retry-After ran out.
    assert after[0] >= 1.9


def test_redis_bucket_is_shared_by_all_workers(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    host = f"registry-{uuid.uuid4().hex[:8]}.test"
    workers = [RedisRateLimiter(client, rate=10, burst=2) for _ in range(3)]
    taken: list[float] = []
    lock = threading.Lock()

    def work(limiter: RedisRateLimiter) -> None:
        for _ in range(8):
            limiter.acquire(host)
            with lock:
                taken.append(time.monotonic())

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(taken) == 24
    assert max_in_window(taken) <= 10 + 2 + 1  # three workers, one budget

    workers[0].penalize(host, 1.5)
    started = time.monotonic()
    workers[2].acquire(host)  # another worker honours the pause the first one set
    assert time.monotonic() - started >= 1.4
