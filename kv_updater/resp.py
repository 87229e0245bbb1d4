"""Raw RESP connections: what the hot paths use instead of redis-py's connections.

Two users: the subscription (kv_updater.subscriber, also the api_server hub) and
the commit link (``RespLink``, kv_updater.commit).  Both go below redis-py for
the same reason: its per-command machinery costs more than the work.  Measured
on the commit path at 1,000 messages/s (one commit per message, three replies
each): per reply an ``asyncio.timeout`` context and a parser call, per commit a
pool checkout with its lock, observability hooks and a ``wait_for`` around the
drain - about 440 Python calls per message, which made kv_updater the most
CPU-hungry process of the chain at low rates.  A ``RespLink`` writes the packed
pipeline and wakes its caller once, when the last reply is parsed.

Connection details (URL forms, ACL user and password, database, TLS, unix
sockets) still come from redis-py's own ``parse_url``; a redis-py client's
settings become a URL with ``url_of``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

P = TypeVar("P", bound=asyncio.Protocol)


# The TLS settings a URL's query string can carry (what parse_url reads back).
_URL_TLS_OPTIONS = (
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_ca_data",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
    "ssl_check_hostname",
    "ssl_min_version",
    "ssl_ciphers",
)


def url_of(client: aioredis.Redis) -> str:
    """A redis URL for a raw connection of its own, from a redis-py client's settings."""
    kw = client.connection_pool.connection_kwargs
    auth = ""
    if kw.get("password"):
        user = quote(str(kw.get("username") or ""), safe="")
        auth = f"{user}:{quote(str(kw['password']), safe='')}@"
    if kw.get("path"):
        return f"unix://{auth}{kw['path']}?db={kw.get('db', 0)}"
    where = f"{auth}{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
    if not issubclass(client.connection_pool.connection_class, SSLConnection):
        return f"redis://{where}"
    # A TLS client: the raw connection needs TLS too, with the same certificate settings.
    tls = {}
    for name in _URL_TLS_OPTIONS:
        value = kw.get(name)
        if isinstance(value, ssl.VerifyMode):  # spelled as redis-py's URLs take it
            tls[name] = value.name.removeprefix("CERT_").lower()
        elif isinstance(value, int):  # a bool, or an ssl.TLSVersion (parse_url: int)
            tls[name] = str(value) if isinstance(value, bool) else str(int(value))
        elif value is not None:
            tls[name] = str(value)
    return f"rediss://{where}" + (f"?{urlencode(tls)}" if tls else "")


def _keepalive(sock: Any) -> None:
    """TCP keepalive: a subscriber only reads, so a peer that vanished without a FIN
    (a dead node, a dropped NAT entry) would otherwise never be noticed.  About
    30 s idle + 3 probes 10 s apart."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _ssl_context(kwargs: dict[str, Any]) -> ssl.SSLContext:
    """redis-py's own context for a URL's TLS settings (certificates, hostname check,
    minimum version, ciphers...)."""
    tls = {k: v for k, v in kwargs.items() if k.startswith("ssl_")}
    return SSLConnection(**tls).ssl_context.get()


async def connect(
    url: str, protocol: Callable[[], P], connect_timeout: float
) -> tuple[asyncio.Transport, P, dict[str, Any]]:
    """Open a connection for ``url`` (TCP, TLS or unix socket), keepalive on; also
    returns the URL's parsed settings (password, username, db) for the handshake."""
    kwargs: dict[str, Any] = dict(parse_url(url))
    loop = asyncio.get_running_loop()
    connection_class = kwargs.get("connection_class")
    if connection_class is UnixDomainSocketConnection:
        opening = loop.create_unix_connection(protocol, kwargs["path"])
    else:
        ssl_ctx = _ssl_context(kwargs) if connection_class is SSLConnection else None
        opening = loop.create_connection(
            protocol, kwargs.get("host", "localhost"), kwargs.get("port", 6379), ssl=ssl_ctx
        )
    transport, proto = await asyncio.wait_for(opening, connect_timeout)
    _keepalive(transport.get_extra_info("socket"))
    return transport, proto, kwargs


def handshake(
    kwargs: dict[str, Any], client_name: str, *, select_db: bool
) -> list[tuple[str, ...]]:
    """The commands that open a connection for a URL's settings: AUTH when it has a
    password, SELECT of its database (not for pub/sub, which ignores databases),
    CLIENT SETNAME."""
    commands: list[tuple[str, ...]] = []
    password = kwargs.get("password")
    if password is not None:
        username = kwargs.get("username")
        commands.append(("AUTH", username, password) if username else ("AUTH", password))
    if select_db and kwargs.get("db"):
        commands.append(("SELECT", str(kwargs["db"])))
    commands.append(("CLIENT", "SETNAME", client_name))
    return commands


def reply_error(reply: hiredis.ReplyError) -> ResponseError:
    """redis-py's exception for an error reply (the committer tells NOSCRIPT apart)."""
    text = str(reply)
    return NoScriptError(text) if text.startswith("NOSCRIPT") else ResponseError(text)


class _Replies(asyncio.Protocol):
    """Parses replies as they arrive; wakes the waiting request once it has them all."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.replies: list[Any] = []
        self.wanted = 0
        self.waiter: asyncio.Future[None] | None = None
        self.lost: Exception | None = None

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        replies = self.replies
        try:
            while (reply := reader.gets()) is not False:
                replies.append(reply)
        except hiredis.ProtocolError as exc:  # not Redis on the other end
            self._lose(RedisConnectionError(f"not a Redis reply ({exc})"))
            return
        if len(replies) >= self.wanted:
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(RedisConnectionError(f"connection to Redis lost ({exc or 'closed by Redis'})"))

    def _lose(self, exc: Exception) -> None:
        if self.lost is None:
            self.lost = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class RespLink:
    """One connection for request/reply pipelines: write commands, await their replies.

    One request at a time (the committer commits one batch after the other; a
    lock keeps any other caller in line).  Anything that leaves replies unread -
    a timeout, a cancellation, a lost connection - closes the link, and the next
    request opens a new one: a reply can never be taken for another request's.
    A link found closed *before* a request is sent is reopened at once (nothing
    was sent, so nothing can be applied twice).
    """

    def __init__(
        self, url: str, *, client_name: str, timeout: float | None, connect_timeout: float = 5.0
    ) -> None:
        self.url = url
        self.client_name = client_name
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._transport: asyncio.Transport | None = None
        self._proto: _Replies | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def for_client(
        cls, client: aioredis.Redis, client_name: str, url: str | None = None
    ) -> RespLink:
        """A link to where a redis-py client connects (or to ``url``), with its timeouts."""
        kw = client.connection_pool.connection_kwargs
        return cls(
            url or url_of(client),
            client_name=client_name,
            timeout=kw.get("socket_timeout"),
            connect_timeout=kw.get("socket_connect_timeout") or 5.0,
        )

    @property
    def connected(self) -> bool:
        """True while the link's connection is open (as far as the event loop knows)."""
        return self._proto is not None and self._proto.lost is None

    async def request(self, packed: bytes, count: int) -> list[Any]:
        """Send ``count`` packed commands in one write; their replies in order, error
        replies as redis-py exceptions (not raised)."""
        async with self._lock:
            proto = self._proto
            if proto is None or proto.lost is not None:
                proto = await self._open()
            try:
                return await self._exchange(proto, packed, count)
            except BaseException:
                self.close()
                raise

    async def _exchange(self, proto: _Replies, packed: bytes, count: int) -> list[Any]:
        proto.wanted = count
        transport = self._transport
        assert transport is not None
        # The peer may have hung up between connect and this write (a Redis shutting
        # down for a restart accepts, then closes): uvloop raises RuntimeError on a
        # write to a closed transport, which must read as the connection error it is.
        if proto.lost is not None:
            raise proto.lost
        if transport.is_closing():
            raise RedisConnectionError("connection to Redis closed before the request")
        transport.write(packed)
        if len(proto.replies) < count and proto.lost is None:
            proto.waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self.timeout):
                    await proto.waiter
            finally:
                proto.waiter = None
        if len(proto.replies) < count:
            assert proto.lost is not None
            raise proto.lost
        replies, proto.replies = proto.replies, []
        return [reply_error(r) if type(r) is hiredis.ReplyError else r for r in replies]

    async def _open(self) -> _Replies:
        self.close()
        transport, proto, kwargs = await connect(self.url, _Replies, self.connect_timeout)
        self._transport, self._proto = transport, proto
        try:
            commands = handshake(kwargs, self.client_name, select_db=True)
            packed = b"".join(hiredis.pack_command(c) for c in commands)  # type: ignore[arg-type]
            async with asyncio.timeout(self.connect_timeout):
                replies = await self._exchange(proto, packed, len(commands))
            for command, reply in zip(commands, replies, strict=True):
                if isinstance(reply, Exception):
                    raise RedisConnectionError(f"{command[0]} failed: {reply}")
        except BaseException:
            self.close()
            raise
        return proto

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._transport = self._proto = None
