"""Pure functions of the api_server: notification slicing and SSE framing."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from api_server.events import frame, parse_notification
from kv_updater.message import render_event

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(type_=st.text(min_size=1, max_size=40), seq=st.integers(1, 2**53),
       values=st.dictionaries(st.text(max_size=10), _values, max_size=4))
def test_type_and_seq_are_read_back_from_any_notification(
    type_: str, seq: int, values: dict[str, object]
) -> None:
    stored = orjson.dumps({"updated": "2026-12-03T12:00:00Z", "valid": None, "values": values})
    payload = render_event(orjson.dumps(type_), stored, seq)
    assert parse_notification(payload) == (type_, seq)


def test_what_is_not_a_commit_is_ignored() -> None:
    for junk in (b"", b"{", b"[]", b'{"type":1,"seq":2}', b'{"type":"a"}', b"\xff\xfe",
                 b'{"type":"a","seq":"3"}'):
        assert parse_notification(junk) is None, junk


def test_frames_are_one_event_each_even_with_line_breaks_in_data() -> None:
    assert frame(7, b'{"a":1}') == b'event: update\nid: 7\ndata: {"a":1}\n\n'
    framed = frame(8, b"one\r\ntwo\rthree\nfour")
    assert framed == b"event: update\nid: 8\ndata: one\ndata: two\ndata: three\ndata: four\n\n"
    assert framed.count(b"\n\n") == 1
