"""SSE framing of commits, done once per commit and shared by every client.

A commit notification (kv_updater.message.render_event) is already the SSE
``data``; the hub only needs its ``type`` and ``seq`` to route and conflate it.
Both sit at fixed places - ``{"type":<json string>,`` at the front and
``,"seq":N}`` at the end - so they are sliced out instead of parsing a value that
may be large; anything unusual (an escaped type name) falls back to a full parse.
"""

from __future__ import annotations

from typing import NamedTuple

import orjson

_HEAD = b'{"type":"'
_SEQ = b',"seq":'


class Event(NamedTuple):
    """One commit, framed for the wire.  Shared by all clients: never copied."""

    type: str
    seq: int
    frame: bytes
    """``event: update``, ``id: <seq>``, ``data: <commit JSON>`` and the blank line."""


def frame(seq: int, data: bytes) -> bytes:
    """The SSE bytes of one commit.

    Commit JSON is compact (no raw line breaks); a value planted by someone else
    at an indexed key might hold some, and is then sent as several ``data:``
    lines, which EventSource joins back with ``\\n``.
    """
    if b"\n" in data or b"\r" in data:
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        data = b"\ndata: ".join(lines)
    return b"event: update\nid: %d\ndata: %s\n\n" % (seq, data)


def parse_notification(payload: bytes) -> tuple[str, int] | None:
    """(type, seq) of a commit notification, or None when it is not one."""
    if payload.startswith(_HEAD) and payload.endswith(b"}"):
        end = payload.find(b'"', len(_HEAD))
        cut = payload.rfind(_SEQ)
        digits = payload[cut + len(_SEQ) : -1] if cut > 0 else b""
        if end > 0 and digits.isdigit():
            name = payload[len(_HEAD) : end]
            if b"\\" not in name:
                try:
                    return name.decode(), int(digits)
                except UnicodeDecodeError:
                    return None
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    type_, seq = doc.get("type"), doc.get("seq")
    if type(type_) is not str or type(seq) is not int:
        return None
    return type_, seq
