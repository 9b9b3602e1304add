"""Leases held by a node across task handoffs, lost leases noticed, bounded Redis calls.

Real Redis (the test Redis, and for the outage a private redis-server this test stops
with SIGSTOP). Each test uses its own node names and digests.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from pipeline.digest import Digest
from pipeline.errors import TransientError
from workers.leases import LeaseLost, Leases
from workers.redisconn import connect

REPO = Path(__file__).resolve().parent.parent

# Acquire a lease in a process of its own and exit without releasing it: the fetch task's
# process handing the layer on to the decompress and publish tasks of other processes.
ACQUIRE_AND_EXIT = """
import sys
from pipeline.digest import Digest
from workers.leases import Leases
from workers.redisconn import connect
url, node, digest, token, ttl = sys.argv[1:6]
client = connect(url)
leases = Leases(client, float(ttl), node)
assert leases.acquire(Digest.parse(digest), token)
print(client.pexpiretime(Leases.key(Digest.parse(digest))))
"""


def _digest() -> Digest:
    return Digest.parse("sha256:" + uuid.uuid4().hex * 2)


def _node() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def _acquire_in_subprocess(url: str, node: str, digest: Digest, token: str,
                           ttl: float) -> int:
    """Run ACQUIRE_AND_EXIT; return the lease's expiry (ms since the epoch) it saw."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", ACQUIRE_AND_EXIT, url, node, str(digest),
                           token, str(ttl)], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = connect(redis_url, connect_timeout=2, socket_timeout=5)
    yield c
    c.close()


@pytest.fixture
def cleanup(client: redis.Redis) -> Iterator[list[str]]:
    """Keys to delete after the test (leases and node hashes)."""
    keys: list[str] = []
    yield keys
    if keys:
        client.delete(*keys)


def _keys(leases: Leases, *digests: Digest) -> list[str]:
    return [leases.held_key, *(Leases.key(d) for d in digests)]


def _held(client: redis.Redis, leases: Leases, digest: Digest) -> tuple[str, int] | None:
    """The node's record of its lease on `digest`: (token, ms since the epoch it was taken)."""
    raw = client.hget(leases.held_key, str(digest))
    if raw is None:
        return None
    token, since = raw.decode().split(" ")
    return token, int(since)


def _held_token(client: redis.Redis, leases: Leases, digest: Digest) -> str | None:
    record = _held(client, leases, digest)
    return record[0] if record else None


def test_acquire_and_release_check_the_token(client: redis.Redis,
                                             cleanup: list[str]) -> None:
    leases = Leases(client, ttl=30, node=_node())
    other = Leases(client, ttl=30, node=_node())
    digest = _digest()
    cleanup += _keys(leases, digest) + _keys(other)
    mine, theirs = Leases.new_token(leases.node), Leases.new_token(other.node)
    try:
        assert leases.acquire(digest, mine)
        client.hset(leases.held_key, str(digest), f"{mine} 1000")  # as if taken long ago
        assert leases.acquire(digest, mine), "a redelivered task of ours holds it still"
        assert _held(client, leases, digest) == (mine, 1000), "and keeps when it was taken"
        assert not other.acquire(digest, theirs)
        assert other.try_acquire(digest, theirs) == mine, "a busy lease names its holder"
        assert leases.try_acquire(digest, mine) is None
        assert leases.holder(digest) == mine
        assert _held_token(client, leases, digest) == mine
        assert _held_token(client, other, digest) is None
        leases.check(digest, mine)
        with pytest.raises(LeaseLost):
            other.check(digest, theirs)

        other.release(digest, theirs)  # not theirs: nothing happens
        assert leases.holder(digest) == mine
        assert _held_token(client, leases, digest) == mine

        leases.release(digest, mine)
        assert leases.holder(digest) is None
        assert _held_token(client, leases, digest) is None
        assert other.acquire(digest, theirs)
        assert _held_token(client, other, digest) == theirs
    finally:
        leases.stop_renewer()
        other.stop_renewer()


def test_a_lease_is_renewed_by_another_process_of_its_node(
        redis_url: str, client: redis.Redis, cleanup: list[str]) -> None:
    """The fetch task's process takes the lease and exits; the node keeps it alive."""
    node, digest = _node(), _digest()
    token = Leases.new_token(node)
    # The renewer of another process of the same node (the CPU worker, say).
    renewer = Leases(client, ttl=3, node=node)
    cleanup += _keys(renewer, digest)
    renewer.start_renewer()
    try:
        first_expiry = _acquire_in_subprocess(redis_url, node, digest, token, ttl=3)
        key = Leases.key(digest)
        # Past the moment the lease would have expired had nobody renewed it.
        _wait_for(lambda: time.time() * 1000 > first_expiry + 500, "the first expiry")
        assert client.get(key) == token.encode(), "renewed across the handoff"
        assert client.pexpiretime(key) > first_expiry
        renewer.check(digest, token)  # the publish task, in yet another process, may go on

        renewer.release(digest, token)
        assert client.get(key) is None
        assert _held_token(client, renewer, digest) is None
    finally:
        renewer.stop_renewer()


def test_a_lease_lapses_when_no_process_of_its_node_renews_it(
        redis_url: str, client: redis.Redis, cleanup: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    node, digest = _node(), _digest()
    token = Leases.new_token(node)
    # A renewer runs, but of another node: it does not keep this node's leases.
    bystander = Leases(client, ttl=1, node=_node())
    dead_node = Leases(client, ttl=1, node=node)
    cleanup += _keys(dead_node, digest) + _keys(bystander)
    bystander.start_renewer()
    try:
        _acquire_in_subprocess(redis_url, node, digest, token, ttl=1)
        _wait_for(lambda: client.get(Leases.key(digest)) is None, "the lease to expire")
        assert _held_token(client, dead_node, digest) == token, \
            "never released: only the expiry freed it"
        assert Leases(client, ttl=1, node=_node()).acquire(digest, "another-node:1"), \
            "another node takes over"

        # The node comes back: its first renew finds the lease gone to someone else.
        with caplog.at_level(logging.WARNING, logger="layerwarm"):
            assert dead_node.renew_held() == [(str(digest), token)]
        assert "lost" in caplog.text
        assert _held_token(client, dead_node, digest) is None
        assert client.get(Leases.key(digest)) == b"another-node:1", "not ours to touch"
    finally:
        bystander.stop_renewer()


def test_a_lease_taken_over_is_marked_lost_and_check_raises(
        client: redis.Redis, cleanup: list[str], caplog: pytest.LogCaptureFixture) -> None:
    leases = Leases(client, ttl=30, node=_node(), renew_every=0.05)
    digest = _digest()
    token = Leases.new_token(leases.node)
    cleanup += _keys(leases, digest)
    try:
        with caplog.at_level(logging.WARNING, logger="layerwarm"):
            assert leases.acquire(digest, token)  # starts this process's renewer
            leases.check(digest, token)
            # It expired and another node took it (as if our renewer had been away).
            client.set(Leases.key(digest), "elsewhere:1", px=60_000)
            _wait_for(lambda: _held_token(client, leases, digest) is None,
                      "the renewer to drop the lost lease from the node's hash")
        assert "lost" in caplog.text and str(digest) in caplog.text
        assert leases.is_lost(digest, token)
        with pytest.raises(LeaseLost) as raised:
            leases.check(digest, token)
        assert isinstance(raised.value, TransientError), "the task retries, it does not fail"
        assert "elsewhere:1" in str(raised.value)
        leases.release(digest, token)
        assert client.get(Leases.key(digest)) == b"elsewhere:1", "release checks the token"
    finally:
        leases.stop_renewer()


def _waiting(leases: Leases, digest: Digest, timeout: float) -> tuple[threading.Thread,
                                                                       list[bool]]:
    """`wait_free` in a thread of its own (a fetch task's); its answer lands in the list."""
    answer: list[bool] = []
    thread = threading.Thread(target=lambda: answer.append(leases.wait_free(digest, timeout)),
                              daemon=True)
    thread.start()
    return thread, answer


def test_waiters_are_woken_by_the_release_not_by_asking_again(
        client: redis.Redis, cleanup: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every thread waiting on a digest wakes when its holder releases it; those waiting
    on another digest go on waiting."""
    monkeypatch.setattr("workers.leases.RECHECK_EVERY", 3600.0)  # only a release wakes them
    holder = Leases(client, ttl=30, node=_node())
    waiter = Leases(client, ttl=30, node=_node())
    digest, other = _digest(), _digest()
    cleanup += _keys(holder, digest, other) + _keys(waiter)
    mine = Leases.new_token(holder.node)
    try:
        assert holder.acquire(digest, mine) and holder.acquire(other, mine)
        waiters = [_waiting(waiter, digest, 3600) for _ in range(3)]
        bystander, its_answer = _waiting(waiter, other, 3600)
        _wait_for(lambda: len(waiter._watch._waiters.get(str(digest), ())) == 3,
                  "the three waiters to be watching")
        assert all(t.is_alive() for t, _ in waiters), "the lease is still held"

        holder.release(digest, mine)
        for thread, answer in waiters:
            thread.join(30)
            assert answer == [True], "woken by the release"
        assert bystander.is_alive() and its_answer == [], "another digest's waiter waits on"
        holder.release(other, mine)
        bystander.join(30)
        assert its_answer == [True]
        assert waiter._watch._waiters == {}, "waiters leave no trace"
    finally:
        holder.stop_renewer()


def test_a_release_before_the_wait_and_a_lapsed_lease_free_the_waiter(
        redis_url: str, client: redis.Redis, cleanup: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    waiter = Leases(client, ttl=30, node=_node())
    node, digest = _node(), _digest()
    cleanup += _keys(waiter, digest) + _keys(Leases(client, ttl=1, node=node), digest)
    # Released between the busy answer and the wait: the wait asks first, and is free.
    monkeypatch.setattr("workers.leases.RECHECK_EVERY", 3600.0)
    thread, answer = _waiting(waiter, digest, 3600)
    thread.join(30)
    assert answer == [True]
    # The holder's node died: its lease lapses, unannounced; the waiter asks again.
    monkeypatch.setattr("workers.leases.RECHECK_EVERY", 0.2)
    _acquire_in_subprocess(redis_url, node, digest, Leases.new_token(node), ttl=1)
    assert client.get(Leases.key(digest)) is not None
    thread, answer = _waiting(waiter, digest, 3600)
    thread.join(30)
    assert answer == [True] and client.get(Leases.key(digest)) is None


def test_a_wait_ends_false_when_its_time_runs_out(client: redis.Redis,
                                                 cleanup: list[str]) -> None:
    holder = Leases(client, ttl=30, node=_node())
    digest = _digest()
    cleanup += _keys(holder, digest)
    token = Leases.new_token(holder.node)
    try:
        assert holder.acquire(digest, token)
        assert Leases(client, ttl=30, node=_node()).wait_free(digest, 0.3) is False
        assert holder.holder(digest) == token
    finally:
        holder.stop_renewer()


def test_a_lease_taken_again_after_it_lapsed_counts_its_time_afresh(
        client: redis.Redis, cleanup: list[str]) -> None:
    """A node's lease that lapsed (its record left behind) and is taken again with a new
    token is held from now: the old record's time must not make max_hold drop it."""
    leases = Leases(client, ttl=30, node=_node(), max_hold=60)
    digest = _digest()
    old, new = Leases.new_token(leases.node), Leases.new_token(leases.node)
    cleanup += _keys(leases, digest)
    try:
        assert leases.acquire(digest, old)
        client.hset(leases.held_key, str(digest), f"{old} {int((time.time() - 120) * 1000)}")
        client.delete(Leases.key(digest))  # lapsed, never released
        taken = time.time() * 1000
        assert leases.acquire(digest, new)
        token, since = _held(client, leases, digest) or ("", 0)
        assert token == new and since >= taken - 1000
        assert leases.renew_held() == [], "held for a moment, not for two minutes"
        leases.check(digest, new)
    finally:
        leases.stop_renewer()


def test_a_lease_held_past_max_hold_is_no_longer_renewed(
        client: redis.Redis, cleanup: list[str]) -> None:
    """A chain whose next message was lost must not keep its layer's lease for ever."""
    leases = Leases(client, ttl=30, node=_node(), max_hold=60)
    digest, kept_digest = _digest(), _digest()
    token = Leases.new_token(leases.node)
    cleanup += _keys(leases, digest, kept_digest)
    try:
        assert leases.acquire(digest, token)
        assert leases.acquire(kept_digest, token)
        # Taken two minutes ago, by the node's clock.
        client.hset(leases.held_key, str(digest), f"{token} {int((time.time() - 120) * 1000)}")
        client.pexpire(Leases.key(digest), 10_000)
        client.pexpire(Leases.key(kept_digest), 10_000)
        client.hset(leases.held_key, "not-a-digest", "x")  # must not stop the round
        assert leases.renew_held() == [(str(digest), token)]
        assert client.hget(leases.held_key, "not-a-digest") is None
        assert client.pttl(Leases.key(digest)) <= 10_000, "not renewed: it lapses"
        assert client.pttl(Leases.key(kept_digest)) > 10_000, "the young one is renewed"
        assert _held_token(client, leases, digest) is None
        with pytest.raises(LeaseLost):
            leases.check(digest, token)
        leases.check(kept_digest, token)
    finally:
        leases.stop_renewer()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own, so stopping it disturbs nobody else."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        probe = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        _wait_for(lambda: _answers(probe), "the private redis-server to answer")
        yield url, proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_a_lease_not_renewed_for_over_its_ttl_is_lost(
        private_redis: tuple[str, subprocess.Popen[bytes]],
        caplog: pytest.LogCaptureFixture) -> None:
    """Redis frozen (SIGSTOP: connections open, no answers) for longer than the ttl."""
    url, server = private_redis
    client = connect(url, connect_timeout=0.3, socket_timeout=0.3)
    leases = Leases(client, ttl=1, node=_node(), renew_every=0.1)
    digest = _digest()
    token = Leases.new_token(leases.node)
    try:
        with caplog.at_level(logging.WARNING, logger="layerwarm"):
            assert leases.acquire(digest, token)
            # Long enough that the key is still ours when Redis comes back: the point is
            # that this process could not vouch for it meanwhile.
            client.pexpire(Leases.key(digest), 600_000)
            os.kill(server.pid, signal.SIGSTOP)
            _wait_for(lambda: leases.is_lost(digest, token),
                      "the renewer to give the lease up")
            os.kill(server.pid, signal.SIGCONT)
        assert "not renewed for over" in caplog.text
        assert leases.holder(digest) == token, "Redis still names us ..."
        with pytest.raises(LeaseLost):
            leases.check(digest, token)  # ... yet the holder must not act on it
    finally:
        os.kill(server.pid, signal.SIGCONT)
        leases.stop_renewer()


@pytest.fixture
def half_open() -> Iterator[str]:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)  # kept open, never read nor written

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        stop.set()
        thread.join()
        listener.close()
        for conn in held:
            conn.close()


def _bounded(call: Callable[[], object], limit: float = 30.0) -> BaseException | None:
    """Run `call` on a thread; fail if it has not returned or raised within `limit` s."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test to judge
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still waiting on a half-open Redis after {limit:.0f}s"
    return outcome[0]


def test_calls_on_a_half_open_redis_fail_within_the_timeout(half_open: str) -> None:
    leases = Leases(connect(half_open, connect_timeout=1, socket_timeout=1), ttl=3,
                    node=_node())
    digest = _digest()
    token = Leases.new_token(leases.node)
    try:
        assert isinstance(_bounded(lambda: leases.acquire(digest, token)), redis.TimeoutError)
        assert isinstance(_bounded(leases.renew_held), redis.TimeoutError)
        assert isinstance(_bounded(lambda: leases.check(digest, token)), LeaseLost)
    finally:
        # Not waiting for a renewer stuck on the listener (only a broken build has one):
        # the test must fail, not hang.
        leases.stop_renewer(timeout=0)


def test_every_redis_client_has_timeouts() -> None:
    from workers.app import app

    kwargs = connect("redis://127.0.0.1:6379/0").connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] and kwargs["socket_connect_timeout"]
    transport = app.conf.broker_transport_options
    assert transport["socket_timeout"] and transport["socket_connect_timeout"]
    assert app.conf.redis_socket_timeout and app.conf.redis_socket_connect_timeout
