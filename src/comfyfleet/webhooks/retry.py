"""When a failed delivery is tried again: the retry schedule, its jitter, and ``Retry-After``."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

# Delay after the 1st, 2nd, ... failed attempt. 8 attempts over about 28 hours, then dead-letter:
# long enough to ride out a receiver's bad night, short enough that the payload is still useful.
SCHEDULE: tuple[timedelta, ...] = (
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=10),
)
MAX_ATTEMPTS = len(SCHEDULE) + 1

# ±10 %: events that failed together (an endpoint's outage) come back spread out, not as one burst.
JITTER = 0.1

# A receiver may ask for a pause, but not park a delivery forever (or overflow our arithmetic).
MAX_RETRY_AFTER = timedelta(hours=12)


def next_delay(attempts_made: int, rng: random.Random | None = None) -> timedelta | None:
    """The pause after ``attempts_made`` failed attempts, jittered; None once the schedule is spent."""
    if attempts_made < 1 or attempts_made > len(SCHEDULE):
        return None
    factor = 1.0 + (rng or random).uniform(-JITTER, JITTER)
    return SCHEDULE[attempts_made - 1] * factor


def parse_retry_after(value: str | None, now: datetime) -> timedelta | None:
    """``Retry-After`` as delay-seconds or an HTTP date, bounded to ``MAX_RETRY_AFTER``; None when absent
    or unreadable (an unreadable header is ignored rather than trusted)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        delay = timedelta(seconds=min(int(value), int(MAX_RETRY_AFTER.total_seconds())))
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive parse means "-0000"
            when = when.replace(tzinfo=UTC)
        delay = when - now
    return max(timedelta(0), min(delay, MAX_RETRY_AFTER))


def next_attempt_at(
    now: datetime, attempts_made: int, retry_after: timedelta | None, rng: random.Random | None = None
) -> datetime | None:
    """When to try again after a failure, or None to dead-letter. ``Retry-After`` can only postpone:
    the receiver asked us not to come back sooner, and our schedule already bounds how late we are."""
    delay = next_delay(attempts_made, rng)
    if delay is None:
        return None
    if retry_after is not None:
        delay = max(delay, retry_after)
    return now + delay
