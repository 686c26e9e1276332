"""A frontend's link to Redis: one pipelined connection that every request shares.

Commands from any number of concurrent requests go out on one connection, written
together when they were issued in the same turn of the event loop, and Redis answers
them in order. So a frontend holds one connection however many requests are in flight
(one more for the news stream's blocking read, see `reply_reader`), nothing waits for
a free connection, and a command costs a few microseconds of Python where redis-py's
asyncio client, with its pool, locks and per-command timeouts, costs about a hundred
and forty. A cancelled caller's reply is read and dropped: the connection survives it.

Replies are hiredis's: bytes, int, None, lists; an error reply is a `ResponseError`
(raised by `execute`, returned in place by `pipeline`). A lost connection fails the
commands it carried with `ConnectionError`; one that answers nothing for
`reply_timeout_s` is closed and fails them with `TimeoutError` (redis-py's exceptions,
so callers catch the same errors whichever client they hold). The next command
connects again.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Command = Sequence[Any]  # ("SET", key, value, ...): str, bytes, int or float arguments

# What a rediss:// URL may say (redis-py's names): the CA bundle, certificate checks, and
# a client certificate for a Redis that requires one.
_TLS_OPTIONS = {
    "ssl_ca_certs",
    "ssl_cert_reqs",
    "ssl_check_hostname",
    "ssl_certfile",
    "ssl_keyfile",
}


class RedisLink:
    """A Redis client for asyncio code with one pipelined connection (see the module).

    `name` names the connection in Redis's CLIENT LIST. A link whose commands block
    (XREAD BLOCK) must be that caller's alone, with `reply_timeout_s` above the block."""

    def __init__(
        self,
        url: str,
        name: str,
        connect_timeout_s: float = 2.0,
        reply_timeout_s: float = 5.0,
    ):
        self.url = url
        self.name = name
        self.connect_timeout_s = connect_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self._options = _connection_options(url)
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task | None = None
        self._scripts: dict[str, bytes] = {}  # script -> its SHA1, once Redis has it
        self._closed = False

    async def execute(self, *command: Any) -> Any:
        """The reply to one command; raises `ResponseError` if Redis refuses it."""
        protocol = await self._connected()
        reply = await protocol.send([command], single=True)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Command]) -> list:
        """The replies to `commands`, sent together; a refused command's reply is its
        `ResponseError`."""
        if not commands:
            return []
        protocol = await self._connected()
        return await protocol.send(commands, single=False)

    async def evalsha(self, script: str, keys: Sequence, args: Sequence) -> Any:
        """Runs a Lua script by its SHA1, loading it the first time Redis lacks it."""
        sha = self._scripts.get(script)
        if sha is not None:
            try:
                return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
            except ResponseError as error:
                if not str(error).startswith("NOSCRIPT"):
                    raise
        self._scripts[script] = await self.execute("SCRIPT", "LOAD", script)
        return await self.execute("EVALSHA", self._scripts[script], len(keys), *keys, *args)

    async def aclose(self) -> None:
        """Closes the connection; commands in flight fail with ConnectionError."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._protocol is not None:
            self._protocol.close(RedisConnectionError("the Redis link was closed"))
            self._protocol = None

    async def _connected(self) -> _Protocol:
        if self._protocol is not None and self._protocol.open:
            return self._protocol
        if self._closed:
            raise RedisConnectionError("the Redis link was closed")
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        # shield: one caller's cancellation does not cancel everyone's connection
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Protocol:
        where = _where(self._options)
        protocol = None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                protocol = await self._open()
                replies = await protocol.send(self._handshake(), single=False)
        except (OSError, TimeoutError, RedisConnectionError) as error:
            if protocol is not None:
                protocol.close(RedisConnectionError("the connection's set-up failed"))
            why = error or f"no answer within {self.connect_timeout_s:g} s"
            raise RedisConnectionError(f"cannot connect to Redis at {where}: {why}") from None
        refused = next((r for r in replies if isinstance(r, ResponseError)), None)
        if refused is not None:
            protocol.close(RedisConnectionError("the connection's set-up was refused"))
            raise RedisConnectionError(f"Redis at {where} refused the connection: {refused}")
        self._protocol = protocol
        return protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        options = self._options
        if "path" in options:
            _, protocol = await loop.create_unix_connection(
                lambda: _Protocol(self.reply_timeout_s), options["path"]
            )
        else:
            _, protocol = await loop.create_connection(
                lambda: _Protocol(self.reply_timeout_s),
                options["host"],
                options["port"],
                ssl=options.get("ssl"),
            )
        return protocol

    def _handshake(self) -> list[Command]:
        commands: list[Command] = []
        options = self._options
        if options.get("password"):
            user = options.get("username")
            commands.append(
                ("AUTH", user, options["password"]) if user else ("AUTH", options["password"])
            )
        if options.get("db"):
            commands.append(("SELECT", options["db"]))
        commands.append(("CLIENT", "SETNAME", self.name))
        return commands


class _Protocol(asyncio.Protocol):
    """One connection: commands go out in order, replies come back in order."""

    def __init__(self, reply_timeout_s: float):
        self.reply_timeout_s = reply_timeout_s
        self.reader = hiredis.Reader(replyError=ResponseError, protocolError=RedisConnectionError)
        self.transport: asyncio.Transport | None = None
        self.open = False
        # What awaits replies, oldest first: [future, replies expected, replies so far, sent at]
        self.waiting: collections.deque[list] = collections.deque()
        self.outgoing: list[bytes] = []
        self.timer: asyncio.TimerHandle | None = None
        self.failure: Exception | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.open = True

    def send(self, commands: Sequence[Command], single: bool) -> asyncio.Future:
        """A future of the list of replies to `commands`, in order; with `single`,
        of the one command's reply."""
        loop = asyncio.get_running_loop()
        if not self.open:
            raise self.failure or RedisConnectionError("the Redis connection is closed")
        future = loop.create_future()
        self.waiting.append([future, len(commands), None if single else [], time.monotonic()])
        if not self.outgoing:
            loop.call_soon(self._flush)  # commands issued this turn go out in one write
        self.outgoing.extend(hiredis.pack_command(tuple(c)) for c in commands)
        if self.timer is None:
            self.timer = loop.call_later(self.reply_timeout_s, self._check_timeout)
        return future

    def _flush(self) -> None:
        if self.open and self.outgoing:
            self.transport.write(b"".join(self.outgoing))
        self.outgoing = []

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                self._answer(reply)
        except RedisConnectionError as error:  # not the Redis protocol: give up the link
            self.close(error)

    def _answer(self, reply: Any) -> None:
        waiter = self.waiting[0]
        future, expected, replies = waiter[0], waiter[1], waiter[2]
        if replies is None:
            self.waiting.popleft()
            if not future.done():
                future.set_result(reply)
            return
        replies.append(reply)
        if len(replies) == expected:
            self.waiting.popleft()
            if not future.done():
                future.set_result(replies)

    def _check_timeout(self) -> None:
        self.timer = None
        if not self.waiting or not self.open:
            return
        waited_s = time.monotonic() - self.waiting[0][3]
        if waited_s >= self.reply_timeout_s:
            self.close(RedisTimeoutError(f"Redis did not answer within {self.reply_timeout_s:g} s"))
            return
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.reply_timeout_s - waited_s, self._check_timeout)

    def close(self, error: Exception) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._fail(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(
            RedisConnectionError(f"lost the connection to Redis: {exc or 'closed by Redis'}")
        )

    def _fail(self, error: Exception) -> None:
        self.open = False
        self.failure = self.failure or error
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.waiting:
            future = self.waiting.popleft()[0]
            if not future.done():
                future.set_exception(self.failure)


def check_url(url: str) -> None:
    """ValueError naming what in a Redis URL the link cannot use."""
    _connection_options(url)


def _connection_options(url: str) -> dict:
    """host/port or path, username, password, db and, for rediss://, an SSL context."""
    options = parse_url(url)
    connection_class = options.pop("connection_class", None)
    tls = {name: options.pop(name) for name in _TLS_OPTIONS & options.keys()}
    unknown = options.keys() - {"host", "port", "path", "db", "username", "password"}
    if unknown:
        raise ValueError(f"Redis URL option(s) not supported here: {', '.join(sorted(unknown))}")
    if connection_class is UnixDomainSocketConnection:
        return options
    options.setdefault("host", "localhost")
    options.setdefault("port", 6379)
    if connection_class is SSLConnection:
        options["ssl"] = _ssl_context(**tls)
    return options


def _ssl_context(
    ssl_ca_certs=None,
    ssl_cert_reqs="required",
    ssl_check_hostname=True,
    ssl_certfile=None,
    ssl_keyfile=None,
):
    context = ssl.create_default_context(cafile=ssl_ca_certs)
    if ssl_certfile:
        context.load_cert_chain(ssl_certfile, ssl_keyfile)
    if str(ssl_cert_reqs).lower() == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.check_hostname = str(ssl_check_hostname).lower() not in ("false", "0", "no")
    return context


def _where(options: dict) -> str:
    return options.get("path") or f"{options['host']}:{options['port']}"
