"""Who may use the console and how, over real HTTP: 401 without credentials, 403 for a viewer
changing anything or a session request without its CSRF token, sessions that expire on the
engine's clock, slowdown after failed log-ins, cookie flags, hashes at rest, the audit log."""

from __future__ import annotations

from datetime import timedelta

import requests
import sqlalchemy as sa

from reminders import accounts, models
from tests.console_fixtures import NOW, OPERATOR, PASSWORD, VIEWER, Console


def test_no_credentials_get_401_and_pages_send_to_the_log_in_form(console: Console) -> None:
    answer = requests.get(f"{console.base}/api/v1/stats")
    assert answer.status_code == 401
    assert answer.json()["error"] == "Unauthorized"
    assert requests.post(f"{console.base}/api/v1/rules/refill-due/pause").status_code == 401
    page = requests.get(f"{console.base}/rules?x=1", allow_redirects=False)
    assert page.status_code == 302
    assert page.headers["Location"] == "/login?next=/rules?x%3D1"
    for bad in ("Bearer nope", "Bearer rk_abcdefghijkl_" + "x" * 40, "Basic b2xpdmlhOng="):
        got = requests.get(f"{console.base}/api/v1/stats", headers={"Authorization": bad})
        assert got.status_code == 401, bad


def test_a_revoked_key_is_refused_at_once(console: Console) -> None:
    client = console.key(console.viewer_key)
    assert client.get(f"{console.base}/api/v1/rules").status_code == 200
    with console.state.begin() as conn:
        assert accounts.revoke_key(conn, "dashboard", now=NOW)
    assert client.get(f"{console.base}/api/v1/rules").status_code == 401


def test_a_viewer_may_look_but_not_change(console: Console) -> None:
    key = console.key(console.viewer_key)
    assert key.get(f"{console.base}/api/v1/reminders?status=failed").status_code == 200
    answer = key.post(f"{console.base}/api/v1/reminders/3/retry")
    assert answer.status_code == 403
    assert "viewer" in answer.json()["detail"]
    session, token = console.login(VIEWER)
    assert session.get(f"{console.base}/reminders/3").status_code == 200
    assert "Retry" not in session.get(f"{console.base}/reminders/3").text
    refused = session.post(
        f"{console.base}/api/v1/rules/refill-due/pause", headers={"X-CSRF-Token": token}
    )
    assert refused.status_code == 403
    refused = session.post(f"{console.base}/rules/refill-due/pause", data={"csrf_token": token})
    assert refused.status_code == 403
    with console.state.connect() as conn:
        assert conn.execute(sa.select(models.rule_state)).all() == []
        assert conn.execute(sa.select(models.reminder.c.status).where(
            models.reminder.c.id == 3)).scalar_one() == "failed"  # fmt: skip
    # A viewer may still log out.
    assert session.post(f"{console.base}/logout", data={"csrf_token": token}).status_code == 200


def test_a_session_change_needs_its_csrf_token_whatever_the_path(console: Console) -> None:
    session, token = console.login()
    for path in ("/api/v1/rules/refill-due/pause", "/rules/refill-due/pause"):
        assert session.post(f"{console.base}{path}").status_code == 403
        assert session.post(
            f"{console.base}{path}", headers={"X-CSRF-Token": "forged"}
        ).status_code == 403  # fmt: skip
    _other, other_token = console.login(OPERATOR)  # another session's token is not this one's
    assert other_token != token
    assert session.post(
        f"{console.base}/api/v1/reminders/6/cancel", headers={"X-CSRF-Token": other_token}
    ).status_code == 403  # fmt: skip
    done = session.post(
        f"{console.base}/api/v1/rules/refill-due/pause", headers={"X-CSRF-Token": token}
    )
    assert done.status_code == 200 and done.json() == {"rule": "refill-due", "paused": True}
    page = session.post(
        f"{console.base}/rules/refill-due/resume", data={"csrf_token": token}, allow_redirects=False
    )
    assert page.status_code == 303
    assert page.headers["Location"] == "/rules/refill-due"
    assert "is resumed" in session.get(f"{console.base}/rules/refill-due").text
    # The log-in form itself needs the token too (no log-in CSRF).
    fresh = requests.post(f"{console.base}/login", data={"name": OPERATOR, "password": PASSWORD})
    assert fresh.status_code == 403


def test_sessions_expire_on_the_engine_clock_and_end_with_the_user(console: Console) -> None:
    session, _token = console.login()
    console.set_now(NOW + timedelta(hours=11, minutes=59))
    assert session.get(f"{console.base}/api/v1/stats?days=1").status_code == 200
    console.set_now(NOW + timedelta(hours=12, minutes=1))
    assert session.get(f"{console.base}/api/v1/stats?days=1").status_code == 401
    page = session.get(f"{console.base}/", allow_redirects=False)
    assert page.status_code == 302 and page.headers["Location"].startswith("/login")

    console.set_now(NOW)
    session, _token = console.login(VIEWER)
    with console.state.begin() as conn:
        assert accounts.remove_user(conn, VIEWER, now=NOW)
    assert session.get(f"{console.base}/api/v1/stats?days=1").status_code == 401


def test_failed_log_ins_slow_down_the_next_tries(console: Console) -> None:
    client = requests.Session()
    token = console.csrf(client)

    def log_in(password: str) -> requests.Response:
        return client.post(
            f"{console.base}/login",
            data={"name": OPERATOR, "password": password, "csrf_token": token},
            allow_redirects=False,
        )

    for _ in range(5):
        wrong = log_in("guess")
        assert wrong.status_code == 401
        assert "Wrong name or password." in wrong.text
    slowed = log_in(PASSWORD)  # even the right password waits
    assert slowed.status_code == 429
    assert slowed.headers["Retry-After"] == "2"
    assert "try again in 2 s" in slowed.text
    console.set_now(NOW + timedelta(seconds=2))
    assert log_in("guess").status_code == 401  # a sixth failure: now 4 s
    console.set_now(NOW + timedelta(seconds=4))
    assert log_in(PASSWORD).status_code == 429
    console.set_now(NOW + timedelta(seconds=6))
    done = log_in(PASSWORD)
    assert done.status_code == 302 and done.headers["Location"] == "/"
    # Another name is not slowed by these.
    assert console.login(VIEWER)
    with console.state.connect() as conn:
        rows = conn.execute(
            sa.select(models.audit.c.actor, models.audit.c.action)
            .where(models.audit.c.action.like("login%"))
            .order_by(models.audit.c.id)
        ).all()
    assert [tuple(r) for r in rows] == [(OPERATOR, "login.failed")] * 6 + [
        (OPERATOR, "login"),
        (VIEWER, "login"),
    ]


def test_cookie_flags_and_headers(console: Console) -> None:
    client = requests.Session()
    plain = client.get(f"{console.base}/login")
    cookie = plain.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    proxied = requests.get(f"{console.base}/login", headers={"X-Forwarded-Proto": "https"})
    assert "; Secure" in proxied.headers["Set-Cookie"]
    csp = plain.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert plain.headers["X-Frame-Options"] == "DENY"
    # After logging in, only a path of the console is followed.
    token = console.csrf(client)
    away = client.post(
        f"{console.base}/login",
        data={"name": OPERATOR, "password": PASSWORD, "csrf_token": token,
              "next": "https://elsewhere.example/"},
        allow_redirects=False,
    )  # fmt: skip
    assert away.headers["Location"] == "/"


def test_passwords_and_keys_are_stored_as_scrypt_hashes(console: Console) -> None:
    with console.state.connect() as conn:
        users = conn.execute(sa.select(models.user.c.password_hash)).scalars().all()
        keys = conn.execute(sa.select(models.api_key.c.key_hash)).scalars().all()
    assert len(users) == 2 and len(keys) == 2
    for stored in [*users, *keys]:
        assert stored.startswith("scrypt$16384$8$1$")
        assert PASSWORD not in stored
    assert console.operator_key.split("_", 2)[2] not in "".join(keys)  # the secret may hold _
    assert accounts.verify_secret(PASSWORD, users[0])
    assert not accounts.verify_secret(PASSWORD + "!", users[0])


def test_prometheus_scrapes_metrics_from_the_console_without_a_session(console: Console) -> None:
    """GET /metrics is served by the console process for Prometheus: no user session or API key
    (``console.metrics_key``, when set, guards it instead: see tests/test_metrics.py)."""
    from prometheus_client.parser import text_string_to_metric_families

    answer = requests.get(f"{console.base}/metrics", allow_redirects=False)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(answer.text)}
    assert {"reminders_reminders", "reminders_oldest_due_unsent_seconds"} <= names
    assert requests.post(f"{console.base}/metrics").status_code in (401, 403, 405)
