"""RFC 3339 timestamps turned into instants that sort correctly as strings.

Stale protection compares the ``updated`` instants of two messages inside a Redis
Lua script, where only strings compare exactly (Lua numbers are doubles and lose
nanoseconds).  An instant is therefore encoded as a digit-only *instant key*:
12 fixed-width digits of whole seconds since 0000-12-31T00:00:00Z (a one-day bias
keeps offsets at year 1 positive), followed by the fraction's digits with trailing
zeros removed.  Two keys compare, byte by byte, in the same order as the instants
they encode, whatever the offset or the number of fraction digits:
``...00Z`` and ``...00.000+00:00`` give the same key, ``+02:00`` is two hours
earlier than ``Z`` on the same wall clock.
"""

from __future__ import annotations

import re
from datetime import date
from functools import lru_cache

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)
_BIAS_SECONDS = 86_400


class InvalidInstant(ValueError):
    """The string is not an RFC 3339 date-time with an offset."""


@lru_cache(maxsize=8192)
def instant_key(text: str) -> str:
    """Return the sortable instant key of an RFC 3339 date-time, or raise InvalidInstant.

    Cached because real feeds repeat timestamps (many keys updated in the same
    second), and this sits on the updater's per-message hot path.
    """
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise InvalidInstant(f"not an RFC 3339 date-time with offset: {text[:64]!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    try:
        days = date(year, month, day).toordinal()
    except ValueError as exc:
        raise InvalidInstant(f"no such date: {text[:64]!r}") from exc
    # RFC 3339 allows a leap second (:60); it is the instant one second after :59.
    if hour > 23 or minute > 59 or second > 60:
        raise InvalidInstant(f"time out of range: {text[:64]!r}")
    offset = 0
    if m.group(9) is not None:
        off_h, off_m = int(m.group(10)), int(m.group(11))
        if off_h > 23 or off_m > 59:
            raise InvalidInstant(f"offset out of range: {text[:64]!r}")
        offset = (off_h * 3600 + off_m * 60) * (1 if m.group(9) == "+" else -1)
    seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset + _BIAS_SECONDS
    fraction = (m.group(7) or "").rstrip("0")
    return f"{seconds:012d}{fraction}"
