"""``reminders web``: the app served by granian in a subprocess, as ops run it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from twilio.request_validator import RequestValidator

from reminders import links, models, state_db
from tests import services
from tests.test_web import (
    AUTH_TOKEN,
    NOW,
    PHONE,
    PUBLIC,
    REDIS_DB,
    SECRET,
    pref_token,
    write_config,
)

REMINDERS = str(Path(sys.executable).with_name("reminders"))


@dataclass
class Running:
    base: str
    process: subprocess.Popen[str]
    state_url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("REMINDERS_CONFIG", None)
    env.update({"REMINDERS_NOW": NOW.isoformat(), links.SECRET_ENV: SECRET, **extra})
    return env


@contextmanager
def serving(tmp_path: Path, *options: str) -> Iterator[Running]:
    """``reminders web`` with ``options``, started, then stopped with SIGTERM."""
    redis_url = services.redis_url(REDIS_DB)  # only pinged by /healthz
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    config = write_config(tmp_path, state_url, redis_url=redis_url)
    state_db.upgrade(state_url)
    port = services.free_port()
    log = tmp_path / "web.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [REMINDERS, "-c", str(config), "web", "--port", str(port), "--workers", "2", *options],
            env=_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"reminders web did not start:\n{log.read_text()}")
        time.sleep(0.1)
    try:
        yield Running(base, process, state_url, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        state_db.engine_for(state_url).dispose()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    with serving(tmp_path) as found:
        yield found


def test_the_server_serves_signed_webhooks_and_pages(running: Running) -> None:
    path = "/webhooks/twilio/inbound"
    params = {"From": PHONE, "To": "+15005550006", "Body": "STOP", "MessageSid": "SM" + "1" * 32}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(PUBLIC + path, params)
    unsigned = requests.post(running.base + path, data=params, timeout=30)
    assert unsigned.status_code == 403
    reply = requests.post(
        running.base + path, data=params, headers={"X-Twilio-Signature": signature}, timeout=30
    )
    assert reply.status_code == 200
    assert "<Response" in reply.text
    with state_db.engine_for(running.state_url).connect() as conn:
        stopped = conn.execute(sa.select(models.optout)).one()
    assert (stopped.channel, stopped.address, stopped.source) == ("sms", PHONE, "stop")

    token = pref_token("7")
    page = requests.get(f"{running.base}/preferences/{token}", timeout=30)
    assert page.status_code == 200
    assert "Your reminders from Acme Pharmacy" in page.text


def test_the_server_refuses_huge_and_malformed_requests(running: Running) -> None:
    huge = requests.post(
        f"{running.base}/webhooks/twilio/status", data={"x": "y" * 200_000}, timeout=30
    )
    assert huge.status_code == 413
    long_line = requests.get(f"{running.base}/preferences/{'x' * 6000}", timeout=30)
    assert long_line.status_code in (400, 414)
    assert requests.get(f"{running.base}/webhooks/twilio/status", timeout=30).status_code == 405


def test_request_headers_over_64_kib_get_431(running: Running) -> None:
    under = requests.get(f"{running.base}/healthz", headers={"X-Big": "a" * 60_000}, timeout=30)
    assert under.status_code == 200
    over = requests.get(f"{running.base}/healthz", headers={"X-Big": "a" * 100_000}, timeout=30)
    assert over.status_code == 431
    split = {f"X-Part-{i}": "a" * 8_000 for i in range(9)}  # 72 KB in nine headers
    assert requests.get(f"{running.base}/healthz", headers=split, timeout=30).status_code == 431


def _stalled_post(base: str, path: str) -> socket.socket:
    """A POST that declares 100 bytes of body, sends 2 and stalls."""
    host, port = base.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=60)
    conn.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nX-Twilio-Signature: forged\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nab".encode()
    )
    return conn


def test_stalled_bodies_hold_no_thread_and_get_408(tmp_path: Path) -> None:
    # Two workers of one thread each: six stalled bodies would hold both for good if a thread
    # waited for a body.
    with serving(tmp_path, "--threads", "1", "--body-timeout", "1") as running:
        stalled = [_stalled_post(running.base, "/webhooks/twilio/inbound") for _ in range(6)]
        try:
            for _ in range(4):
                assert requests.get(f"{running.base}/healthz", timeout=30).status_code == 200
            for conn in stalled:
                assert conn.recv(64).startswith(b"HTTP/1.1 408 ")
        finally:
            for conn in stalled:
                conn.close()
        # A whole request still works, on the same workers.
        assert requests.get(f"{running.base}/healthz", timeout=30).status_code == 200


def test_the_access_log_masks_link_tokens_and_stops_on_sigterm(tmp_path: Path) -> None:
    token = pref_token("7")
    with serving(tmp_path, "--access-log") as running:
        assert requests.get(f"{running.base}/preferences/{token}", timeout=30).status_code == 200
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(30) == 0
        output = running.output()
    assert 'GET /preferences/… HTTP/1.1" 200' in output
    assert token not in output


def test_no_access_log_by_default(running: Running) -> None:
    token = pref_token("7")
    assert requests.get(f"{running.base}/preferences/{token}", timeout=30).status_code == 200
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(30) == 0
    output = running.output()
    assert "Listening at: http://127.0.0.1:" in output  # the server's own log is there
    assert "GET /preferences/" not in output
    assert token not in output


def test_a_missing_secret_or_public_url_stops_the_command(tmp_path: Path) -> None:
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    config = write_config(tmp_path, state_url)
    state_db.upgrade(state_url)
    env = _env()
    env.pop(links.SECRET_ENV)
    args = [REMINDERS, "-c", str(config), "web", "--port", str(services.free_port())]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "REMINDERS_SECRET is not set" in done.stderr
    config.write_text(config.read_text().replace(f"  public_url: {PUBLIC}\n", ""))
    done = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "web.public_url is not set" in done.stderr
