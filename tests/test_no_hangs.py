"""No silent hangs in distributed mode, through the real CLI against real workers.

A second worker under a live node's name is refused (and a dead one's name is free
again); a job no live worker can take is said so at submit; `--wait` and `--watch` stop
after `--timeout` with the job id and how to look at it later.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import layerwarm_env
from tests.support.fleet import Fleet, Node, broker_url_for, flush_db, push, run_cli, running_fleet
from tests.support.fleetcheck import S3Tier, cache_name, wait_layer
from tests.support.images import Image, Layer, random_tar
from tests.support.proctree import Pid, descendants
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server

FLEET_DB = 5  # the module fleet's Redis database (flushed at start)
EMPTY_DB = 6  # a broker no worker listens on
EXIT_TIMEOUT = 124  # like timeout(1): stopped waiting, the job goes on
NO_REGISTRY_REF = "127.0.0.1:9/t/none:1"  # never planned: no worker takes the job


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, s3: S3Server, redis_url: str
          ) -> Iterator[Fleet]:
    tier = S3Tier.new(s3, "hangs")
    with running_fleet(tmp_path_factory.mktemp("hangs"), ("a",),
                       broker_url_for(redis_url, FLEET_DB), tier, s3.env()) as f:
        yield f


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


def test_a_second_worker_under_a_live_nodes_name_is_refused(fleet: Fleet, tmp_path: Path
                                                            ) -> None:
    cache = tmp_path / "other-cache"
    p = run_cli("worker", "--node", "a", "--cache-dir", str(cache),
                env=layerwarm_env(cache, fleet.shared_env), timeout=60)
    line = one_line(p.stderr)
    assert p.returncode == 2, p.stderr
    pid = fleet.nodes["a"].proc.pid  # type: ignore[union-attr]
    assert line.startswith("layerwarm: node a is already live on "), line
    assert f"{socket.gethostname()} (pid {pid})" in line, line
    assert fleet.alive("a")
    assert not cache.exists() or not any(cache.iterdir())  # it did nothing
    fleet.wait_for_nodes(["a"])  # the first one still serves


def test_a_dead_workers_name_can_be_taken_again_at_once(fleet: Fleet) -> None:
    """SIGKILL leaves its registration behind (no clean stop); its pid is gone, so a
    restart on the same host does not wait for the registration to expire."""
    node = fleet.nodes["a"]
    assert node.proc is not None
    tree = [Pid(pid) for pid in [node.proc.pid, *descendants(node.proc.pid)]]
    for p in tree:  # the whole host at once, as a crashed machine
        p.signal(signal.SIGKILL)
    node.proc.wait()
    fleet.restart("a", timeout=60)
    assert fleet.alive("a")
    assert "already live" not in node.log_tail()


@pytest.fixture
def empty_broker(redis_url: str, tmp_path: Path) -> dict[str, str]:
    url = broker_url_for(redis_url, EMPTY_DB)
    flush_db(url)
    return layerwarm_env(tmp_path / "cache", {"LAYERWARM_BROKER_URL": url})


def test_submit_to_remote_with_no_live_worker_warns(empty_broker: dict[str, str]) -> None:
    p = run_cli("submit", NO_REGISTRY_REF, "--to", "remote", env=empty_broker, timeout=60)
    assert p.returncode == 0, p.stderr
    assert re.fullmatch(r"[0-9a-f]{32}\n", p.stdout), p.stdout
    assert one_line(p.stderr) == ("layerwarm: warning: no worker host is live now; the job "
                                  "waits in the fleet queue (layerwarm nodes)")


def test_wait_and_watch_stop_after_timeout_naming_the_job(empty_broker: dict[str, str]
                                                          ) -> None:
    p = run_cli("submit", NO_REGISTRY_REF, "--wait", "--timeout", "1", env=empty_broker,
                timeout=60)
    assert p.returncode == EXIT_TIMEOUT, p.stderr
    m = re.search(r"^layerwarm: job ([0-9a-f]{32}) is still running after 1s; "
                  r"see it later with `layerwarm status \1`$", p.stderr, re.M)
    assert m, p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    job = m.group(1)
    w = run_cli("status", job, "--watch", "--timeout", "0.5", env=empty_broker, timeout=60)
    assert w.returncode == EXIT_TIMEOUT, w.stderr
    assert one_line(w.stderr) == (f"layerwarm: job {job} is still running after 0.5s; "
                                  f"see it later with `layerwarm status {job}`")
    s = run_cli("status", job, env=empty_broker, timeout=60)
    assert s.returncode == 0 and f"job {job}  planning" in s.stdout, s.stdout + s.stderr


def test_timeout_must_be_positive(empty_broker: dict[str, str]) -> None:
    p = run_cli("status", uuid.uuid4().hex, "--watch", "--timeout", "0", env=empty_broker)
    assert p.returncode == 2, p.stderr
    assert one_line(p.stderr) == "layerwarm: --timeout must be more than 0, not '0'"


def test_jobs_lists_recent_jobs_newest_first_with_their_state(
    fleet: Fleet, registry: RegistryServer, registry_proxy: Proxy
) -> None:
    ref = push(registry, registry_proxy, [Image([Layer(random_tar(1300, 20_000), "gzip")])])[0]
    done = fleet.submit(ref, "--wait", "--timeout", "2m")
    assert done.returncode == 0, done.stdout + done.stderr
    m = re.search(r"^job ([0-9a-f]{32}) submitted$", done.stderr, re.M)
    assert m, done.stderr
    waiting = fleet.submit_id(ref, "--to", "node:elsewhere")  # no such host: it waits

    p = fleet.run("jobs", "--json")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    listed = json.loads(p.stdout)
    assert [j["id"] for j in listed[:2]] == [waiting, m.group(1)]
    assert listed[1]["state"] == "done" and listed[1]["refs"] == [ref]
    assert listed[0]["state"] in ("planning", "running") and listed[0]["target"] == "node:elsewhere"

    t = fleet.run("jobs")
    assert t.returncode == 0 and t.stderr == "", t.stderr
    lines = t.stdout.splitlines()
    assert lines[0].split() == ["JOB", "STATE", "TARGET", "LAYERS", "AGE", "IMAGES"]
    row = next(line for line in lines if line.startswith(m.group(1)))
    assert row.split()[1:4] == ["done", "remote", "1/1"], row


def test_cancel_stops_the_layers_that_have_not_started(
    fleet: Fleet, registry: RegistryServer, registry_proxy: Proxy
) -> None:
    """A job for a host that is not up yet: cancelled, its queued fetch does nothing when
    the host comes up and takes it, while a later job for that host runs."""
    lay, other = (Layer(random_tar(seed, 300_000), "gzip") for seed in (1400, 1401))
    ref, other_ref = push(registry, registry_proxy, [Image([lay]), Image([other])])
    job = fleet.submit_id(ref, "--to", "node:late")
    wait_layer(fleet, job, lay.digest, ["pending"], allowed=[])  # planned, waiting for late

    p = fleet.run("cancel", job)
    assert (p.returncode, p.stdout, p.stderr) == (0, f"job {job} cancelled: 1 layer not "
                                                     "started\n", "")
    again = fleet.run("cancel", job)
    assert again.stdout == f"job {job} already cancelled: nothing to cancel\n", again.stderr

    late = Node("late", fleet.root / "nodes" / "late")
    late.cache_dir.mkdir(parents=True)
    fleet.nodes["late"] = late
    fleet.restart("late")  # starts it: it takes the cancelled job's fetch from its queue
    later = fleet.submit(other_ref, "--to", "node:late", "--wait", "--timeout", "2m")
    assert later.returncode == 0, later.stdout + later.stderr

    status = fleet.status(job)
    assert status["state"] == "cancelled"
    assert [x["state"] for x in status["layers"]] == ["cancelled"]
    assert registry_proxy.count(path_regex=lay.digest) == 0  # never fetched
    names = {x.name for x in late.cache_dir.iterdir()}
    assert cache_name(other) in names and cache_name(lay) not in names
    w = fleet.run("status", job, "--watch")  # a cancelled job is over: --watch ends
    assert w.returncode == 1 and f"job {job}  cancelled" in w.stdout, w.stdout + w.stderr
