"""The queue loop's commands of every batch, on a connection held for them.

A batch costs the worker two or three commands (the take, the write, the blocking read
when the queue ran dry). Through redis-py's `execute_command` each checks a connection
out of the pool and back in, runs observability hooks and a reply callback, and a script
call adds a layer of its own: 77 us of the worker's CPU for a take of 8 entries, against
48 sent and read on a connection directly (a PING: 29 against 13; timed by hand on the
2-core host). `DirectConnection` keeps one pool connection and sends on it, with the
connection's retry policy and health checks, as redis-py's own commands (by default a
lost connection fails the command and the next one reconnects). A connection is not
thread-safe: one `DirectConnection` per thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError, ResponseError


class DirectConnection:
    def __init__(self, client: redis.Redis):
        self._pool = client.connection_pool
        self._connection: Any = None

    def execute(self, *args) -> Any:
        """The command's raw reply (RESP2: no redis-py reply callback)."""
        return self._with_retry(_send, args)

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
        return self._with_retry(_send_transaction, commands)

    def close(self) -> None:
        """Hands the connection back to the pool."""
        if self._connection is not None:
            self._pool.release(self._connection)
            self._connection = None

    def _with_retry(self, send, what) -> Any:
        """`send(connection, what)` on the held connection, under its retry policy."""
        if self._connection is None:
            self._connection = self._pool.get_connection()
        connection = self._connection
        return connection.retry.call_with_retry(
            lambda: send(connection, what), lambda _: connection.disconnect()
        )


def _send(connection, args: tuple) -> Any:
    connection.send_command(*args)
    return connection.read_response()


def _send_transaction(connection, commands: Sequence[Sequence]) -> list:
    # One buffer, packed by hiredis: the transaction's commands are small (bytes, str, int).
    packed = b"".join(map(hiredis.pack_command, [("MULTI",), *map(tuple, commands), ("EXEC",)]))
    connection.send_packed_command([packed])
    refused = None
    for _ in range(len(commands) + 2):  # OK, a QUEUED per command, then EXEC's list
        try:
            reply = connection.read_response()
        except ResponseError as error:  # read on: the replies behind it are still due
            refused = refused or error
    refused = refused or next((r for r in reply if isinstance(r, ResponseError)), None)
    if refused is not None:
        raise refused
    return reply
