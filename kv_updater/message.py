"""The message contract: what an upstream may publish, and what gets stored.

One place decides whether a raw pub/sub payload is acceptable and turns it into
the stored value; every service imports it from here.  ``MessageRules.parse`` is on
the updater's per-message hot path, so it avoids work where it safely can: one
C-level JSON parse (orjson), a depth walk only when the payload could be deep, and
a cached timestamp parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

import orjson

from kv_updater.instant import InvalidInstant, instant_key
from kv_updater.keys import KeyLayout

MAX_DEPTH = 64
DEFAULT_TYPE_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"
DEFAULT_MAX_MESSAGE_BYTES = 1_048_576


class Severity(Enum):
    """How a rejection is logged: the seed's WARNING for malformed, ERROR for undecodable."""

    MALFORMED = "malformed"
    UNDECODABLE = "undecodable"


# Reasons are Prometheus label values: a small fixed set, never free text.
REASONS: dict[str, Severity] = {
    "too_large": Severity.MALFORMED,
    "invalid_utf8": Severity.UNDECODABLE,
    "invalid_json": Severity.UNDECODABLE,
    "too_deep": Severity.MALFORMED,
    "not_object": Severity.MALFORMED,
    "bad_type": Severity.MALFORMED,
    "reserved_type": Severity.MALFORMED,
    "bad_updated": Severity.MALFORMED,
    "bad_valid": Severity.MALFORMED,
    "bad_values": Severity.MALFORMED,
}


class Accepted(NamedTuple):
    """A message that passed every rule (a NamedTuple: cheap to build per message)."""

    type: str
    instant: str
    """Sortable instant key of ``updated`` (see kv_updater.instant)."""
    updated: str
    valid: str | None
    values: dict[str, Any]
    type_json: bytes
    """``type`` as a JSON string, spliced into commit notifications."""

    @property
    def stored(self) -> bytes:
        """The stored value: compact JSON of exactly updated, valid, values.

        Encoded on demand: under load most messages are superseded inside their
        batch and never written, so they are validated but never encoded.
        """
        return _exact(
            orjson.dumps({"updated": self.updated, "valid": self.valid, "values": self.values})
        )


_join = b"".join


def _exact(data: bytes) -> bytes:
    """``data`` in an allocation of its own size.

    orjson (3.12 and later) hands back its working buffer, 4 KiB for any short
    output: the cache of up to 100,000 type names held 400 MB that way, and a
    batch's stored values 40 MB, for a few dozen bytes each (a 1,000,000-key burst
    took the updater to 690 MB).  A two-item join copies (a one-item join returns
    the item itself) and is the cheapest copy: ~40 ns, where bytes(memoryview())
    costs ~120 ns.
    """
    return _join((data, b""))


# NamedTuple's generated __new__ is Python code; the tuple constructor is not.
_new_accepted = tuple.__new__


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str
    detail: str

    @property
    def severity(self) -> Severity:
        return REASONS[self.reason]


def _depth_exceeds(doc: Any, limit: int) -> bool:
    """True if ``doc`` nests containers deeper than ``limit`` levels (the top is level 1)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return False


def render_event(type_json: bytes, stored: bytes, seq: int) -> bytes:
    """The commit notification / SSE data / REST body for one stored value.

    ``{"type":...,"updated":...,"valid":...,"values":{...},"seq":N}``, built by
    splicing the stored JSON instead of re-encoding it.  The commit script does
    the same splice in Lua (kv_updater/commit.lua); tests hold the two equal.
    """
    return b'{"type":' + type_json + b"," + stored[1:-1] + b',"seq":' + str(seq).encode() + b"}"


class MessageRules:
    """Validation settings for messages, compiled once."""

    __slots__ = (
        "_reserved_keys",
        "_type_json",
        "_type_match",
        "_valid_seen",
        "layout",
        "max_bytes",
    )

    # Accepted types and their JSON spelling: real feeds reuse a bounded set of
    # types, so the pattern, the namespace check and the encoding run once per type.
    _TYPE_CACHE_MAX = 100_000

    def __init__(
        self,
        layout: KeyLayout | None = None,
        *,
        max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        type_pattern: str = DEFAULT_TYPE_PATTERN,
        reserved_keys: frozenset[str] = frozenset(),
    ) -> None:
        self.layout = layout or KeyLayout()
        self.max_bytes = max_bytes
        # fullmatch: with .match, "$" would also accept a trailing newline.
        self._type_match = re.compile(type_pattern).fullmatch
        self._reserved_keys = reserved_keys
        self._type_json: dict[str, bytes] = {}
        self._valid_seen: set[object] = set()

    def type_allowed(self, type_: str) -> bool:
        """The API's check before touching Redis: pattern and namespace."""
        return self._check_type(type_) is None

    def type_json(self, type_: str) -> bytes | None:
        """The JSON spelling of an allowed type name (cached); None if it is not allowed."""
        cached = self._type_json.get(type_)
        if cached is not None:
            return cached
        return None if self._check_type(type_) is not None else self._remember_type(type_)

    def _remember_type(self, type_: str) -> bytes:
        if len(self._type_json) >= self._TYPE_CACHE_MAX:
            self._type_json.clear()
        type_json = self._type_json[type_] = _exact(orjson.dumps(type_))
        return type_json

    def parse(self, raw: bytes) -> Accepted | Rejected:
        if len(raw) > self.max_bytes:
            return Rejected("too_large", f"{len(raw)} bytes, over the {self.max_bytes} limit")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                return Rejected("invalid_utf8", f"not UTF-8 at byte {bad.start}")
            if "depth limit" in str(exc):
                # Valid JSON nested beyond orjson's own limit (1024) is too deep, not undecodable.
                return Rejected("too_deep", f"nested deeper than {MAX_DEPTH} levels")
            return Rejected("invalid_json", str(exc)[:200])
        # Counting brackets is cheap; the walk only runs when they could nest too deep.
        if (raw.count(b"{") + raw.count(b"[") > MAX_DEPTH) and _depth_exceeds(doc, MAX_DEPTH):
            return Rejected("too_deep", f"nested deeper than {MAX_DEPTH} levels")
        if type(doc) is not dict:
            return Rejected("not_object", f"top level is {type(doc).__name__}, not an object")
        type_ = doc.get("type")
        type_json = self._type_json.get(type_) if type(type_) is str else None
        if type_json is None:
            rejected = self._check_type(type_)
            if rejected is not None:
                return rejected
            assert isinstance(type_, str)
            type_json = self._remember_type(type_)
        updated = doc.get("updated")
        if type(updated) is not str:
            return Rejected("bad_updated", f"updated {_show(updated)} is not a date-time string")
        try:
            instant = instant_key(updated)
        except InvalidInstant as exc:
            return Rejected("bad_updated", f"updated: {exc}")
        valid = doc.get("valid")
        # type() first: a list or an object here is unhashable and must not reach the set.
        if valid is not None and (type(valid) is not str or valid not in self._valid_seen):
            if type(valid) is not str:
                return Rejected("bad_valid", f"valid {_show(valid)} is not a date-time string")
            try:
                instant_key(valid)
            except InvalidInstant as exc:
                return Rejected("bad_valid", f"valid: {exc}")
            # Validity horizons are usually coarse (whole seconds or minutes) and
            # shared by many messages: remember the good ones.
            if len(self._valid_seen) >= self._TYPE_CACHE_MAX:
                self._valid_seen.clear()
            self._valid_seen.add(valid)
        values = doc.get("values")
        if type(values) is not dict:
            return Rejected("bad_values", f"values {_show(values)} is not an object")
        return _new_accepted(Accepted, (type_, instant, updated, valid, values, type_json))

    def _check_type(self, type_: object) -> Rejected | None:
        if type(type_) is not str or self._type_match(type_) is None:
            return Rejected("bad_type", f"type {_show(type_)} does not match the type pattern")
        if self.layout.is_reserved(type_) or type_ in self._reserved_keys:
            return Rejected("reserved_type", f"type {type_!r} is in the reserved namespace")
        return None


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
