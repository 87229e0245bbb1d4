"""Pieces of the api_server on their own: notification slicing, SSE framing, and
the direct body writer on a real uvloop socket."""

from __future__ import annotations

import asyncio
import socket
import struct
from types import SimpleNamespace

import orjson
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from api_server.events import frame, parse_notification
from api_server.sse import _UvicornBody
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


def test_the_direct_writer_survives_a_reset_that_its_own_write_finds() -> None:
    """Prevents a vanished client from raising out of the hub's flush or keep-alive
    tick (which would end the subscription, or keep-alives for everyone).  A write
    that meets a TCP reset makes uvloop close the transport at once, while uvicorn
    only marks the response disconnected on the next loop iteration; in between,
    the writer must report the client unwritable and a write must not raise.
    Real sockets and a real uvloop transport; only uvicorn's cycle is a stand-in
    holding the attributes the writer reads."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[asyncio.Transport] = loop.create_future()

        class Server(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                accepted.set_result(transport)  # type: ignore[arg-type]

        server = await loop.create_server(Server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        transport = await asyncio.wait_for(accepted, 5)
        transport.pause_reading()  # the reset must be found by a write, not a read
        cycle = SimpleNamespace(
            flow=SimpleNamespace(write_paused=False), disconnected=False, transport=transport
        )
        body = _UvicornBody(cycle)
        body.write(b"event: update\n\n")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset
        deadline = loop.time() + 5
        while body.writable():  # the first write after the reset finds it
            assert loop.time() < deadline, "the reset was never noticed"
            body.write(b": keep-alive\n\n")
            await asyncio.sleep(0.01)  # the reset reaching the server's socket
        assert not cycle.disconnected  # uvicorn would not know yet
        body.write(b": keep-alive\n\n")  # must not raise
        server.close()

    uvloop.run(scenario())
