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


def test_the_dashboards_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    import json

    import yaml

    dashboard = json.loads(
        (FOLDER.parent / "grafana" / "reminders.json").read_text(encoding="utf-8")
    )
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) == 16
    # Each query as a recording rule: promtool parses every one.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "dashboard.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Every family GET /metrics serves is on the dashboard.
    for family in (
        "reminders_reminders",
        "reminders_messages_total",
        "reminders_provider_errors_total",
        "reminders_due_unsent",
        "reminders_oldest_due_unsent_seconds",
        "reminders_queue_jobs",
        "reminders_workers",
        "reminders_scan_last_success_timestamp_seconds",
        "reminders_scan_duration_seconds",
        "reminders_scan_rows",
        "reminders_rule_paused",
        "reminders_opt_outs_total",
    ):
        assert any(family in e for e in exprs), family
