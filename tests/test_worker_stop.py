"""A worker stops at once: after its last job with ``--burst``, and on SIGTERM when idle; and
it does not stop when Redis goes away.

With redis-py 8 and RQ 2.12 a worker used to need ~60 s to exit whenever its pub/sub thread read
the UNSUBSCRIBE reply before being told to stop (see ``DeliveryWorker.unsubscribe``). The child
(``tests/worker_child.py``) makes that race go the bad way every time, and runs with each
redis-py line the project allows: the one installed, and 5, 6 and 7 from ``.venv/redis-py/``
(installed by ``make install-test``). The bound asserted is 15 s: far above a healthy stop (well
under 2 s) and far below the 60 s of the bug, so machine noise cannot flip it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from rq import Worker

from tests import services
from tests.delivery_fixtures import finish, wait_until
from tests.rules_fixtures import EMAIL_TEMPLATE, REFILLS, SMS_TEMPLATE, config_yaml

ROOT = Path(__file__).resolve().parent.parent
OTHER_REDIS_PY = ("5.3.1", "6.4.0", "7.4.1")  # keep in step with the Makefile's REDIS_PY
STOP_BOUND = 15.0  # seconds


def redis_py_path(version: str) -> str | None:
    """``PYTHONPATH`` entry for a redis-py version (None: the installed one)."""
    if version == "installed":
        return None
    folder = Path(sys.prefix) / "redis-py" / version
    if not (folder / "redis").is_dir():
        services.unavailable(f"redis-py {version} not in {folder}: run `make install-test`")
    return str(folder)


@pytest.fixture(params=["installed", *OTHER_REDIS_PY])
def redis_py(request: pytest.FixtureRequest) -> str | None:
    return redis_py_path(request.param)


@pytest.fixture
def project(tmp_path: Path, redis_url: str) -> Path:
    """The refill rule's project (no business data needed) with its queues in the tests' Redis."""
    return make_project(tmp_path, redis_url)


def make_project(tmp_path: Path, redis_url: str) -> Path:
    """Write the refill rule's project in ``tmp_path`` and create its state DB."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "refills.yaml").write_text(REFILLS)
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "refill-due.sms.j2").write_text(SMS_TEMPLATE)
    (tmp_path / "templates" / "refill-due.email.j2").write_text(EMAIL_TEMPLATE)
    text = config_yaml(redis=redis_url).format(
        source="sqlite:///business.db", state="sqlite:///reminders.db"
    )
    (tmp_path / "config.yaml").write_text(text)
    upgrade = [sys.executable, "-c", "from reminders.cli import main; main()", "db", "upgrade"]
    subprocess.run(upgrade, cwd=tmp_path, check=True, capture_output=True, timeout=60)
    return tmp_path


def spawn(project: Path, redis_py: str | None, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (redis_py, str(ROOT)) if p)
    command = [sys.executable, "-m", "tests.worker_child", "-c", str(project / "config.yaml")]
    return subprocess.Popen(
        [*command, "worker", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def enqueue_noop(redis_url: str) -> str:
    from rq import Queue

    queue = Queue("reminders-sms", connection=redis.Redis.from_url(redis_url))
    return str(queue.enqueue("reminders.jobs.noop").id)


def job_status(redis_url: str, job: str) -> str:
    from rq.job import Job

    return str(Job.fetch(job, connection=redis.Redis.from_url(redis_url)).get_status().value)


def test_a_burst_worker_exits_right_after_its_last_job(
    project: Path, redis_url: str, redis_py: str | None
) -> None:
    job = enqueue_noop(redis_url)
    started = time.monotonic()
    code, out, err = finish(spawn(project, redis_py, "--burst"), timeout=90)
    took = time.monotonic() - started
    assert code == 0, err
    assert out.startswith("redis-py "), out
    if redis_py:
        assert out.split()[1] == Path(redis_py).name  # the child ran the version asked for
    assert job_status(redis_url, job) == "finished"
    assert took < STOP_BOUND, f"the worker took {took:.1f} s to exit\n{err}"


def test_an_idle_worker_exits_right_after_sigterm(
    project: Path, redis_url: str, redis_py: str | None
) -> None:
    job = enqueue_noop(redis_url)
    child = spawn(project, redis_py)
    client = redis.Redis.from_url(redis_url)
    # The job done and the worker idle again, waiting on its queue.
    wait_until(lambda: job_status(redis_url, job) == "finished", timeout=60)
    assert len(Worker.all(connection=client)) == 1
    started = time.monotonic()
    os.killpg(child.pid, signal.SIGTERM)
    code, _, err = finish(child, timeout=90)
    took = time.monotonic() - started
    assert code == 0, err
    assert not Worker.all(connection=client)  # it went through RQ's teardown, not a crash
    assert took < STOP_BOUND, f"the worker took {took:.1f} s to exit after SIGTERM\n{err}"


def _redis_server(port: int, folder: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        services.unavailable("redis-server is not on PATH")
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    wait_until(lambda: services.port_open("127.0.0.1", port), timeout=30)
    return server


@pytest.mark.parametrize("when", ["idle", "mid-job"])
def test_a_worker_outlives_redis_and_serves_again_when_it_returns(
    tmp_path: Path, when: str
) -> None:
    """Idle, RQ's own dequeue retries; mid-job, RQ's loop ends and the engine serves again."""
    port = services.free_port()
    server = _redis_server(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    root = tmp_path / "project"
    root.mkdir()
    log = tmp_path / "worker.log"
    try:
        make_project(root, url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
        command = [sys.executable, "-c", "from reminders.cli import main; main()", "-c"]
        with log.open("w") as stderr:
            child = subprocess.Popen(
                [*command, str(root / "config.yaml"), "worker"],
                cwd=root,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        first = enqueue_noop(url)
        wait_until(lambda: job_status(url, first) == "finished", timeout=60)
        if when == "mid-job":
            from rq import Queue

            slow = Queue("reminders-sms", connection=redis.Redis.from_url(url))
            job = slow.enqueue("time.sleep", 2)
            wait_until(lambda: job_status(url, str(job.id)) == "started", timeout=60)
        server.kill()  # Redis gone, and its data with it
        server.wait()
        wait_until(lambda: "connect" in log.read_text() or "answer" in log.read_text(), timeout=60)
        time.sleep(3)  # long enough for a worker that would exit on it to have exited
        assert child.poll() is None, log.read_text()  # still running, waiting for Redis
        server = _redis_server(port, tmp_path)
        second = enqueue_noop(url)
        wait_until(lambda: job_status(url, second) == "finished", timeout=90)
        os.killpg(child.pid, signal.SIGTERM)
        code, _, _ = finish(child, timeout=60)
        assert code == 0, log.read_text()
        if when == "mid-job":
            assert "Redis answers again" in log.read_text()
    finally:
        if "child" in locals() and child.poll() is None:  # a failed check: no worker left behind
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        server.kill()
        server.wait()
