"""Logging set-up shared by the services: text or JSON lines on stderr."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries stay at WARNING unless the user asks for DEBUG.
    for noisy in ("asyncio", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(
            max(logging.getLevelName(level), logging.WARNING) if level != "DEBUG" else logging.DEBUG
        )


class RateLimitedLog:
    """Logs the first ``burst`` events of each ``interval`` seconds, then one summary.

    A flood of bad messages must be logged without the log itself becoming the
    bottleneck (or the disk filler): each rejected message is still counted in
    the metrics, and the summary line says how many lines were held back.
    ``what`` names the events in that line ("rejected messages", "validation failures").
    """

    def __init__(
        self,
        logger: logging.Logger,
        burst: int = 20,
        interval: float = 5.0,
        what: str = "rejected messages",
    ) -> None:
        self.logger = logger
        self.what = what
        self.burst = burst
        self.interval = interval
        self._window_start = time.monotonic()
        self._in_window = 0
        self._suppressed = 0

    def log(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start >= self.interval:
            self.flush(now)
        if self._in_window < self.burst:
            self._in_window += 1
            self.logger.log(level, msg, *args)
        else:
            self._suppressed += 1

    def flush(self, now: float | None = None) -> None:
        if self._suppressed:
            self.logger.warning(
                "%d more %s not logged in the last %.0f s (see the metrics)",
                self._suppressed,
                self.what,
                self.interval,
            )
        self._window_start = time.monotonic() if now is None else now
        self._in_window = 0
        self._suppressed = 0
