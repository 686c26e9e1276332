"""The Esm2 servicer: validate, enqueue, relay. Transport only; no model here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from esm2_service import metadata, queue
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.esm2.v1 import esm2_pb2_grpc
from esm2_service.server.broker import REDIS_ERRORS, Broker, new_request_id, queue_depths
from esm2_service.server.errors import BackendUnavailable, to_rpc_status
from esm2_service.server.packing import pack
from esm2_service.server.scoring import ScoreRun
from esm2_service.validation import (
    MAX_ITEMS,
    InvalidRequest,
    ValidRequest,
    check_decoded,
    validate_encode,
    validate_predict,
)
from esm2_service.variants import validate_score

log = logging.getLogger(__name__)

# Starts a request under its id: (items, for the log; the stream of its responses).
StartRequest = Callable[[str], Awaitable[tuple[int, AsyncIterator]]]
# A Score request's window grows with the workers up to this many.
MAX_SCORE_WINDOW_WORKERS = 8


class Esm2Service(esm2_pb2_grpc.Esm2ServiceServicer):
    def __init__(self, broker: Broker, worker_timeout_s: float):
        self.broker = broker
        self.worker_timeout_s = worker_timeout_s
        self._cleanups: set[asyncio.Task] = set()  # referenced until done

    # Streams relay the response messages the workers serialized: one to a gRPC message,
    # or packed, those that arrived together in as few messages as `pack` makes.
    async def Encode(self, request, context) -> AsyncIterator[bytes]:
        async for message in self._run("Encode", validate_encode, request, context):
            yield message

    async def EncodePacked(self, request, context) -> AsyncIterator[bytes]:
        async for message in self._run("EncodePacked", validate_encode, request, context, True):
            yield message

    async def Predict(self, request, context) -> AsyncIterator[bytes]:
        async for message in self._run("Predict", validate_predict, request, context):
            yield message

    async def PredictPacked(self, request, context) -> AsyncIterator[bytes]:
        async for message in self._run("PredictPacked", validate_predict, request, context, True):
            yield message

    async def Score(self, request, context) -> AsyncIterator[pb.ScoreResponse]:
        async def run(request_id: str):
            valid = validate_score(request)
            deadline = self.broker.deadline(context.time_remaining())
            window = await self._score_window()
            score = ScoreRun(self.broker, valid, request_id, deadline, window)
            return len(valid.variants), score.responses()

        async for response in self._serve("Score", run, context):
            yield response

    async def _score_window(self) -> int:
        """Passes one Score request keeps queued or running: a batch per live worker, so
        every worker has a batch of it, and a request that arrives later on the same
        queue lane waits for at most the batches in progress."""
        now = time.time()
        workers = await self.broker.redis.execute(
            "ZCOUNT", queue.HEARTBEATS, now - self.worker_timeout_s, "+inf"
        )
        return MAX_ITEMS * min(max(workers, 1), MAX_SCORE_WINDOW_WORKERS)

    async def GetStatus(self, request, context) -> pb.GetStatusResponse:
        try:
            check_decoded(request)
            return await read_status(self.broker.redis, self.worker_timeout_s)
        except REDIS_ERRORS as error:
            await _abort(context, BackendUnavailable(f"the queue (Redis) is unreachable: {error}"))
        except InvalidRequest as error:
            await _abort(context, error)

    async def _run(
        self,
        method: str,
        validate: Callable[..., ValidRequest],
        request,
        context,
        packed: bool = False,
    ):
        async def run(request_id: str):
            valid = validate(request)
            deadline = await self.broker.submit(valid, request_id, context.time_remaining())
            items = len(valid.sequences)
            return items, self.broker.results(request_id, items, deadline)

        async for responses in self._serve(method, run, context):
            for message in pack(responses) if packed else responses:
                yield message

    async def _serve(self, method: str, start: StartRequest, context):
        """Relays what `start(request_id)` streams, turning every error into a status and
        cleaning the request's queue state up however it ends."""
        request_id = new_request_id()
        # The id goes back in the trailers of every outcome, so a user can quote it.
        context.set_trailing_metadata(((metadata.REQUEST_ID, request_id),))
        queued = finished = False
        started = time.perf_counter()
        try:
            items, responses = await start(request_id)
            queued = True
            async with contextlib.aclosing(responses):
                async for response in responses:
                    yield response
            finished = True
            log.info(
                "%s request_id=%s items=%d done in %.1f ms",
                method,
                request_id,
                items,
                1000 * (time.perf_counter() - started),
                extra={"request_id": request_id},
            )
        except asyncio.CancelledError:
            log.info(
                "%s request_id=%s cancelled by the client",
                method,
                request_id,
                extra={"request_id": request_id},
            )
            raise
        except Exception as error:  # one table turns every error into a status
            log.info(
                "%s request_id=%s failed: %s",
                method,
                request_id,
                error,
                extra={"request_id": request_id},
            )
            await _abort(context, error, request_id)
        finally:
            if queued:
                # Off the response's path: the client's stream ends without waiting for it.
                cleanup = self.broker.finish if finished else self.broker.cancel
                task = asyncio.get_running_loop().create_task(cleanup(request_id))
                self._cleanups.add(task)
                task.add_done_callback(self._cleanups.discard)


async def _abort(context, error: Exception, request_id: str | None = None) -> None:
    status = to_rpc_status(error)
    trailers = tuple(status.trailing_metadata)
    if request_id is not None:
        trailers += ((metadata.REQUEST_ID, request_id),)
    await context.abort(status.code, status.details, trailers)


async def read_status(redis, worker_timeout_s: float) -> pb.GetStatusResponse:
    """Live workers (heartbeat within `worker_timeout_s`), their models, the queue depth."""
    now = time.time()
    found = await redis.execute(
        "ZRANGEBYSCORE", queue.HEARTBEATS, now - worker_timeout_s, "+inf", "WITHSCORES"
    )
    pairs = zip(found[::2], found[1::2], strict=True)
    workers = [(worker, float(score)) for worker, score in pairs]
    infos = (
        await redis.execute("MGET", *(queue.worker_info_key(w.decode()) for w, _ in workers))
        if workers
        else []
    )
    response = pb.GetStatusResponse(queue_depth=sum((await queue_depths(redis)).values()))
    for (worker_id, last_seen), info in zip(workers, infos, strict=True):
        model = pb.ModelInfo.FromString(info) if info else pb.ModelInfo()
        response.workers.add(worker_id=worker_id.decode(), model=model, last_seen_unix_s=last_seen)
        response.any_random_weights |= model.random_weights
    return response
