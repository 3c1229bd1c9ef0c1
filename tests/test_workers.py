"""What ops install: the systemd units verify with real paths, and the wheel alone (no checkout)
runs the demo, validate and RQ's own worker with the packaged settings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from reminders import redis_conn
from tests import services

REPOSITORY = Path(__file__).resolve().parent.parent
UNITS = REPOSITORY / "workers" / "systemd"
REMINDERS = Path(sys.executable).with_name("reminders")


def test_the_systemd_units_verify_once_their_paths_exist(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        services.unavailable("systemd-analyze is missing (apt-get install -y systemd)")
    # The units' paths, made real under tmp_path: the install folder with its virtualenv's
    # command (the real one), and the env file.
    home = tmp_path / "srv" / "reminders"
    (home / ".venv" / "bin").mkdir(parents=True)
    (home / ".venv" / "bin" / "reminders").symlink_to(REMINDERS)
    env = tmp_path / "etc" / "reminders" / "env"
    env.parent.mkdir(parents=True)
    env.write_text("REMINDERS_SECRET=x\n")
    env.chmod(0o600)
    units = tmp_path / "units"
    units.mkdir()
    names = sorted(p.name for p in UNITS.glob("*.service"))
    assert names == [
        "reminders-scheduler.service",
        "reminders-web.service",
        "reminders-worker@.service",
    ]
    for name in names:
        text = (UNITS / name).read_text()
        assert "/srv/reminders" in text and "/etc/reminders/env" in text
        text = text.replace("/srv/reminders", str(home)).replace("/etc/reminders/env", str(env))
        (units / name).write_text(text)
    done = subprocess.run(
        [analyze, "verify", "--man=no", *(str(units / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stderr.strip()) == (0, ""), done.stderr
    # And with the paths missing, it would say so: the check is real.
    missing = subprocess.run(
        [analyze, "verify", "--man=no", str(UNITS / names[0])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode != 0 and "is not executable" in missing.stderr


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the package installed from its wheel (built from this checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(root / "dist"),
            str(REPOSITORY),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (root / "dist").glob("reminders-*.whl")
    target = root / "venv"
    venv.EnvBuilder(with_pip=True).create(target)
    installed = subprocess.run(
        [str(target / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if installed.returncode != 0:
        services.unavailable(f"cannot install the wheel's dependencies: {installed.stderr[-800:]}")
    return target


def test_the_wheel_alone_runs_the_demo_validate_and_rqs_worker(
    wheel_env: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REMINDERS_", "PYTHON"))}
    env["REMINDERS_NOW"] = "2027-03-09T17:00:00Z"
    bin_ = wheel_env / "bin"

    def run(*argv: str | Path, **extra: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(a) for a in argv],
            cwd=tmp_path,  # not the repository: nothing of the checkout is importable
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
        return done

    where = run(bin_ / "python", "-c", "import reminders; print(reminders.__file__)").stdout
    assert where.startswith(str(wheel_env)), where
    demo = run(bin_ / "reminders", "demo")
    assert "SEE IT AS A CUSTOMER" in demo.stdout and "Done in" in demo.stdout
    config = tmp_path / "demo" / "config.yaml"
    assert run(bin_ / "reminders", "-c", config, "validate").stdout.startswith("ok: 5 rule(s)")
    try:
        worker = run(
            bin_ / "rq", "worker", "-c", "reminders.rq_settings", "--burst",
            REMINDERS_CONFIG=str(config),
        )  # fmt: skip
        assert "reminders-sms" in worker.stdout + worker.stderr
    finally:
        redis_conn.EmbeddedRedis(tmp_path / "demo" / ".reminders").stop(save=False)
