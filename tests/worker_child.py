"""``reminders worker`` in a child process, with redis-py's UNSUBSCRIBE made to lose a race.

RQ's teardown sends UNSUBSCRIBE, then stops the pub/sub thread. When the thread reads the reply
first, it goes back to waiting for a subscription (RQ asks 60 s) and redis-py 8's ``stop()`` waits
for it. That race is won or lost by microseconds; this child makes it lose every time by pausing
after UNSUBSCRIBE is sent (a library call slowed, not the engine's code), so a worker that still
depends on the order hangs here deterministically.

    python -m tests.worker_child -c config.yaml worker [--burst]

Prints ``redis-py <version>`` first, so the test knows which version the child really ran.
"""

from __future__ import annotations

import sys
import time

import redis
from redis.client import PubSub

_unsubscribe = PubSub.unsubscribe


def _slow_unsubscribe(self: PubSub, *args: object) -> object:
    sent = _unsubscribe(self, *args)
    time.sleep(0.2)  # the reply arrives and the thread handles it before the caller goes on
    return sent


if __name__ == "__main__":
    PubSub.unsubscribe = _slow_unsubscribe  # type: ignore[method-assign]
    print(f"redis-py {redis.__version__}", flush=True)
    from reminders.cli import main

    sys.argv[0] = "reminders"
    main()
