"""The worker's queue loop against a real Redis, with the real (tiny) model."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import redis
from queue_helpers import lane_of, pending_count, queue_length

from esm2_service import queue
from esm2_service.esm2.internal.v1 import queue_pb2 as qpb
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.worker.checkpoint import load_checkpoint
from esm2_service.worker.engine import Engine
from esm2_service.worker.model import Esm2
from esm2_service.worker.queue_loop import QueueWorker, ensure_group
from esm2_service.worker.settings import WorkerSettings

_BACKDATED = itertools.count(1)  # sequence numbers of backdated entry ids (Redis 6.2 has no ms-*)
MODEL = pb.ModelInfo(name="tiny", checkpoint_sha256="ab", random_weights=True, device="cpu")


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine(Esm2.from_checkpoint(load_checkpoint(tiny_checkpoint)))


def make_worker(redis_client, runner, worker_id="w1", **settings):
    values = dict(
        worker_id=worker_id, block_ms=100, claim_idle_s=5.0, heartbeat_s=1.0, max_deliveries=2
    )
    values.update(settings)
    ensure_group(redis_client)
    return QueueWorker(redis_client, runner, WorkerSettings(**values), MODEL)


def enqueue(
    redis_client,
    request_id,
    index,
    sequence,
    *,
    deadline_s=60.0,
    task=qpb.TASK_ENCODE,
    include=(pb.INCLUDE_MEAN,),
    layers=(6,),
    age_s=0.0,
    news_stream="",
):
    """Queues one item on its lane, with its request's marker as the broker sets it;
    `age_s` backdates it (entry id and enqueue time); `news_stream`: its frontend's."""
    enqueued = time.time() - age_s
    item = qpb.QueueItem(
        request_id=request_id,
        sequence_index=index,
        task=task,
        sequence=sequence,
        repr_layers=layers,
        include=include,
        dtype=pb.DTYPE_FLOAT32,
        deadline_unix_s=time.time() + deadline_s if deadline_s else 0,
        enqueued_unix_s=enqueued,
        news_stream=news_stream,
    )
    entry_id = f"{int(enqueued * 1000)}-{next(_BACKDATED)}" if age_s else "*"
    fields = {queue.ITEM_FIELD: item.SerializeToString()}
    redis_client.set(queue.request_key(request_id), 1, ex=600)
    return redis_client.xadd(lane_of(sequence), fields, id=entry_id)


def replies(redis_client, request_id):
    out = []
    for _, fields in redis_client.xrange(queue.reply_stream(request_id)):
        if queue.ERROR_FIELD in fields:
            out.append(qpb.ItemError.FromString(fields[queue.ERROR_FIELD]))
        else:
            out.append(pb.EncodeResponse.FromString(fields[queue.CHUNK_FIELD]))
    return out


def test_items_from_several_requests_run_in_one_read_and_are_acked_after_results(
    redis_client, engine
):
    worker = make_worker(redis_client, engine)
    for request, sequences in (("r1", ["MKTAYIAK", "MK"]), ("r2", ["ACDEFGHIKLMNPQRSTVWY"])):
        for index, sequence in enumerate(sequences):
            enqueue(redis_client, request, index, sequence)
    assert worker.step() == 3
    r1, r2 = replies(redis_client, "r1"), replies(redis_client, "r2")
    assert sorted((m.sequence_index, m.WhichOneof("payload")) for m in r1) == [
        (0, "chunk"),
        (0, "complete"),
        (1, "chunk"),
        (1, "complete"),
    ]
    assert [m.WhichOneof("payload") for m in r2] == ["chunk", "complete"]
    assert list(r2[0].chunk.tensor.shape) == [32]
    assert r2[1].complete.model.random_weights and len(r2[1].complete.vocab_tokens) == 33
    assert queue_length(redis_client) == 0
    assert pending_count(redis_client) == 0
    assert 0 < redis_client.ttl(queue.reply_stream("r1")) <= 600


def test_predict_completion_carries_the_sequence_tokens(redis_client, engine):
    worker = make_worker(redis_client, engine)
    enqueue(redis_client, "p", 0, "MK<mask>A", task=qpb.TASK_PREDICT, include=(), layers=())
    worker.step()
    chunk, complete = replies(redis_client, "p")
    assert chunk.chunk.kind == pb.INCLUDE_LOGITS and list(chunk.chunk.tensor.shape) == [1, 33]
    assert list(complete.complete.sequence_tokens) == ["M", "K", "<mask>", "A"]


class Recording:
    """Records which sequences each batch ran, then runs them for real."""

    def __init__(self, engine):
        self.engine, self.batches = engine, []

    def run(self, items, emit):
        self.batches.append([item.residues for item in items])
        self.engine.run(items, emit)


def test_expired_and_cancelled_items_are_skipped(redis_client, engine):
    runner = Recording(engine)
    worker = make_worker(redis_client, runner)
    enqueue(redis_client, "gone", 0, "MKVLA", age_s=5.0)  # waited: checked before running
    enqueue(redis_client, "late", 0, "MKV", deadline_s=-1)
    enqueue(redis_client, "just-gone", 0, "MKVL")  # fresh: runs, its results are dropped
    redis_client.set(queue.cancel_key("gone"), 1)
    redis_client.set(queue.cancel_key("just-gone"), 1)
    worker.step()
    (error,) = replies(redis_client, "late")
    assert error.code == "DEADLINE_EXCEEDED"
    assert runner.batches == [[4]]
    for request_id in ("gone", "just-gone"):
        assert not redis_client.exists(queue.reply_stream(request_id))
    assert queue_length(redis_client) == 0 and pending_count(redis_client) == 0


class CancelledMidRun(Recording):
    """Cancels the batch's first request while the model runs."""

    def __init__(self, engine, redis_client):
        super().__init__(engine)
        self.redis = redis_client

    def run(self, items, emit):
        self.redis.set(queue.cancel_key("leaving"), 1)
        super().run(items, emit)


def test_a_request_cancelled_while_it_runs_gets_nothing_written(redis_client, engine):
    worker = make_worker(redis_client, CancelledMidRun(engine, redis_client))
    enqueue(redis_client, "leaving", 0, "MKV")
    enqueue(redis_client, "staying", 0, "MKV")
    worker.step()
    # The frontend deleted the leaving request's reply stream; the write must not bring
    # it back. The other request in the batch gets everything.
    assert not redis_client.exists(queue.reply_stream("leaving"))
    assert [m.WhichOneof("payload") for m in replies(redis_client, "staying")] == [
        "chunk",
        "complete",
    ]
    assert queue_length(redis_client) == 0 and pending_count(redis_client) == 0
    # Attention maps over 1 MiB are written as soon as they exist, not buffered.
    enqueue(redis_client, "leaving", 1, "MKV" * 100, include=(pb.INCLUDE_ATTENTIONS,))
    worker.step()
    assert not redis_client.exists(queue.reply_stream("leaving"))
    assert queue_length(redis_client) == 0


def news_entries(redis_client, stream):
    """(request id, field, piece) of every inline entry in a news stream, in order."""
    return [
        queue.parse_inline_field(name)
        for _, fields in redis_client.xrange(stream)
        for name in fields
        if name != queue.NEWS_FIELD
    ]


def test_a_batch_whose_results_all_ride_inline_is_written_without_the_script(redis_client, engine):
    """Mean outputs are small: the batch's one write goes to the news stream in a
    MULTI/EXEC, and still reports which requests were cancelled or unknown."""
    runner = Recording(engine)
    worker = make_worker(redis_client, runner)
    scripts = []
    run_script = worker.direct.run_script

    def counted(script, keys, args):
        scripts.append(script)
        return run_script(script, keys, args)

    worker.direct.run_script = counted
    for request_id in ("live", "cancelled", "unknown"):
        for index in range(2):
            enqueue(redis_client, request_id, index, "MKTAYIAK", news_stream="news:a")
    redis_client.set(queue.cancel_key("cancelled"), 1)
    redis_client.delete(queue.request_key("unknown"))
    worker.step()
    assert runner.batches == [[8] * 6]
    assert worker.replies._write_script not in scripts  # the take's script only
    written = news_entries(redis_client, "news:a")
    assert [(r, f, p) for r, f, p in written if r == "live"] == [
        ("live", queue.CHUNK_FIELD, queue.chunk_piece(0, pb.INCLUDE_MEAN, 6, 0)),
        ("live", queue.CHUNK_FIELD, queue.chunk_piece(1, pb.INCLUDE_MEAN, 6, 0)),
        ("live", queue.CHUNK_FIELD, queue.completion_piece(0)),
        ("live", queue.CHUNK_FIELD, queue.completion_piece(1)),
    ]
    assert redis_client.ttl("news:a") > 0
    assert queue_length(redis_client) == 0 and pending_count(redis_client) == 0
    count = worker.metrics.registry.get_sample_value
    outcomes = {
        outcome: count("esm2_worker_items_total", {"outcome": outcome})
        for outcome in ("completed", "cancelled")
    }
    assert outcomes == {"completed": 2, "cancelled": 4}


class RedisRestartsMidRun(Recording):
    """Redis restarts without persistence while the model runs: a fresh, empty Redis."""

    def __init__(self, engine, redis_client):
        super().__init__(engine)
        self.redis = redis_client

    def run(self, items, emit):
        self.redis.flushdb()
        ensure_group(self.redis)  # as a restarted worker loop would
        super().run(items, emit)


def test_a_batch_begun_before_redis_restarted_writes_nothing_into_the_fresh_one(
    redis_client, engine
):
    worker = make_worker(redis_client, RedisRestartsMidRun(engine, redis_client))
    enqueue(redis_client, "before", 0, "MKV")
    enqueue(redis_client, "before", 1, "MKV" * 100, include=(pb.INCLUDE_ATTENTIONS,))
    worker.step()
    # Nobody reads a request the fresh Redis does not know: no reply stream, and no
    # news for its frontend.
    assert redis_client.keys("*reply*") == [] and redis_client.keys("*news*") == []


def test_undecodable_entries_are_dropped_without_stopping_the_worker(redis_client, engine):
    worker = make_worker(redis_client, engine)
    redis_client.xadd(queue.QUEUE_LANES[0], {queue.ITEM_FIELD: b"\xff\xfe not protobuf"})
    redis_client.xadd(queue.QUEUE_LANES[2], {b"other": b"x"})
    enqueue(redis_client, "ok", 0, "MKV")
    worker.step()
    assert [m.WhichOneof("payload") for m in replies(redis_client, "ok")] == ["chunk", "complete"]
    assert queue_length(redis_client) == 0


class FailsOn:
    """A runner that raises for a given sequence length, and runs the rest."""

    def __init__(self, engine, bad_tokens: int):
        self.engine, self.bad_tokens = engine, bad_tokens

    def run(self, items, emit):
        if any(len(item.token_ids) == self.bad_tokens for item in items):
            raise RuntimeError("boom")
        self.engine.run(items, emit)


def test_a_failing_item_does_not_take_its_batch_down(redis_client, engine):
    worker = make_worker(redis_client, FailsOn(engine, bad_tokens=5))
    enqueue(redis_client, "mixed", 0, "MKV")  # 5 tokens: fails
    enqueue(redis_client, "mixed", 1, "MKVA")
    enqueue(redis_client, "other", 0, "MKVAL")
    worker.step()
    errors = [m for m in replies(redis_client, "mixed") if isinstance(m, qpb.ItemError)]
    assert [(e.sequence_index, e.code) for e in errors] == [(0, "INTERNAL")]
    assert [m.WhichOneof("payload") for m in replies(redis_client, "other")] == [
        "chunk",
        "complete",
    ]
    assert queue_length(redis_client) == 0


def test_entries_of_a_dead_worker_are_claimed_and_poison_is_dead_lettered(redis_client, engine):
    ensure_group(redis_client)
    enqueue(redis_client, "orphan", 0, "MKV")
    # A worker reads the entry and dies before acknowledging it.
    redis_client.xreadgroup(queue.WORKER_GROUP, "dead", {lane_of("MKV"): ">"}, count=8)
    survivor = make_worker(
        redis_client, engine, worker_id="survivor", claim_idle_s=3.0, heartbeat_s=1.0
    )
    assert survivor.step() == 0  # not idle long enough yet
    time.sleep(3.2)
    survivor._last_claim = 0.0
    assert survivor.step() == 1
    assert [m.WhichOneof("payload") for m in replies(redis_client, "orphan")] == [
        "chunk",
        "complete",
    ]

    enqueue(redis_client, "poison", 0, "MKV")
    # Delivered to one worker, then claimed by another, and each time the worker died.
    redis_client.xreadgroup(queue.WORKER_GROUP, "dead-1", {lane_of("MKV"): ">"}, count=8)
    redis_client.xautoclaim(lane_of("MKV"), queue.WORKER_GROUP, "dead-2", 0, "0-0")
    time.sleep(3.2)
    survivor._last_claim = 0.0
    survivor.step()
    (error,) = replies(redis_client, "poison")
    assert error.code == "INTERNAL" and "set aside after 2 attempts" in error.message
    assert redis_client.xlen(queue.DEAD_LETTER_STREAM) == 1
    assert queue_length(redis_client) == 0


def test_heartbeat_announces_the_model_and_refreshes_entries_in_flight(redis_client, engine):
    worker = make_worker(redis_client, engine, worker_id="hb")
    enqueue(redis_client, "slow", 0, "MKV")
    ((entry_id, _),) = redis_client.xreadgroup(
        queue.WORKER_GROUP, "hb", {lane_of("MKV"): ">"}, count=1
    )[0][1]
    worker.in_flight.add((lane_of("MKV"), entry_id))
    time.sleep(0.3)
    worker.heartbeat()
    pending = redis_client.xpending_range(lane_of("MKV"), queue.WORKER_GROUP, "-", "+", 1)
    assert pending[0]["time_since_delivered"] < 200
    assert redis_client.zscore(queue.HEARTBEATS, "hb") > time.time() - 5
    assert pb.ModelInfo.FromString(redis_client.get(queue.worker_info_key("hb"))) == MODEL


def queued_while_the_first_batch_runs(runner: Recording, redis_client, request_id, sequence):
    """Has `runner` queue `sequence` as request `request_id`'s item 0 while it runs its
    first batch (the worker takes the next step's entries as it writes that batch)."""
    run = runner.run

    def run_while_an_item_arrives(items, emit):
        run(items, emit)
        if len(runner.batches) == 1:
            enqueue(redis_client, request_id, 0, sequence)

    runner.run = run_while_an_item_arrives


def test_a_short_item_queued_later_overtakes_held_long_ones(redis_client, engine):
    runner = Recording(engine)
    queued_while_the_first_batch_runs(runner, redis_client, "short", "MKV")
    worker = make_worker(redis_client, runner, max_batch_tokens=210, batch_size=4)
    for index in range(3):
        enqueue(redis_client, "long", index, "A" * 100)
    worker.step()  # two long items fit the budget; the third is held
    assert runner.batches == [[100, 100]] and len(worker.held) == 1
    worker.step()
    assert runner.batches[1] == [3, 100]  # the short item runs in the very next batch
    assert worker.held == []
    assert replies(redis_client, "short")[-1].WhichOneof("payload") == "complete"


def test_a_short_item_overtakes_a_deep_backlog_of_long_ones(redis_client, engine):
    runner = Recording(engine)
    queued_while_the_first_batch_runs(runner, redis_client, "short", "MKV")
    worker = make_worker(redis_client, runner)
    for index in range(8):
        enqueue(redis_client, f"bulk-{index}", 0, "A" * 300)  # 40 items, lane to512
        for more in range(1, 5):
            enqueue(redis_client, f"bulk-{index}", more, "A" * (300 + more))
    worker.step()
    assert runner.batches == [[300, 300, 301, 301, 302, 302, 303, 304]]  # first 8 queued
    worker.step()
    # The very next batch, and alone: a batch never mixes lanes.
    assert runner.batches[1] == [3]
    assert replies(redis_client, "short")[-1].WhichOneof("payload") == "complete"
    assert len(worker.held) == 7 and queue_length(redis_client) == 32  # 40 + 1 - 9 done


def test_a_pass_packs_several_reads_of_at_most_8_entries(redis_client, engine):
    """A GPU worker's pass holds up to `batch_size` entries (64 by default), taken from
    the queue 8 at a time, so what one worker holds beyond its pass stays small."""
    runner = Recording(engine)
    worker = make_worker(redis_client, runner, batch_size=20)
    for index in range(20):
        enqueue(redis_client, f"r{index // 8}", index % 8, "A" * (30 + index))  # lane to128
    reads = []
    run_script = worker.direct.run_script

    def counted(script, keys, args):
        if script is worker._take:
            reads.append(args[2])  # the read's count
        return run_script(script, keys, args)

    worker.direct.run_script = counted
    worker.step()
    assert reads == [8, 8, 4]
    assert runner.batches == [[30 + index for index in range(20)]]
    assert queue_length(redis_client) == 0


def test_the_next_take_rides_along_with_a_batchs_write(redis_client, engine):
    """One round trip writes a batch and takes the next step's entries; a worker that
    stops with such entries hands them back to the queue at once."""
    runner = Recording(engine)
    worker = make_worker(redis_client, runner)
    for index in range(24):
        enqueue(redis_client, f"r{index // 8}", index % 8, "A" * (30 + index))
    takes = []
    run_script = worker.direct.run_script

    def counted(script, keys, args):
        takes.extend([args[2]] if script is worker._take else [])
        return run_script(script, keys, args)

    worker.direct.run_script = counted
    worker.step()
    worker.step()
    assert takes == [8]  # the second step's entries came with the first batch's write
    assert runner.batches == [[30 + i for i in range(8)], [38 + i for i in range(8)]]
    assert all(len(replies(redis_client, f"r{r}")) == 16 for r in (0, 1))
    assert [entry[1] for entry in worker._prefetched] == sorted(e[1] for e in worker._prefetched)
    assert len(worker._prefetched) == 8

    stop = threading.Event()
    stop.set()
    worker.run(stop)
    lane = lane_of("A" * 50)
    assert redis_client.xpending(lane, queue.WORKER_GROUP)["pending"] == 0
    assert queue_length(redis_client) == 8  # handed back, ready for any worker
    other = make_worker(redis_client, Recording(engine), worker_id="w2")
    other.step()
    assert len(replies(redis_client, "r2")) == 16


def test_reads_stop_once_the_entries_fill_a_pass(redis_client, engine):
    runner = Recording(engine)
    worker = make_worker(redis_client, runner, batch_size=64, max_batch_tokens=2000)
    for index in range(24):
        enqueue(redis_client, f"r{index // 8}", index % 8, "A" * 300)  # lane to512: 257+ each
    worker.step()
    assert runner.batches == [[300] * 6]  # 6 x 302 tokens fit 2,000
    assert len(worker.held) == 2  # one read of 8 (8 x 257 > 2,000): the rest stay queued
    assert queue_length(redis_client) == 24 - 6


def test_a_read_spanning_lanes_runs_shortest_lane_first_in_separate_batches(redis_client, engine):
    runner = Recording(engine)
    worker = make_worker(redis_client, runner)
    enqueue(redis_client, "mixed", 0, "A" * 1100)  # lane over1024
    enqueue(redis_client, "mixed", 1, "A" * 300)  # to512
    enqueue(redis_client, "mixed", 2, "A" * 20)  # to128
    enqueue(redis_client, "mixed", 3, "A" * 10)  # to128
    while runner.batches != [[10, 20], [300], [1100]]:
        assert worker.step() >= 0 and len(runner.batches) <= 3, runner.batches
    assert queue_length(redis_client) == 0


def test_lane_waits_are_looked_at_again_only_once_one_could_pass_the_limit(redis_client, engine):
    worker = make_worker(redis_client, engine, batch_size=2, lane_max_wait_s=5.0)
    asked = []
    take_args = worker._take_args

    def counted(room):  # every take: a step's own, or one riding along with a write
        args, check_waits = take_args(room)
        asked.append(args[3])  # 1: this read looks for a lane that waited too long
        return args, check_waits

    worker._take_args = counted
    for index in range(6):
        enqueue(redis_client, "fresh", index, "A" * 20)
    for _ in range(3):
        worker.step()
    assert asked == [1, 0, 0, 0]  # nothing can pass 5 s before about 5 s from now
    worker._next_wait_check -= 5.0  # as if those 5 s had passed
    enqueue(redis_client, "later", 0, "A" * 20)
    worker.step()
    assert asked[4] == 1
    assert queue_length(redis_client) == 0


def test_a_lane_that_waited_too_long_gets_every_other_batch(redis_client, engine):
    runner = Recording(engine)
    worker = make_worker(redis_client, runner, batch_size=2, lane_max_wait_s=5.0)
    for index in range(4):
        enqueue(redis_client, "old", index, "A" * 300, age_s=60.0)
    for index in range(6):
        enqueue(redis_client, "new", index, "A" * 20)
    for _ in range(6):
        worker.step()
    # Short items still go first whenever the long lane just had its turn.
    assert runner.batches == [[300, 300], [20, 20], [300, 300], [20, 20], [20, 20]]
    assert queue_length(redis_client) == 0


def test_a_stopping_worker_hands_held_items_back_at_once(redis_client, engine):
    worker = make_worker(redis_client, engine, max_batch_tokens=110)
    for index in range(2):
        enqueue(redis_client, "r", index, "A" * 100)
    worker.step()
    assert len(worker.held) == 1
    worker._hand_back(worker.held)
    assert pending_count(redis_client) == 0
    (entry,) = redis_client.xrange(lane_of("A" * 100))
    assert qpb.QueueItem.FromString(entry[1][queue.ITEM_FIELD]).sequence_index == 1
    other = make_worker(redis_client, engine, worker_id="other")
    assert other.step() == 1


def test_a_reader_that_stops_reading_bounds_the_reply_stream(redis_client, engine):
    worker = make_worker(redis_client, engine, max_reply_chunks=1, reader_stall_s=0.5)
    # Attention maps of 600 residues are 5.8 MB: written at once, in two chunks.
    enqueue(
        redis_client, "slow", 0, "MKTAYIAKQR" * 60, include=(pb.INCLUDE_ATTENTIONS, pb.INCLUDE_MEAN)
    )
    started = time.monotonic()
    worker.step()
    assert time.monotonic() - started >= 0.5
    messages = replies(redis_client, "slow")
    chunks = [m for m in messages if isinstance(m, pb.EncodeResponse)]
    assert [c.chunk.kind for c in chunks] == [pb.INCLUDE_ATTENTIONS] * 2  # then it gave up
    assert messages[-1].code == "RESOURCE_EXHAUSTED"
    assert "read no results for 0.5 s" in messages[-1].message
    assert queue_length(redis_client) == 0


def test_a_reader_that_keeps_up_gets_everything_despite_the_bound(redis_client, engine):
    import threading

    worker = make_worker(redis_client, engine, max_reply_chunks=1, reader_stall_s=5)
    enqueue(
        redis_client,
        "paced",
        0,
        "MKTAYIAK",
        include=(pb.INCLUDE_MEAN, pb.INCLUDE_BOS),
        layers=(0, 1, 2, 3),
    )
    received, stop = [], threading.Event()

    def reader():  # the frontend's part: read, relay, delete
        last = "0-0"
        while not stop.is_set():
            reply = redis_client.xread({queue.reply_stream("paced"): last}, block=50)
            for entry_id, fields in reply[0][1] if reply else []:
                received.append(pb.EncodeResponse.FromString(fields[queue.CHUNK_FIELD]))
                redis_client.xdel(queue.reply_stream("paced"), entry_id)
                last = entry_id

    thread = threading.Thread(target=reader)
    thread.start()
    worker.step()
    time.sleep(0.2)
    stop.set()
    thread.join()
    assert len(received) == 9 and received[-1].WhichOneof("payload") == "complete"


def test_a_worker_stuck_in_a_batch_stops_heartbeating_so_others_take_over(redis_client, engine):
    worker = make_worker(redis_client, engine, worker_id="stuck", max_batch_s=0.2)
    worker.heartbeat()
    first = redis_client.zscore(queue.HEARTBEATS, "stuck")
    time.sleep(0.3)  # no step, no output: the loop is stuck
    worker.heartbeat()
    assert redis_client.zscore(queue.HEARTBEATS, "stuck") == first
    worker.step()  # progress again
    worker.heartbeat()
    assert redis_client.zscore(queue.HEARTBEATS, "stuck") > first


def test_write_behind_computes_the_next_batch_while_the_last_one_is_written(redis_client, engine):
    runner = Recording(engine)
    worker = make_worker(redis_client, runner, write_behind="on", batch_size=2)
    for index in range(4):
        enqueue(redis_client, "wb", index, "A" * (20 + index))
    gate, flush = threading.Event(), worker.behind_replies.flush

    def held_flush(*args, **kwargs):
        assert gate.wait(30), "the test never released the write"
        return flush(*args, **kwargs)

    worker.behind_replies.flush = held_flush
    worker.step()  # computes the first batch; its write waits for the gate
    second = threading.Thread(target=worker.step)
    second.start()  # computes the second batch, then waits to hand it over
    deadline = time.monotonic() + 30
    while len(runner.batches) < 2:
        assert time.monotonic() < deadline, "the second batch never computed"
        time.sleep(0.01)
    assert replies(redis_client, "wb") == []  # nothing written yet: both computed first
    gate.set()
    second.join(30)
    worker.write_behind.drain()
    completed = [m.sequence_index for m in replies(redis_client, "wb") if m.HasField("complete")]
    assert sorted(completed) == [0, 1, 2, 3]
    assert queue_length(redis_client) == 0 and worker.in_flight == set()


@pytest.mark.parametrize("write_behind", ["on", "off"])
def test_a_batch_whose_results_redis_refuses_runs_again_once_claimed(
    redis_client, engine, write_behind
):
    """Its entries leave the worker's in-flight set, so no heartbeat keeps them from
    being claimed: they run again, and nothing is lost."""
    worker = make_worker(redis_client, engine, write_behind=write_behind, claim_idle_s=2.5)
    for index in range(2):
        enqueue(redis_client, "refused", index, "MKTAYIAK"[: 4 + index])
    writer = worker.behind_replies if write_behind == "on" else worker.replies
    run_script, calls = writer.direct.run_script, []

    def refused_once(script, keys, args):
        if script is writer._write_script:
            calls.append(keys)
            if len(calls) == 1:
                raise redis.ConnectionError("refused by the test")
        return run_script(script, keys, args)

    writer.direct.run_script = refused_once
    worker.step()
    if worker.write_behind is not None:
        worker.write_behind.drain()
    assert worker.in_flight == set() and pending_count(redis_client) == 2
    assert replies(redis_client, "refused") == []
    deadline = time.monotonic() + 30
    while queue_length(redis_client):
        assert time.monotonic() < deadline, "the refused batch never ran again"
        worker.step()
        if worker.write_behind is not None:
            worker.write_behind.drain()
    messages = replies(redis_client, "refused")
    assert sorted(m.sequence_index for m in messages if m.HasField("complete")) == [0, 1]
