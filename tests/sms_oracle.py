"""Twilio's own segment calculator (npm ``sms-segments-calculator``) as a test oracle.

One ``node`` process runs ``tests/sms_oracle.js`` for the whole session and answers one text a
line, so a property-based test can ask it thousands of times. It needs ``node`` and
``tests/node_modules`` (``npm ci --prefix tests``): skipped locally, failed in CI, when missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import services

TESTS = Path(__file__).parent
SCRIPT = TESTS / "sms_oracle.js"
PACKAGE = TESTS / "node_modules" / "sms-segments-calculator"


@dataclass(frozen=True)
class Answer:
    """What the calculator says of a text."""

    encoding: str
    segments: int
    graphemes: list[str]


class Calculator:
    """A running ``node tests/sms_oracle.js``: ask it with :meth:`count`."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process

    def count(self, text: str) -> Answer:
        """The calculator's encoding, segment count and grapheme split of ``text``."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(text) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the calculator stopped (exit {self.process.poll()})")
        answer = json.loads(line)
        return Answer(answer["encoding"], answer["segments"], answer["graphemes"])


@pytest.fixture(scope="session")
def twilio_calculator() -> Iterator[Calculator]:
    """Twilio's segment calculator in one node process for the session."""
    node = shutil.which("node")
    if node is None:
        services.unavailable("node is not installed: Twilio's segment calculator runs on it")
    if not PACKAGE.is_dir():
        services.unavailable("sms-segments-calculator is not installed: run npm ci --prefix tests")
    process = subprocess.Popen(
        [node, str(SCRIPT)],
        cwd=TESTS,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    try:
        yield Calculator(process)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(10)
