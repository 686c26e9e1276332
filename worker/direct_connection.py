"""The queue loop's commands of every batch, on a connection held for them.

A batch costs the worker two or three commands (the take, the write, the blocking read
when the queue ran dry). Through redis-py's `execute_command` each checks a connection
out of the pool and back in, runs observability hooks and a reply callback, and a script
call adds a layer of its own: 77 us of the worker's CPU for a take of 8 entries, against
48 sent and read on a connection directly (a PING: 29 against 13; timed by hand on the
2-core host). `DirectConnection` keeps one pool connection and sends on it, with the
client's own retry policy (a connection error reconnects and sends again, as redis-py
does) and health checks. A connection is not thread-safe: one `DirectConnection` per
thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError


class DirectConnection:
    def __init__(self, client: redis.Redis):
        self._pool = client.connection_pool
        self._connection: Any = None

    def execute(self, *args) -> Any:
        """The command's raw reply (RESP2: no redis-py reply callback)."""
        if self._connection is None:
            self._connection = self._pool.get_connection()
        connection = self._connection
        return connection.retry.call_with_retry(
            lambda: _send(connection, args), lambda _: connection.disconnect()
        )

    def run_script(self, script: Script, keys: Sequence, args: Sequence) -> Any:
        """EVALSHA; loads the script first if Redis lost it (a restart, SCRIPT FLUSH)."""
        try:
            return self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.execute("SCRIPT", "LOAD", script.script)
            return self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    def close(self) -> None:
        """Hands the connection back to the pool."""
        if self._connection is not None:
            self._pool.release(self._connection)
            self._connection = None


def _send(connection, args: tuple) -> Any:
    connection.send_command(*args)
    return connection.read_response()
