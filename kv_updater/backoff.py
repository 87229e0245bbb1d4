"""Reconnecting to Redis: capped exponential backoff with jitter, one ERROR per outage."""

from __future__ import annotations

import logging
import random
import time


class Backoff:
    """Delays for successive retries: equal jitter over a capped exponential (a random
    delay between half the ceiling and the ceiling, so retries never bunch at zero)."""

    def __init__(self, base: float = 0.05, cap: float = 5.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Outage:
    """Tracks whether Redis is reachable, so an outage logs one ERROR and one INFO.

    Retries in between are DEBUG: a Redis that is down for an hour must not
    write thousands of identical ERROR lines.
    """

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger = logger
        self.what = what
        self.down_since: float | None = None
        self.outages = 0

    def failed(self, cause: BaseException | str) -> None:
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1
            self.logger.error(
                "%s: Redis unavailable (%s); retrying with backoff", self.what, reason
            )
        else:
            self.logger.debug("%s: still unavailable (%s)", self.what, reason)

    def recovered(self) -> None:
        if self.down_since is not None:
            self.logger.info(
                "%s: Redis is back after %.1f s", self.what, time.monotonic() - self.down_since
            )
            self.down_since = None
