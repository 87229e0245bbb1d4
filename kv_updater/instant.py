"""RFC 3339 timestamps turned into instants that sort correctly as strings.

Stale protection compares the ``updated`` instants of two messages inside a Redis
Lua script, where only strings compare exactly (Lua numbers are doubles and lose
nanoseconds).  An instant is therefore encoded as a digit-only *instant key*:
12 digits of whole seconds since 0000-12-31T00:00:00Z plus 10**11 (the bias keeps
offsets at year 1 positive and makes every year 1-9999 exactly 12 digits wide, so
``str()`` needs no padding), followed by the fraction's digits with trailing
zeros removed.  Two keys compare, byte by byte, in the same order as the instants
they encode, whatever the offset or the number of fraction digits:
``...00Z`` and ``...00.000+00:00`` give the same key, ``+02:00`` is two hours
earlier than ``Z`` on the same wall clock.

This is on the updater's per-message hot path and real timestamps are nearly all
distinct, so a call does only slicing and dictionary look-ups: the date, hour,
minute and offset are validated and converted once per (minute, offset) - which
real feeds repeat constantly - and the seconds through a table.
"""

from __future__ import annotations

import re
from datetime import date

# [0-9], not \d: \d also matches other scripts' digits, which int() would then accept.
_MINUTE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}")
_OFFSET = re.compile(r"[+-][0-9]{2}:[0-9]{2}")
_BIAS_SECONDS = 86_400 + 10**11
_MINUTE_CACHE_MAX = 65_536
_minute_seconds: dict[str, int] = {}
# RFC 3339 allows a leap second (:60); it is the instant one second after :59.
_SECONDS = {f"{i:02d}": i for i in range(61)}


class InvalidInstant(ValueError):
    """The string is not an RFC 3339 date-time with an offset."""


def _minute_start(minute: str, offset: str) -> int:
    """Seconds (biased) of 'YYYY-MM-DDTHH:MM' at the given offset, or raise."""
    if _MINUTE.fullmatch(minute) is None or (offset != "Z" and _OFFSET.fullmatch(offset) is None):
        raise InvalidInstant(f"not an RFC 3339 date-time with offset: {minute + offset!r}")
    try:
        days = date(int(minute[0:4]), int(minute[5:7]), int(minute[8:10])).toordinal()
    except ValueError as exc:
        raise InvalidInstant(f"no such date: {minute[:10]!r}") from exc
    hour, mins = int(minute[11:13]), int(minute[14:16])
    if hour > 23 or mins > 59:
        raise InvalidInstant(f"time out of range: {minute!r}")
    shift = 0
    if offset != "Z":
        off_h, off_m = int(offset[1:3]), int(offset[4:6])
        if off_h > 23 or off_m > 59:
            raise InvalidInstant(f"offset out of range: {offset!r}")
        shift = (off_h * 3600 + off_m * 60) * (1 if offset[0] == "+" else -1)
    return days * 86_400 + hour * 3600 + mins * 60 - shift + _BIAS_SECONDS


def instant_key(text: str) -> str:
    """Return the sortable instant key of an RFC 3339 date-time, or raise InvalidInstant.

    Shape: ``YYYY-MM-DDTHH:MM:SS`` + optional ``.digits`` + ``Z`` or ``+hh:mm``/``-hh:mm``
    (``T`` and ``Z`` in either case, as RFC 3339 allows).
    """
    if len(text) < 20 or text[16] != ":":
        raise InvalidInstant(f"not an RFC 3339 date-time with offset: {text[:64]!r}")
    if text[-1] in "Zz":
        offset, end = "Z", -1
    else:
        offset, end = text[-6:], -6
    minute = text[:16]
    start = _minute_seconds.get(minute + offset)
    if start is None:
        start = _minute_start(minute, offset)
        if len(_minute_seconds) >= _MINUTE_CACHE_MAX:
            _minute_seconds.clear()
        _minute_seconds[minute + offset] = start
    second = _SECONDS.get(text[17:19])
    if second is None:
        raise InvalidInstant(f"seconds out of range: {text[:64]!r}")
    fraction = text[19:end]
    if not fraction:
        return str(start + second)
    digits = fraction[1:]
    if fraction[0] != "." or not digits.isdigit() or not digits.isascii():
        raise InvalidInstant(f"not an RFC 3339 date-time with offset: {text[:64]!r}")
    return str(start + second) + digits.rstrip("0")
