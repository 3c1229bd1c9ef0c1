"""The shipped Prometheus alert rules (workers/prometheus/alerts.yml): valid, and each firing on
the series it is meant for and not on the others (``promtool test rules``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests import services

FOLDER = Path(__file__).resolve().parent.parent / "workers" / "prometheus"


@pytest.fixture
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        services.unavailable("promtool is not installed (Debian: apt-get install prometheus)")
    assert found is not None
    return found


def test_the_alert_rules_are_valid(promtool: str) -> None:
    done = subprocess.run(
        [promtool, "check", "rules", "alerts.yml"],
        cwd=FOLDER,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout


def test_the_alert_rules_fire_on_their_series(promtool: str) -> None:
    done = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        cwd=FOLDER,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
