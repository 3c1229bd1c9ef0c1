"""The record step survives the state DB going away.

A throw-away PostgreSQL cluster of the test's own (``initdb``/``pg_ctl`` from
/usr/lib/postgresql/*/bin, run as the ``postgres`` user when the tests run as root) holds the
state DB; it is stopped while a worker's batch is with the provider, and started again:

- stopped a few seconds: the worker keeps trying to record until the DB is back; nothing is
  left in ``sending``, nothing is sent twice;
- stopped longer than ``state.record_patience``: the worker leaves what it sent in Redis,
  ``status`` says recording failed (not that a worker died), and the next dispatch records it,
  without sending anything again.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from reminders import report
from tests import services
from tests.channel_fixtures import SmtpServer
from tests.delivery_fixtures import SEND_AT, Shop, finish, wait_until
from tests.twilio_stub import TwilioStub

COUNT = 120  # reminders in one batch, all with the provider when the DB stops


@dataclass
class Cluster:
    """A PostgreSQL server of this test's own."""

    bin: Path
    data: Path
    port: int
    user: list[str]  # the command prefix that runs a tool as the cluster's owner

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.user, str(self.bin / "pg_ctl"), "-D", str(self.data), *args],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.ctl("-o", options, "-l", str(self.data / "log"), "-w", "start")

    def stop(self) -> None:
        self.ctl("-m", "fast", "-w", "stop")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or (
        [shutil.which("initdb")] if shutil.which("initdb") else []
    )
    if not found:
        services.unavailable("PostgreSQL's initdb and pg_ctl are not installed")
    bin_dir = Path(str(found[-1])).parent
    data = Path(tempfile.mkdtemp(prefix="reminders-pg-"))
    user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(data, "postgres", "postgres")
    subprocess.run(
        [*user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
         "--no-sync"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    running = Cluster(bin_dir, data, services.free_port(), user)
    running.start()
    try:
        yield running
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            running.ctl("-m", "immediate", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def pg_shop(
    tmp_path: Path,
    delivery_redis: str,
    stub: TwilioStub,
    mailbox_server: SmtpServer,
    cluster: Cluster,
) -> Iterator[Shop]:
    project = Shop(tmp_path, delivery_redis, stub, mailbox_server, "postgresql", cluster.url)
    try:
        yield project
    finally:
        project.close()


def all_with_the_provider(shop: Shop, patience: str) -> Shop:
    """One batch of ``COUNT``, every request in flight at once for 2 s."""
    shop.configure(batch_size=COUNT, sms_extra="    concurrency: 128\n")
    text = shop.read("config.yaml").replace(
        "state:\n  url: ", f"state:\n  record_patience: {patience}\n  url: "
    )
    shop.write("config.yaml", text)
    shop.prepare(COUNT)
    shop.stub.latency_ms = 2000
    shop.ok("dispatch", now=SEND_AT)
    return shop


def test_the_state_db_stopped_for_seconds_mid_delivery(pg_shop: Shop, cluster: Cluster) -> None:
    shop = all_with_the_provider(pg_shop, "60s")
    worker = shop.spawn_worker()
    wait_until(lambda: sum(shop.stub.received.values()) == COUNT)  # claimed, all in flight
    cluster.stop()
    wait_until(lambda: shop.stub.in_flight == 0)  # Twilio answered every one
    time.sleep(5)  # the DB stays away a few seconds while the worker tries to record
    cluster.start()
    code, _out, err = finish(worker)
    assert code == 0, err
    shop.close()  # the test's own pooled connections died with the server
    assert shop.statuses() == {"sent": COUNT}  # nothing left in sending
    assert len(shop.stub.accepted) == COUNT and set(shop.stub.accepted.values()) == {1}
    assert "state DB did not answer while recording" in err
    sids = {m["sid"] for m in shop.stub.created}
    assert {m["provider_id"] for m in shop.messages()} == sids and len(shop.messages()) == COUNT


def test_the_state_db_away_past_record_patience(pg_shop: Shop, cluster: Cluster) -> None:
    shop = all_with_the_provider(pg_shop, "2s")
    worker = shop.spawn_worker()
    wait_until(lambda: sum(shop.stub.received.values()) == COUNT)
    cluster.stop()
    code, _out, err = finish(worker)  # gave up recording: left it in Redis
    assert "left in Redis for reconciliation" in err, err
    cluster.start()
    shop.close()
    assert shop.statuses() == {"sending": COUNT}
    status = json.loads(shop.ok("status", "--json", now=SEND_AT).out)
    assert {x["cause"] for x in status["stuck_sending"]} == {report.NOT_RECORDED}
    assert "recording failed" in shop.ok("status", now=SEND_AT).out
    done = shop.ok("dispatch", "--json", now=SEND_AT).json_lines()[0]
    assert done["reconciled"] == COUNT and done["enqueued"] == 0
    assert shop.statuses() == {"sent": COUNT}
    shop.worker()
    assert len(shop.stub.accepted) == COUNT and set(shop.stub.accepted.values()) == {1}
    assert sum(shop.stub.received.values()) == COUNT  # nothing sent again
    sids = {m["sid"] for m in shop.stub.created}
    assert {r["provider_id"] for r in shop.reminders()} == sids
    assert code is not None
