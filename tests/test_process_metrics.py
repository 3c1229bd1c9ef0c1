"""A process's own metrics: ``worker --metrics-port`` serves the provider-call and render
histograms of the messages it sent; a scan observes its phases."""

from __future__ import annotations

import os
import signal
import urllib.request

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests import services
from tests.delivery_fixtures import RULES, SCAN_AT, SEND_AT, Shop, finish, wait_until

SMS_ONLY = RULES.replace("channels: [sms, email]", "channels: [sms]")


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_worker_serves_its_send_and_render_times(shop: Shop) -> None:
    shop.configure(rules=SMS_ONLY)
    shop.prepare(3)
    shop.ok("dispatch", now=SEND_AT)
    port = services.free_port()
    worker = shop.spawn("worker", "--metrics-port", str(port), now=SEND_AT, start_new_session=True)
    try:
        wait_until(lambda: shop.statuses() == {"sent": 3})
        wait_until(lambda: services.port_open("127.0.0.1", port))
        found = samples(port)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        code, _out, err = finish(worker)
    assert code == 0, err
    sms = (("channel", "sms"),)
    assert found[("reminders_send_seconds_count", sms)] == 3.0
    assert found[("reminders_render_seconds_count", sms)] == 3.0
    assert found[("reminders_send_seconds_bucket", (*sms, ("le", "+Inf")))] == 3.0
    assert found[("reminders_send_seconds_sum", sms)] > 0
    # No label names a customer: the channel only (and the buckets).
    ours = {k for name, labels in found if name.startswith("reminders_") for k, _v in labels}
    assert ours == {"channel", "le"}


def test_a_scan_observes_its_phases(shop: Shop) -> None:
    rule = "refill-due"

    def count(phase: str) -> float:
        labels = {"rule": rule, "phase": phase}
        return REGISTRY.get_sample_value("reminders_scan_phase_seconds_count", labels) or 0.0

    before = {phase: count(phase) for phase in ("load", "query", "apply", "compare", "cancel")}
    shop.configure(rules=SMS_ONLY)
    shop.patients(2)
    shop.ok("db", "upgrade", now=SCAN_AT)
    shop.ok("scan", now=SCAN_AT)
    after = {phase: count(phase) for phase in before}
    assert {phase: after[phase] - before[phase] for phase in before} == {
        "load": 1.0,
        "query": 1.0,
        "apply": 1.0,
        "compare": 0.0,  # a first scan: nothing to compare with, nothing can have vanished
        "cancel": 0.0,
    }
    shop.ok("scan", now=SCAN_AT)  # a full rescan compares
    again = {phase: count(phase) for phase in before}
    assert {phase: again[phase] - after[phase] for phase in before} == {
        "load": 1.0,
        "query": 1.0,
        "apply": 1.0,
        "compare": 1.0,
        "cancel": 0.0,  # nothing vanished
    }
