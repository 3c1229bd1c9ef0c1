"""Benchmark: how long the ``reminders`` command takes to start, beside a bare Python.

    .venv/bin/python benchmarks/cli_startup.py [--runs 21]

In the same run, alternating, ``--runs`` times each, as separate processes (what a user waits for):

- the baseline: ``python -c ''`` (the interpreter's own start-up) and ``python -c 'import click'``;
- ``reminders --help``, ``reminders --version`` (target: under 0.1 s);
- ``reminders -c CONFIG validate`` on the demo's config (a temporary demo folder, made first).

Prints the median and the fastest wall time of each, the ratio to the bare Python, and, from
``python -X importtime``, the heaviest imports of ``reminders --help`` and whether any of the
engine's heavy dependencies (SQLAlchemy, pydantic, Jinja, Redis, Flask...) is among them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("sqlalchemy", "pydantic", "jinja2", "redis", "rq", "flask", "babel", "yaml", "twilio")
TARGET = 0.1  # seconds, --help and --version


def _command() -> list[str]:
    found = Path(sys.executable).with_name("reminders")
    if not found.exists():
        raise SystemExit(f"no {found}: install the package in this Python's environment first")
    return [str(found)]


def _wall(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
    return took


def _imports(env: dict[str, str], cwd: Path) -> list[tuple[int, str]]:
    """(cumulative microseconds, module) of ``reminders --help``'s top-level imports."""
    code = "import sys; from reminders.cli import main; sys.argv = ['reminders', '--help']; main()"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    found = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self, cumulative, name = line.removeprefix("import time:").split("|")
        found.append((int(cumulative), name.rstrip()))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=21, help="runs of each command")
    args = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env["NO_COLOR"] = "1"
    prog = _command()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        subprocess.run([*prog, "demo"], cwd=cwd, env=env, capture_output=True, check=True)
        cases = {
            "python -c ''": [sys.executable, "-c", ""],
            "python -c 'import click'": [sys.executable, "-c", "import click"],
            "reminders --help": [*prog, "--help"],
            "reminders --version": [*prog, "--version"],
            "reminders validate (demo)": [*prog, "-c", "demo/config.yaml", "validate"],
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, argv in cases.items():  # alternating: a busy moment hits every case alike
                times[name].append(_wall(argv, env, cwd))
        imports = _imports(env, cwd)

    base = statistics.median(times["python -c ''"])
    print(f"{'command':28} {'median':>8} {'fastest':>8} {'x bare python':>14}")
    for name, found in times.items():
        median = statistics.median(found)
        print(f"{name:28} {median * 1000:6.0f}ms {min(found) * 1000:6.0f}ms {median / base:13.1f}x")
    for name in ("reminders --help", "reminders --version"):
        median = statistics.median(times[name])
        verdict = "ok" if median < TARGET else "OVER"
        print(f"target {name} < {TARGET * 1000:.0f} ms (median): {verdict}")
    heavy = sorted({n.strip().split(".")[0] for _c, n in imports} & set(HEAVY))
    print(f"heavy dependencies imported by --help: {', '.join(heavy) or 'none'}")
    print("heaviest imports of --help (cumulative, python -X importtime):")
    top = [(c, n) for c, n in imports if not n.startswith("  ")]
    for cumulative, name in sorted(top, reverse=True)[:8]:
        print(f"  {cumulative / 1000:6.1f} ms  {name.strip()}")


if __name__ == "__main__":
    main()
