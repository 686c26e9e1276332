"""The worker's queue loop: take entries, run them, write results, then acknowledge.

Knows Redis, not torch: the model sits behind a `Runner`. An entry is acknowledged
(and deleted) only after its results and completion are written, so a worker that
dies mid-batch loses nothing: its entries stay pending and another worker claims
them (XAUTOCLAIM) once they have been idle `claim_idle_s`. A live worker touches
its in-flight entries every heartbeat so they are never claimed from under it.
An entry delivered more than `max_deliveries` times is moved to the dead-letter
stream and its request gets an error, instead of crashing workers forever.

Order: items wait in lanes by length (`queue.QUEUE_LANES`). A worker takes from the
shortest lane first and never mixes lanes in a batch, so a short item waits for at
most the batch in progress, however deep the backlog of long ones. So that a steady
stream of short items cannot starve long ones, a lane whose oldest item has waited
more than `lane_max_wait_s` gets every other batch.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import redis
from google.protobuf.message import DecodeError

from esm2_service import queue
from esm2_service.alphabet import token_ids
from esm2_service.esm2.internal.v1 import queue_pb2 as qpb
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.worker.batching import plan_batches
from esm2_service.worker.direct_connection import DirectConnection
from esm2_service.worker.metrics import WorkerMetrics, abandoned_outcome
from esm2_service.worker.replies import EntryRef, ReplyWriter, group_by_stream, item_key
from esm2_service.worker.settings import READ_SIZE, WorkerSettings
from esm2_service.worker.work import Runner, TensorOutput, WorkItem
from esm2_service.worker.write_behind import WriteBehind

log = logging.getLogger(__name__)

_CLAIM_EVERY_S = 1.0
_LANE_OF_STREAM = {name.encode(): lane for lane, name in enumerate(queue.QUEUE_LANES)}
# The fewest tokens an item of each lane has: what a read adds at least to a pass.
_LANE_FLOOR_TOKENS = (1, *(limit + 1 for limit in queue.LANE_MAX_TOKENS))
# Items queued at least this long are checked for cancellation before they run. Fresher
# ones run without the round trip (a client that left within a second of asking); the
# write step drops a cancelled request's results either way.
_CHECK_CANCELLED_AFTER_S = 1.0

# Takes up to ARGV[3] new entries for consumer ARGV[2] of group ARGV[1] from the lanes
# (KEYS, shortest first) without blocking. When ARGV[4] is "1", a lane whose next entry
# has waited more than ARGV[5] ms goes first. Returns how long the longest-waiting next
# entry has waited (ms; -1 when not looked for or none), then {lane number, entries} pairs.
_TAKE_SCRIPT = """
for _, lane in ipairs(KEYS) do
  if redis.call('EXISTS', lane) == 0 then
    return redis.error_reply('NOGROUP the queue lane ' .. lane .. ' is missing')
  end
end
local function waited_ms(lane, now_ms)
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', lane)) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    if info['name'] == ARGV[1] then
      local next = redis.call('XRANGE', lane, '(' .. info['last-delivered-id'], '+', 'COUNT', 1)
      if #next == 0 then return -1 end
      return now_ms - tonumber(string.match(next[1][1], '^(%d+)'))
    end
  end
  return -1
end
local order = {}
local longest = -1
if ARGV[4] == '1' then
  local time = redis.call('TIME')
  local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local oldest = nil
  for i, lane in ipairs(KEYS) do
    local waited = waited_ms(lane, now_ms)
    if waited > longest then oldest, longest = i, waited end
  end
  if longest > tonumber(ARGV[5]) then table.insert(order, oldest) end
end
for i = 1, #KEYS do
  if i ~= order[1] then table.insert(order, i) end
end
local room = tonumber(ARGV[3])
local taken = {longest}
for _, i in ipairs(order) do
  if room <= 0 then break end
  -- An empty lane has nothing to take: XLEN says so for a fraction of XREADGROUP's cost.
  local reply = redis.call('XLEN', KEYS[i]) > 0 and
    redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', room, 'STREAMS', KEYS[i], '>')
  if reply then
    local entries = reply[1][2]
    table.insert(taken, i - 1)
    table.insert(taken, entries)
    room = room - #entries
  end
end
return taken
"""


@dataclass(frozen=True)
class Job:
    lane: int  # index into queue.QUEUE_LANES
    entry_id: bytes
    item: qpb.QueueItem
    work: WorkItem

    @property
    def ref(self) -> EntryRef:
        return queue.QUEUE_LANES[self.lane], self.entry_id

    def waited_s(self) -> float:
        return time.time() - self.item.enqueued_unix_s


class QueueWorker:
    def __init__(
        self,
        client: redis.Redis,
        runner: Runner,
        settings: WorkerSettings,
        model: pb.ModelInfo,
        metrics: WorkerMetrics | None = None,
    ):
        self.redis = client
        self.metrics = metrics or WorkerMetrics()
        self.runner = runner
        self.settings = settings
        self.model = model
        self.direct = DirectConnection(client)  # this thread's: the take, the blocking read
        self.replies = self._reply_writer(self.direct)
        # GPU workers: batches' replies are written while the next batch computes, by a
        # writer of their own (this one writes for the loop: skipped items, failures).
        self.write_behind = WriteBehind() if settings.writes_behind else None
        self.behind_replies = (
            self._reply_writer(DirectConnection(client)) if settings.writes_behind else None
        )
        self.in_flight: set[EntryRef] = set()
        self.held: list[Job] = []
        self.progress_at = time.monotonic()  # the loop's last sign of life
        self._last_claim = 0.0
        self._take = client.register_script(_TAKE_SCRIPT)
        # The next step's first take, sent along with the last batch's write (see _finish).
        self._prefetched: list[tuple[int, bytes, dict]] | None = None
        self._may_promote = True  # False right after a batch of a lane that waited too long
        self._next_wait_check = 0.0  # monotonic s; see _read_new
        self.stats = {"items": 0, "batches": 0}

    def _reply_writer(self, direct: DirectConnection) -> ReplyWriter:
        return ReplyWriter(
            self.redis,
            direct,
            self.model,
            result_ttl_s=self.settings.result_ttl_s,
            max_reply_chunks=self.settings.max_reply_chunks,
            reader_stall_s=self.settings.reader_stall_s,
        )

    def run(self, stop: threading.Event) -> None:
        """Serves the queue until `stop` is set; the batch in hand is finished first."""
        heartbeat = threading.Thread(target=self._heartbeat_loop, args=(stop,), daemon=True)
        heartbeat.start()
        while not stop.is_set():
            try:
                self.step()
            except redis.ResponseError as error:
                if "NOGROUP" not in str(error):
                    raise
                log.warning("the queue's consumer group is gone (Redis restarted?); recreating it")
                ensure_group(self.redis)
            except redis.RedisError as error:
                log.warning("Redis error in the queue loop, retrying in 1 s: %s", error)
                stop.wait(1.0)
        if self.write_behind is not None:
            self.write_behind.close()
            self.behind_replies.direct.close()
        prefetched, self._prefetched = self._prefetched or [], None
        admitted = itertools.starmap(self._admit, prefetched)
        self._hand_back(self.held + [job for job in admitted if job])
        self.direct.close()
        heartbeat.join(timeout=self.settings.heartbeat_s + 1)
        self._sign_off()

    def step(self) -> int:
        """Runs one packed batch, planned from the jobs held over from the last step and
        the entries taken now (up to `batch_size` in all). Jobs left out of it are held
        for the next step, where newly queued shorter items can overtake them. Returns
        how many entries it took from Redis."""
        self.progress_at = time.monotonic()
        room = self.settings.batch_size - len(self.held)
        entries, prefetched, self._prefetched = [], self._prefetched, None
        if prefetched:  # taken for this step's room (`held` is unchanged)
            entries = self._take_new(room, first_read=prefetched)
        elif room > 0:
            entries = self._claim_stale(room)
            if not entries and prefetched is None:  # an empty one was this step's take
                entries = self._take_new(room)
        if room > 0 and not entries and not self.held:
            entries = self._wait_for_new(room)
        admitted = itertools.starmap(self._admit, entries)
        held = [job for job in self.held if not self._skipped(job)]
        jobs = held + [job for job in admitted if job]
        if not jobs:
            return len(entries)
        promoted = self._promoted_lane(jobs)
        first, *rest = plan_batches(
            [len(job.work.token_ids) for job in jobs],
            [job.lane for job in jobs],
            self.settings.max_batch_tokens,
            first_lane=promoted,
        )
        self.held = [jobs[i] for batch in rest for i in batch]
        self._may_promote = promoted is None or jobs[first[0]].lane != promoted
        self._run_batch([jobs[i] for i in first])
        return len(entries)

    def _promoted_lane(self, jobs: Sequence[Job]) -> int | None:
        """The lane of the job that waited longest, if it waited too long and the last
        batch was not promoted: every other batch at most, so short items still wait
        for one batch at most."""
        if not self._may_promote:
            return None
        oldest = max(jobs, key=Job.waited_s)
        return oldest.lane if oldest.waited_s() > self.settings.lane_max_wait_s else None

    def _take_new(self, room: int, first_read: list | None = None) -> list[tuple[int, bytes, dict]]:
        """New entries, up to `room`, in reads of at most READ_SIZE (shortest lane first;
        a lane that waited too long first, when allowed), without blocking; the first
        read is `first_read` when it was made already. Reading stops early when a read
        comes back short or the entries fill a pass's tokens."""
        entries: list[tuple[int, bytes, dict]] = []
        tokens = 0
        read = first_read
        while read is not None or room > 0 and tokens < self.settings.max_batch_tokens:
            if read is None:
                read = self._read_new(min(room, READ_SIZE))
            entries += read
            room -= len(read)
            tokens += sum(_LANE_FLOOR_TOKENS[lane] for lane, _, _ in read)
            if len(read) < READ_SIZE:
                break
            read = None
        return entries

    def _read_new(self, room: int) -> list[tuple[int, bytes, dict]]:
        """Takes up to `room` entries."""
        args, check_waits = self._take_args(room)
        return self._taken(self.direct.run_script(self._take, queue.QUEUE_LANES, args), check_waits)

    def _take_args(self, room: int) -> tuple[list, bool]:
        """The take script's arguments for up to `room` entries, and whether they ask
        if a lane waited too long. That is asked only when one could have by now: no
        entry can pass `lane_max_wait_s` before the one that had waited longest at the
        last asking (the asking costs Redis more than the read)."""
        check_waits = self._may_promote and time.monotonic() >= self._next_wait_check
        limit_ms = int(self.settings.lane_max_wait_s * 1000)
        args = [queue.WORKER_GROUP, self.settings.worker_id, room, int(check_waits), limit_ms]
        return args, check_waits

    def _taken(self, reply: list, check_waits: bool) -> list[tuple[int, bytes, dict]]:
        """The entries of the take script's reply."""
        longest_ms, *taken = reply
        if check_waits:
            limit_s = self.settings.lane_max_wait_s
            self._next_wait_check = time.monotonic() + limit_s - max(longest_ms, 0) / 1000
        return [
            (lane, entry_id, _field_dict(fields))
            for lane, entries in zip(taken[::2], taken[1::2], strict=True)
            for entry_id, fields in entries
        ]

    def _wait_for_new(self, room: int) -> list[tuple[int, bytes, dict]]:
        """Blocks until entries arrive in any lane (up to `room` per lane)."""
        lanes = queue.QUEUE_LANES
        reply = self.direct.execute(
            *("XREADGROUP", "GROUP", queue.WORKER_GROUP, self.settings.worker_id),
            *("COUNT", min(room, READ_SIZE), "BLOCK", self.settings.block_ms),
            *("STREAMS", *lanes, *[">"] * len(lanes)),
        )
        by_stream = reply.items() if isinstance(reply, dict) else reply or ()  # RESP3, RESP2
        return [
            (_LANE_OF_STREAM[_as_bytes(stream)], entry_id, _field_dict(fields))
            for stream, entries in by_stream
            for entry_id, fields in entries
        ]

    def _claim_stale(self, room: int) -> list[tuple[int, bytes, dict]]:
        """Entries whose worker went silent, with their delivery counts checked."""
        now = time.monotonic()
        if now - self._last_claim < _CLAIM_EVERY_S:
            return []
        self._last_claim = now
        pipe = self.redis.pipeline(transaction=False)
        for lane in queue.QUEUE_LANES:
            pipe.xautoclaim(
                lane,
                queue.WORKER_GROUP,
                self.settings.worker_id,
                min_idle_time=int(self.settings.claim_idle_s * 1000),
                start_id="0-0",
                count=room,
            )
        # Redis 6.2 replies [next, entries]; 7.0 adds the ids of deleted entries.
        claimed = [
            (lane, entry_id, fields)
            for lane, reply in enumerate(pipe.execute())
            for entry_id, fields in reply[1]
            if fields is not None
        ]
        if claimed:
            log.warning("claimed %d entries from a silent worker", len(claimed))
        return [entry for entry in claimed if self._deliverable(*entry)]

    def _deliverable(self, lane: int, entry_id: bytes, fields) -> bool:
        stream = queue.QUEUE_LANES[lane]
        pending = self.redis.xpending_range(
            stream, queue.WORKER_GROUP, min=entry_id, max=entry_id, count=1
        )
        deliveries = pending[0]["times_delivered"] if pending else 1
        if deliveries <= self.settings.max_deliveries:
            return True
        item = _decode(fields)
        reason = (
            f"set aside after {deliveries - 1} attempts that each ended with the worker "
            "dying; it was not retried again"
        )
        context = {"request_id": item.request_id if item is not None else None}
        log.error("dead-lettering entry %s (%s)", entry_id, reason, extra=context)
        self.metrics.items("dead_lettered")
        self.redis.xadd(queue.DEAD_LETTER_STREAM, {**fields, b"reason": reason}, maxlen=10_000)
        if item is not None:
            self.replies.error(item, "INTERNAL", reason)
        self._ack([(stream, entry_id)])
        return False

    def _admit(self, lane: int, entry_id: bytes, fields) -> Job | None:
        """The job for an entry, or None (acknowledged) if it must not run."""
        item = _decode(fields)
        if item is None:
            log.error("entry %s holds no valid QueueItem; dropping it", entry_id)
            self.metrics.items("failed")
            self._ack([(queue.QUEUE_LANES[lane], entry_id)])
            return None
        job = Job(lane, entry_id, item, _work_item(item))
        if self._skipped(job):
            return None
        self.in_flight.add(job.ref)
        return job

    def _skipped(self, job: Job) -> bool:
        """Acknowledges (without running) a job whose request was cancelled or whose
        deadline passed; True if it did."""
        item = job.item
        if job.waited_s() >= _CHECK_CANCELLED_AFTER_S and self.redis.exists(
            queue.cancel_key(item.request_id)
        ):
            self._ack([job.ref])  # nobody listens: write nothing
            self.metrics.items("cancelled")
            return True
        if item.deadline_unix_s and item.deadline_unix_s < time.time():
            self.replies.error(item, "DEADLINE_EXCEEDED", "the deadline passed while it was queued")
            self._ack([job.ref])
            self.metrics.items("expired")
            return True
        return False

    def _run_batch(self, jobs: Sequence[Job]) -> None:
        """Computes `jobs` as one batch, then writes their replies and acknowledges
        them: here, or while the next batch computes (write-behind, for batches
        without attention maps, whose outputs stream out as they are computed)."""
        started = time.perf_counter()
        behind = self.write_behind is not None and not any(map(_needs_maps, jobs))
        outputs: list[TensorOutput] = []
        emit = outputs.append if behind else lambda output: self._emit(self.replies, jobs, output)
        try:
            self.runner.run([job.work for job in jobs], emit)
        except Exception:
            self.replies.discard()
            if len(jobs) > 1:
                log.exception("a batch of %d failed; running its items one by one", len(jobs))
                for job in jobs:
                    self._run_batch([job])
                return
            item = jobs[0].item
            log.exception(
                "item %s of request %s failed",
                item.sequence_index,
                item.request_id,
                extra={"request_id": item.request_id},
            )
            self.replies.error(item, "INTERNAL", "the model failed on this item; see worker logs")
            self._ack([jobs[0].ref])
            self.metrics.items("failed")
            return
        if behind:
            replies = self.behind_replies
            self.write_behind.submit(lambda: self._finish(jobs, started, replies, outputs))
        else:
            self._finish(jobs, started, self.replies)

    def _finish(self, jobs, started: float, replies: ReplyWriter, outputs=()) -> None:
        """Writes a computed batch's `outputs` (the rest were written as computed) and
        completions, and acknowledges its entries. If Redis fails that, the entries
        leave `in_flight`: no heartbeat keeps them, so they run again once claimed."""
        refs = [job.ref for job in jobs]
        try:
            for output in outputs:
                self._emit(replies, jobs, output)
            outcomes = []
            for job in jobs:
                abandoned = replies.abandoned.get(item_key(job.item))
                outcomes.append(abandoned_outcome(abandoned[0]) if abandoned else "completed")
                replies.complete(job.item, job.work.predict)
            check_waits = self._take_along(replies)  # None: no take rode along
            try:
                cancelled = self._ack(refs, replies)
            finally:
                if check_waits is not None:
                    self._prefetched = self._taken_along(check_waits)
        except redis.RedisError as error:
            replies.discard()
            self.in_flight.difference_update(refs)
            log.warning(
                "writing the results of a batch of %d failed; they run again once claimed "
                "(--claim-idle-s): %s",
                len(jobs),
                error,
            )
            return
        counts = Counter(
            "cancelled" if job.item.request_id in cancelled else outcome
            for job, outcome in zip(jobs, outcomes, strict=True)
        )
        for outcome, count in counts.items():
            self.metrics.items(outcome, count)
        self.stats["items"] += len(jobs)
        self.stats["batches"] += 1
        tokens, seconds = sum(len(j.work.token_ids) for j in jobs), time.perf_counter() - started
        self.metrics.batch(len(jobs), tokens, seconds, padded_tokens=0)  # packed: no padding
        log.debug("batch of %d (%d tokens) in %.1f ms", len(jobs), tokens, 1000 * seconds)

    def _take_along(self, replies: ReplyWriter) -> bool | None:
        """Has the next step's first take ride along with the batch's final write on the
        loop's connection (one round trip for both: Redis's and the worker's cost of one
        less), when that step will take and need not claim first. Returns whether that
        take asks about lane waits; None if none rides along."""
        room = self.settings.batch_size - len(self.held)
        claim_due = time.monotonic() - self._last_claim >= _CLAIM_EVERY_S
        if replies is not self.replies or room <= 0 or claim_due:
            return None
        args, check_waits = self._take_args(min(room, READ_SIZE))
        lanes = queue.QUEUE_LANES
        self.direct.ride_along("EVALSHA", self._take.sha, len(lanes), *lanes, *args)
        return check_waits

    def _taken_along(self, check_waits: bool) -> list[tuple[int, bytes, dict]] | None:
        """The entries of the take that rode along; None if it was not sent or Redis
        refused it (the next step takes as usual, and meets the error there)."""
        reply = self.direct.rider_reply()
        if reply is None or isinstance(reply, redis.ResponseError):
            return None
        return self._taken(reply, check_waits)

    def _ack(self, refs: list[EntryRef], replies: ReplyWriter | None = None) -> set[str]:
        """Writes the replies buffered so far, then acknowledges the entries. Returns
        the ids of requests found cancelled (their replies were dropped)."""
        cancelled = (replies or self.replies).flush(acks=refs)
        self.in_flight.difference_update(refs)
        return cancelled

    def _emit(self, replies: ReplyWriter, jobs: Sequence[Job], output: TensorOutput) -> None:
        self.progress_at = time.monotonic()
        replies.emit(jobs[output.item].item, output)

    def _hand_back(self, jobs: Sequence[Job]) -> None:
        """Returns held jobs to the queue at once (at its tail), so a worker that stops
        does not leave them waiting `claim_idle_s` for another to claim them."""
        if not jobs:
            return
        pipe = self.redis.pipeline(transaction=True)
        for job in jobs:
            stream, entry_id = job.ref
            pipe.xadd(stream, {queue.ITEM_FIELD: job.item.SerializeToString()})
            pipe.xack(stream, queue.WORKER_GROUP, entry_id)
            pipe.xdel(stream, entry_id)
        pipe.execute()
        self.in_flight.difference_update(job.ref for job in jobs)
        self.held = []
        log.info("handed %d queued items back", len(jobs))

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.heartbeat()
            except redis.RedisError as error:
                log.warning("heartbeat failed: %s", error)
            stop.wait(self.settings.heartbeat_s)

    def heartbeat(self) -> None:
        """Announces this worker and keeps its in-flight entries from being claimed,
        as long as its loop makes progress: a worker stuck in one batch for more than
        `max_batch_s` falls silent, so its entries are claimed by others and probes
        see it as dead."""
        stalled_s = time.monotonic() - self.progress_at
        if stalled_s > self.settings.max_batch_s:
            log.error("no progress for %.0f s: heartbeats stopped so others take over", stalled_s)
            return
        ttl_s = max(1, int(3 * self.settings.heartbeat_s))
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(queue.HEARTBEATS, {self.settings.worker_id: time.time()})
        pipe.set(
            queue.worker_info_key(self.settings.worker_id), self.model.SerializeToString(), ex=ttl_s
        )
        for stream, entry_ids in group_by_stream(list(self.in_flight)).items():
            pipe.xclaim(
                stream,
                queue.WORKER_GROUP,
                self.settings.worker_id,
                min_idle_time=0,
                message_ids=entry_ids,
                justid=True,
            )
        pipe.execute()

    def _sign_off(self) -> None:
        try:
            self.redis.zrem(queue.HEARTBEATS, self.settings.worker_id)
            self.redis.delete(queue.worker_info_key(self.settings.worker_id))
        except redis.RedisError:
            pass


def ensure_group(client: redis.Redis) -> None:
    """Creates the queue lanes and the workers' group on each if missing (idempotent)."""
    for lane in queue.QUEUE_LANES:
        try:
            client.xgroup_create(lane, queue.WORKER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _field_dict(fields: list) -> dict:
    """An entry's fields as Redis replies them ([field, value, ...]), as a dict."""
    return dict(zip(fields[::2], fields[1::2], strict=True))


def _decode(fields) -> qpb.QueueItem | None:
    try:
        return qpb.QueueItem.FromString(fields[queue.ITEM_FIELD])
    except (KeyError, DecodeError):
        return None


def _work_item(item: qpb.QueueItem) -> WorkItem:
    return WorkItem(
        token_ids=token_ids(item.sequence),
        include=frozenset(item.include),
        repr_layers=tuple(item.repr_layers),
        dtype=item.dtype,
        predict=item.task == qpb.TASK_PREDICT,
    )


def _needs_maps(job: Job) -> bool:
    """Whether the job asks for attention maps (contacts, attentions): outputs streamed
    while the batch computes, never held for a write-behind."""
    return not job.work.predict and bool(
        job.work.include & {pb.INCLUDE_CONTACTS, pb.INCLUDE_ATTENTIONS}
    )
