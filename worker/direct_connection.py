"""The queue loop's commands of every batch, on a connection held for them.

A batch costs the worker one or two round trips: its write, which carries the next step's
take along (`ride_along`: one round trip where two cost Redis and the worker a wakeup and
two system calls more), and the blocking read when the queue ran dry. Through redis-py's
`execute_command` each command checks a connection out of the pool and back in, runs
observability hooks and a reply callback, and a script call adds a layer of its own: 77 us
of the worker's CPU for a take of 8 entries, against 48 sent and read on a connection
directly (a PING: 29 against 13; timed by hand on the 2-core host). `DirectConnection` keeps
one pool connection and sends on it, with the connection's retry policy and health checks,
as redis-py's own commands (the worker's client reconnects and sends again, up to 3 times:
`worker.main.redis_client`). A connection is not thread-safe: one `DirectConnection` per thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import hiredis
import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError, ResponseError


class DirectConnection:
    def __init__(self, client: redis.Redis):
        self._pool = client.connection_pool
        self._connection: Any = None
        self._rider: tuple | None = None  # a command for the next round trip to carry
        self._rider_reply: Any = None

    def execute(self, *args) -> Any:
        """The command's raw reply (RESP2: no redis-py reply callback)."""
        return self._round_trip(lambda connection: connection.pack_command(*args), _read_one)

    def run_script(self, script: Script, keys: Sequence, args: Sequence) -> Any:
        """EVALSHA; loads the script first if Redis lost it (a restart, SCRIPT FLUSH)."""
        try:
            return self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.execute("SCRIPT", "LOAD", script.script)
            return self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    def transaction(self, commands: Sequence[Sequence]) -> list:
        """EXEC's replies to `commands` (bytes, str or int arguments), run as one
        MULTI/EXEC in one round trip; raises the first command Redis refused (a refused
        command does not undo the others)."""

        def pack(_connection) -> list[bytes]:
            # One buffer, packed by hiredis: the commands are small (bytes, str, int).
            framed = [("MULTI",), *map(tuple, commands), ("EXEC",)]
            return [b"".join(map(hiredis.pack_command, framed))]

        return self._round_trip(pack, lambda connection: _read_exec(connection, len(commands)))

    def ride_along(self, *args) -> None:
        """Has the next round trip send command `args` after its own, in the same write:
        two round trips' worth of work for one. `rider_reply` takes its reply."""
        self._rider = args
        self._rider_reply = None

    def rider_reply(self) -> Any:
        """The reply to the command that rode along (a ResponseError if Redis refused
        it), or None if it was not sent (no round trip since, or that one failed; it
        will not be sent later)."""
        reply, self._rider, self._rider_reply = self._rider_reply, None, None
        return reply

    def close(self) -> None:
        """Hands the connection back to the pool."""
        if self._connection is not None:
            self._pool.release(self._connection)
            self._connection = None

    def _round_trip(self, pack: Callable, read: Callable) -> Any:
        """Sends `pack(connection)` and the rider, if any, on the held connection, under
        its retry policy; returns `read(connection)`, having read the rider's reply too
        (whatever `read` raised: the connection stays in step)."""
        if self._connection is None:
            self._connection = self._pool.get_connection()
        connection = self._connection
        rider, self._rider = self._rider, None

        def attempt() -> Any:
            chunks = list(pack(connection))
            if rider is not None:
                chunks += connection.pack_command(*rider)
            connection.send_packed_command(chunks)
            try:
                return read(connection)
            finally:
                if rider is not None:
                    self._rider_reply = _reply_or_error(connection)

        return connection.retry.call_with_retry(attempt, lambda _: connection.disconnect())


def _read_one(connection) -> Any:
    return connection.read_response()


def _reply_or_error(connection) -> Any:
    try:
        return connection.read_response()
    except ResponseError as error:
        return error


def _read_exec(connection, commands: int) -> list:
    refused = None
    for _ in range(commands + 2):  # OK, a QUEUED per command, then EXEC's list
        reply = _reply_or_error(connection)  # read on past a refusal: the rest are due
        if isinstance(reply, ResponseError):
            refused = refused or reply
    if refused is None:
        refused = next((r for r in reply if isinstance(r, ResponseError)), None)
    if refused is not None:
        raise refused
    return reply
