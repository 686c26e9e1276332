"""One reader for every reply stream a frontend process waits on.

Workers write a request's results and, in the same Lua step, note the request's id on
the news stream of the frontend process that queued it (`QueueItem.news_stream`). An
item whose whole output is small rides inside that news entry; larger ones go to the
request's reply stream. Here one task blocks on the news stream, on a connection of its
own, however many requests are in flight, and hands inline entries to the waiting
requests; another fetches every reply stream with news in one XREAD. So a process holds
two connections for all its streams, and one round trip serves many requests.

Pacing is as before: a request holds at most one batch (`FETCH_COUNT` entries) that
its client has not taken, and its relayed entries are trimmed from Redis when the
client asks for the next batch; a worker waits while a reply stream is long, so a
slow client slows only its own request. A request that hears nothing for a while
fetches anyway (`Subscription.next`), so a lost note (an older worker, a reconnect)
costs latency, never results.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from esm2_service import queue
from esm2_service.server.errors import BackendUnavailable
from esm2_service.server.redis_link import RedisLink

log = logging.getLogger(__name__)

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
# Also a command Redis refused: the reader's loops survive anything Redis answers.
_ANY_REDIS_ERROR = (RedisError, OSError)

# Entries per stream per fetch. Chunks are up to ~4 MiB, so this bounds what the
# frontend holds for one request.
FETCH_COUNT = 8
# News entries read per blocking read: each is one worker write, naming its requests and
# carrying their small results (up to 64 KiB an item), so this bounds one read's size.
NEWS_COUNT = 64
_RETRY_S = 0.5
# A round trip with only cleanup to do (trims, finished requests' keys) waits this long for
# company: under load, one round trip then drops many requests' keys instead of one's.
CLEANUP_DELAY_S = 0.005
# Round trips that try to drop a finished request's keys before leaving them to expire.
_FORGET_ATTEMPTS = 20
_CLOSE_TIMEOUT_S = 5.0


def news_stream_name() -> str:
    """A new frontend process's news stream."""
    return f"{queue.PREFIX}:news:{uuid.uuid4().hex}"


class Subscription:
    """One request's view of its reply stream."""

    def __init__(self, reader: ReplyReader, request_id: str):
        self.reader = reader
        self.request_id = request_id
        self.stream = queue.reply_stream(request_id)
        self.last_id = b"0-0"  # the last entry fetched
        self.relayed_id: bytes | None = None  # the last entry handed out, trimmed later
        self.batch: list | None = None  # fetched, not yet handed out
        self.inline: list = []  # entries that came with the news, not yet handed out
        self.error: Exception | None = None
        self.news = False  # written to since the last fetch
        self.ready = asyncio.Event()

    async def next(self, timeout_s: float) -> list:
        """The next entries ([(id, fields)]) of the stream, or [] after `timeout_s` of
        nothing. Trims what the previous call returned (the caller has relayed it).
        After a quiet wait, the next round trip fetches anyway and checks that Redis
        still knows the request (else BackendUnavailable: it restarted or evicted it).
        Entries that came inline with the news go first: an item's entries all come
        one way, and an item in the reply stream is noted after any inline entry of
        its request written before it."""
        if self.relayed_id is not None:
            self.reader.trim_soon(self.stream, self.relayed_id)
            self.relayed_id = None
        if not self.ready.is_set():
            self.reader.fetch_soon(self)
            try:
                async with asyncio.timeout(timeout_s):  # no task of its own, unlike wait_for
                    await self.ready.wait()
            except TimeoutError:
                self.reader.fetch_soon(self, quiet=True)
                return []
        if self.error is not None:
            raise self.error
        if self.inline:
            entries, self.inline = self.inline, []
        else:
            entries, self.batch = self.batch, None
            self.relayed_id = entries[-1][0]
        if self.batch is None and not self.inline:
            self.ready.clear()
        return entries

    def deliver(self, entries: list) -> None:
        self.last_id = entries[-1][0]
        # A full batch may have left more behind; fetch again once this one is taken.
        self.news = self.news or len(entries) >= FETCH_COUNT
        self.batch = entries
        self.ready.set()

    def deliver_inline(self, entry: tuple) -> None:
        self.inline.append(entry)
        self.ready.set()

    def fail(self, error: Exception) -> None:
        self.error = error
        self.ready.set()


class ReplyReader:
    """Reads the reply streams of every request this process serves.

    `redis`: the process's shared link (fetches, trims); `listen`: a link of its own
    for the blocking read of the news stream."""

    def __init__(
        self,
        redis: RedisLink,
        listen: RedisLink,
        block_ms: int = 1000,
        cancel_ttl_s: int = 600,
    ):
        self.redis = redis
        self.listen = listen
        self.block_ms = block_ms
        self.cancel_ttl_s = cancel_ttl_s  # how long workers see a request as cancelled
        self.news_stream = news_stream_name()
        self._subscriptions: dict[str, Subscription] = {}
        self._to_fetch: set[Subscription] = set()
        self._to_trim: dict[str, bytes] = {}
        self._to_check: set[Subscription] = set()
        # Requests done with: request id -> (cancelled, resolved after the round trip).
        self._to_forget: dict[str, tuple[bool, asyncio.Future]] = {}
        self._forget_attempts: dict[str, int] = {}  # of those refused so far
        self._work = asyncio.Event()  # something to do in the next round trip
        self._urgent = asyncio.Event()  # something that must not wait: fetches, cancels
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._listen()), loop.create_task(self._fetch())]

    async def aclose(self) -> None:
        """Stops reading; what was asked of Redis meanwhile is still done."""
        self._closing = True  # redis-py may swallow a cancellation: the loops check this too
        self._soon(urgent=True)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=_CLOSE_TIMEOUT_S)
        self._tasks = []
        with contextlib.suppress(*REDIS_ERRORS):
            await self._round_trip(self._to_trim, [], [])
            await self.redis.execute("DEL", self.news_stream)

    def forget(self, request_id: str, cancelled: bool) -> asyncio.Future:
        """Drops the request's reply stream and marker in the next round trip (and tells
        workers to skip its items, if `cancelled`); the future resolves after it."""
        self.unsubscribe(request_id)
        self.start()
        if request_id not in self._to_forget:
            self._to_forget[request_id] = (cancelled, asyncio.get_running_loop().create_future())
        self._soon(urgent=cancelled)  # workers learn of a cancellation at once
        return self._to_forget[request_id][1]

    def subscribe(self, request_id: str) -> Subscription:
        """The request's subscription, created on first use: before its items are
        queued, so no news of it is missed."""
        self.start()
        subscription = self._subscriptions.get(request_id)
        if subscription is None:
            subscription = self._subscriptions[request_id] = Subscription(self, request_id)
        return subscription

    def subscribed(self, request_id: str) -> bool:
        return request_id in self._subscriptions

    def unsubscribe(self, request_id: str) -> None:
        subscription = self._subscriptions.pop(request_id, None)
        if subscription is not None:
            self._to_fetch.discard(subscription)
            self._to_check.discard(subscription)
            self._to_trim.pop(subscription.stream, None)

    def fetch_soon(self, subscription: Subscription, quiet: bool = False) -> None:
        """Fetches the subscription's new entries in the next round trip if it has news;
        `quiet`: it heard nothing for a while, so fetch anyway and check its request."""
        if quiet:
            self._to_check.add(subscription)
        if subscription.news or quiet:
            self._to_fetch.add(subscription)
            self._soon(urgent=True)

    def trim_soon(self, stream: str, relayed_id: bytes) -> None:
        self._to_trim[stream] = relayed_id
        self._soon(urgent=False)

    def _soon(self, urgent: bool) -> None:
        self._work.set()
        if urgent:
            self._urgent.set()

    async def _listen(self) -> None:
        last_id = b"0-0"
        while not self._closing:
            try:
                reply = await self.listen.execute(
                    "XREAD", "COUNT", NEWS_COUNT, "BLOCK", self.block_ms,
                    "STREAMS", self.news_stream, last_id,
                )  # fmt: skip
            except _ANY_REDIS_ERROR as error:
                if self._closing:
                    return
                log.warning("reading the news of reply streams failed (retrying): %s", error)
                await asyncio.sleep(_RETRY_S)
                continue
            entries = reply[0][1] if reply else []
            for entry_id, fields in entries:
                self._read_news(entry_id, _fields(fields))
            if entries:
                last_id = entries[-1][0]
                self.trim_soon(self.news_stream, last_id)
                await asyncio.sleep(0)  # the requests served go first; then the next read

    def _read_news(self, entry_id: bytes, fields: dict) -> None:
        for name, value in fields.items():
            if name == queue.NEWS_FIELD:
                for request_id in value.split():
                    self._note(request_id.decode())
                continue
            inline = queue.parse_inline_field(name)
            subscription = inline and self._subscriptions.get(inline[0])
            if subscription:
                _, field, piece = inline
                entry = (entry_id, {field: value, queue.PIECE_FIELD: piece})
                subscription.deliver_inline(entry)

    def _note(self, request_id: str) -> None:
        subscription = self._subscriptions.get(request_id)
        if subscription is None:
            return  # finished or cancelled meanwhile
        subscription.news = True
        if subscription.batch is None:
            self.fetch_soon(subscription)

    async def _fetch(self) -> None:
        while not self._closing:
            await self._work.wait()
            if not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLEANUP_DELAY_S):
                        await self._urgent.wait()
            self._work.clear()
            self._urgent.clear()
            trims, self._to_trim = self._to_trim, {}
            checks, self._to_check = list(self._to_check), set()
            fetches = [s for s in self._to_fetch if s.batch is None and s.error is None]
            self._to_fetch = set()
            for subscription in fetches:
                subscription.news = False
            try:
                await self._round_trip(trims, checks, fetches)
            except _ANY_REDIS_ERROR as error:
                failure = BackendUnavailable(f"lost the queue (Redis) while relaying: {error}")
                for subscription in {*fetches, *checks}:
                    subscription.fail(failure)

    async def _round_trip(
        self, trims: dict[str, bytes], checks: list[Subscription], fetches: list[Subscription]
    ) -> None:
        """Trims what was relayed, drops what was finished, checks that Redis still
        knows the quiet requests, and fetches what is new: one round trip for all. A
        command Redis refuses fails only what it was for; a forget is retried."""
        forgets, self._to_forget = self._to_forget, {}
        try:
            replies = await self._send(trims, forgets, checks, fetches)
        except _ANY_REDIS_ERROR:
            self._retry(forgets)
            raise
        finally:
            for _, done in forgets.values():
                if not done.done():
                    done.set_result(None)
        trimmed, replies = replies[: len(trims)], replies[len(trims) :]
        if any(isinstance(reply, Exception) for reply in trimmed):
            log.warning("Redis refused to trim relayed entries: %s", _first_error(trimmed))
        self._forgotten(forgets, replies)
        fetched = replies.pop() if fetches else []
        if isinstance(fetched, Exception):
            for subscription in fetches:
                subscription.fail(BackendUnavailable(f"Redis refused a read: {fetched}"))
            fetched = []
        self._checked(checks, replies[len(replies) - len(checks) :])
        self._deliver(fetches, fetched or [])

    async def _send(self, trims, forgets, checks, fetches) -> list:
        """The round trip's replies, in order; a refused command's reply is its error."""
        commands: list[tuple] = [
            ("XTRIM", stream, "MINID", _after(relayed_id)) for stream, relayed_id in trims.items()
        ]
        for request_id, (cancelled, _) in forgets.items():
            if cancelled:
                commands.append(("SET", queue.cancel_key(request_id), 1, "EX", self.cancel_ttl_s))
            commands.append(("DEL", queue.reply_stream(request_id), queue.request_key(request_id)))
        for subscription in checks:
            commands.append(("EXISTS", queue.request_key(subscription.request_id)))
        if fetches:
            streams = [s.stream for s in fetches]
            ids = [s.last_id for s in fetches]
            commands.append(("XREAD", "COUNT", FETCH_COUNT, "STREAMS", *streams, *ids))
        replies = await self.redis.pipeline(commands)
        if fetches and isinstance(replies[-1], list):
            replies[-1] = [(stream, _entries(entries)) for stream, entries in replies[-1]]
        return replies

    def _forgotten(self, forgets: dict[str, tuple[bool, asyncio.Future]], replies: list) -> None:
        """Takes the forgets' replies off the front of `replies`; retries refused ones."""
        refused = {}
        for request_id, (cancelled, done) in forgets.items():
            count = 2 if cancelled else 1
            mine, replies[:count] = replies[:count], []
            if any(isinstance(reply, Exception) for reply in mine):
                refused[request_id] = (cancelled, done)
                log.warning("Redis refused to drop request %s: %s", request_id, _first_error(mine))
            else:
                self._forget_attempts.pop(request_id, None)
        self._retry(refused)

    def _retry(self, forgets: dict[str, tuple[bool, asyncio.Future]]) -> None:
        """Forgets again in a later round trip, up to `_FORGET_ATTEMPTS` times; then the
        request's reply stream is left to expire."""
        for request_id, (cancelled, _) in forgets.items():
            attempts = self._forget_attempts.get(request_id, 0) + 1
            if attempts > _FORGET_ATTEMPTS or self._closing:
                self._forget_attempts.pop(request_id, None)
                log.warning("gave up dropping request %s: its reply stream expires", request_id)
                continue
            self._forget_attempts[request_id] = attempts
            if request_id not in self._to_forget:
                future = asyncio.get_running_loop().create_future()
                self._to_forget[request_id] = (cancelled, future)
        if forgets and not self._closing:
            asyncio.get_running_loop().call_later(_RETRY_S, self._work.set)

    @staticmethod
    def _checked(checks: list[Subscription], exists: list[int]) -> None:
        for subscription, known in zip(checks, exists, strict=True):
            if isinstance(known, Exception):
                subscription.fail(BackendUnavailable(f"Redis refused a check: {known}"))
            elif not known:
                subscription.fail(
                    BackendUnavailable(
                        "the queue lost this request (Redis restarted or evicted it); "
                        "retry the request"
                    )
                )

    def _deliver(self, fetches: list[Subscription], fetched: list) -> None:
        by_stream = {s.stream.encode(): s for s in fetches}
        for stream, entries in fetched:
            subscription = by_stream[stream]
            if self._subscriptions.get(subscription.request_id) is subscription:
                subscription.deliver(entries)


def _entries(entries: list) -> list[tuple[bytes, dict]]:
    """A stream's entries, sent as [id, [field, value, ...]], as (id, {field: value})."""
    return [(entry_id, _fields(fields)) for entry_id, fields in entries]


def _fields(flat: list) -> dict:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _first_error(replies: list) -> Exception | None:
    return next((reply for reply in replies if isinstance(reply, Exception)), None)


def _after(entry_id: bytes) -> str:
    """The smallest stream id after `entry_id`: XTRIM MINID keeps it and what follows."""
    millis, sequence = entry_id.split(b"-")
    return f"{int(millis)}-{int(sequence) + 1}"
