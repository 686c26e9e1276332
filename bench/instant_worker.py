"""`python -m bench.instant_worker`: the real queue loop behind a model that costs nothing.

The runner emits zeros of the shapes the real engine emits, so everything around the
model (Redis, the worker's reads and writes, the frontend's relay, the client's
decoding) is all that is timed. For `bench.plumbing`; never part of the worker.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence

from esm2_service.allocator import keep_freed_memory
from esm2_service.alphabet import MASK_INDEX
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.tensors import MAX_CHUNK_BYTES, resolve_dtype
from esm2_service.worker.main import redis_client
from esm2_service.worker.queue_loop import QueueWorker, ensure_group
from esm2_service.worker.settings import WorkerSettings
from esm2_service.worker.work import Emit, TensorOutput, WorkItem

EMBED_DIM, HEADS, VOCAB = 320, 20, 33
_BYTES_PER_VALUE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2}


def output_shapes(item: WorkItem) -> list[tuple[int, int, tuple[int, ...]]]:
    """(kind, layer, shape) of every tensor the engine emits for `item`."""
    length = item.residues
    if item.predict:
        masked = sum(1 for token in item.token_ids if token == MASK_INDEX)
        return [(pb.INCLUDE_LOGITS, 0, (masked, VOCAB))]
    per_layer = {
        pb.INCLUDE_MEAN: (EMBED_DIM,),
        pb.INCLUDE_PER_TOKEN: (length, EMBED_DIM),
        pb.INCLUDE_BOS: (EMBED_DIM,),
    }
    shapes = [
        (kind, layer, per_layer[kind])
        for layer in item.repr_layers
        for kind in sorted(per_layer)
        if kind in item.include
    ]
    if pb.INCLUDE_CONTACTS in item.include:
        shapes.append((pb.INCLUDE_CONTACTS, 0, (length, length)))
    if pb.INCLUDE_LOGITS in item.include:
        shapes.append((pb.INCLUDE_LOGITS, 0, (length, VOCAB)))
    if pb.INCLUDE_ATTENTIONS in item.include:
        shapes.append((pb.INCLUDE_ATTENTIONS, 6, (HEADS, length, length)))
    return shapes


class InstantRunner:
    """A `Runner` that emits zeros at once."""

    def run(self, items: Sequence[WorkItem], emit: Emit) -> None:
        for index, item in enumerate(items):
            width = _BYTES_PER_VALUE[resolve_dtype(item.dtype)]
            for kind, layer, shape in output_shapes(item):
                size = width
                for extent in shape:
                    size *= extent
                # Large tensors go out in pieces, as the engine streams attention maps.
                for offset in range(0, max(size, 1), MAX_CHUNK_BYTES):
                    data = bytes(min(MAX_CHUNK_BYTES, size - offset))
                    emit(TensorOutput(index, kind, layer, shape, data, offset))

    def warm_up(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instant_worker")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--worker-id", required=True)
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the worker's main does
    settings = WorkerSettings(redis_url=args.redis_url, worker_id=args.worker_id)
    client = redis_client(settings)
    ensure_group(client)
    model = pb.ModelInfo(name="instant", random_weights=True, device="none", precision="fp32")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print("ready", flush=True)
    QueueWorker(client, InstantRunner(), settings, model).run(stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
