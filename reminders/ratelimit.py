"""A provider rate limit per sender, shared by every worker through Redis.

A sender (a Twilio number, a messaging service) may send ``rate`` messages a second. Each worker
reserves send slots from one Redis key before sending: a slot is a moment, and consecutive slots
are ``1 / rate`` seconds apart across all workers on all machines, so the sender's throughput is
never exceeded and bursts that would draw 429s never happen. The clock is Redis' own (``TIME``),
never the engine's ``REMINDERS_NOW`` and never a worker's own clock, so machines whose clocks
disagree still share one schedule.

The algorithm is GCRA (the "virtual scheduling" form of a leaky bucket): the key holds the
theoretical time at which the next slot becomes free. A reservation of ``n`` slots takes the next
``n`` slots and tells the caller how long to wait before the first of them. A worker reserves only
a short horizon ahead (``max_wait``), so an idle worker never hoards the future.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import redis

KEY_PREFIX = "reminders:rate:"
WAVE_SECONDS = 0.05  # slots this close together go out in one call of the sender

Item = TypeVar("Item")
Result = TypeVar("Result")

# KEYS[1]: the sender's key. ARGV: slots wanted, seconds per slot, the longest wait granted.
# Returns {granted, wait in microseconds before the first granted slot, Redis' now in
# microseconds}; granted may be 0 when even the first slot lies beyond max_wait (then wait says
# when to ask again).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wanted = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - now
if wait > horizon then
  return {0, wait - horizon, now}
end
local room = math.floor((horizon - wait) / interval) + 1
local granted = math.min(wanted, room)
local last = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%d', last), 'PX', math.ceil((last - now) / 1000) + 1000)
return {granted, wait, now}
"""


@dataclass(frozen=True)
class Reservation:
    """``count`` send slots: the first after ``wait`` seconds, then one every ``interval``.

    ``first_us`` is the first slot's instant on Redis' clock (microseconds since the epoch).
    """

    count: int
    wait: float
    interval: float
    first_us: int

    def offsets(self) -> list[float]:
        """Seconds from the reservation to each slot."""
        return [self.wait + i * self.interval for i in range(self.count)]


class RateLimiter:
    """``rate`` messages a second for one ``sender``, shared through ``connection``."""

    def __init__(
        self, connection: redis.Redis, sender: str, rate: float, max_wait: float = 1.0
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.connection = connection
        self.key = KEY_PREFIX + sender
        self.rate = rate
        self.interval_us = max(1, round(1_000_000 / rate))
        self.max_wait_us = max(self.interval_us, round(max_wait * 1_000_000))
        self._script = connection.register_script(_RESERVE)

    def reserve(self, wanted: int) -> Reservation:
        """Reserve up to ``wanted`` slots; blocks (sleeps) only while none is within reach."""
        if wanted < 1:
            raise ValueError("reserve at least one slot")
        while True:
            granted, wait_us, now_us = self._script(
                keys=[self.key], args=[wanted, self.interval_us, self.max_wait_us]
            )
            if int(granted) > 0:
                return Reservation(
                    int(granted),
                    int(wait_us) / 1e6,
                    self.interval_us / 1e6,
                    int(now_us) + int(wait_us),
                )
            time.sleep(int(wait_us) / 1e6)

    def reset(self) -> None:
        """Forget the schedule (tests, or ops after changing the rate)."""
        self.connection.delete(self.key)


def paced(
    send_many: Callable[[list[Item]], list[Result]],
    items: Sequence[Item],
    limiter: RateLimiter,
    concurrency: int,
) -> list[Result]:
    """Send ``items`` through ``send_many``, each no earlier than its reserved slot.

    The slots of ``WAVE_SECONDS`` go out in one call, at the first one's time (a wave is at most
    ``rate * WAVE_SECONDS`` messages, so no second holds more than ``rate`` plus one wave); calls
    overlap on up to ``concurrency`` threads, so a provider answering in 100 ms does not stretch
    the slots apart. Returns the results in the items' order.
    """
    futures: list[tuple[int, Future[list[Result]]]] = []
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="paced") as pool:
        position = 0
        while position < len(items):
            reservation = limiter.reserve(len(items) - position)
            started = time.monotonic()
            offsets = reservation.offsets()
            per_wave = max(1, int(WAVE_SECONDS * 1_000_000) // limiter.interval_us)
            first = 0
            while first < len(offsets):
                last = min(first + per_wave, len(offsets))
                delay = started + offsets[first] - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                wave = list(items[position + first : position + last])
                futures.append((position + first, pool.submit(send_many, wave)))
                first = last
            position += reservation.count
    results: list[Result | None] = [None] * len(items)
    for start, future in futures:
        for offset, result in enumerate(future.result()):
            results[start + offset] = result
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]
