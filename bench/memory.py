"""The memory check: one maximal Encode request against a fresh worker's peak RSS."""

from __future__ import annotations

import time

import grpc
import numpy as np

from bench.corpus import random_sequence
from bench.procfs import status_bytes
from bench.service import ServiceProcesses
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.esm2.v1 import esm2_pb2_grpc

ITEMS = 8
RESIDUES = 2048
LAYERS = tuple(range(7))
INCLUDE = (
    pb.INCLUDE_MEAN,
    pb.INCLUDE_PER_TOKEN,
    pb.INCLUDE_BOS,
    pb.INCLUDE_CONTACTS,
    pb.INCLUDE_LOGITS,
    pb.INCLUDE_ATTENTIONS,
)
TARGET_BYTES = 3 * 1000**3  # "3 GB"
WORKER_ID = "bench-mem"


def expected_bytes(residues: int = RESIDUES, items: int = ITEMS) -> int:
    """float32 bytes of every output of `items` sequences of `residues`, layers 0..6."""
    embed, vocab, heads = 320, 33, 20
    per_layer = embed + residues * embed + embed  # mean, per_token, bos
    per_item = len(LAYERS) * per_layer + residues**2 + residues * vocab + heads * residues**2
    return 4 * items * per_item


def encode_counting(target: str, request: pb.EncodeRequest, timeout_s: float) -> dict:
    """Runs `request` with the raw stub, keeping only counts: tensor bytes, message
    bytes, messages, completed items, and wall seconds."""
    counts = {"tensor_bytes": 0, "message_bytes": 0, "messages": 0, "items_complete": 0}
    started = time.perf_counter()
    with grpc.insecure_channel(target) as channel:
        for message in esm2_pb2_grpc.Esm2ServiceStub(channel).Encode(request, timeout=timeout_s):
            counts["messages"] += 1
            counts["message_bytes"] += message.ByteSize()
            if message.HasField("complete"):
                counts["items_complete"] += 1
            else:
                counts["tensor_bytes"] += len(message.chunk.tensor.data)
    counts["seconds"] = round(time.perf_counter() - started, 3)
    return counts


def memory_check(service: ServiceProcesses, timeout_s: float = 600.0) -> dict:
    """Stops every worker, starts a fresh one and sends it one Encode of 8 x 2048
    residues with all six outputs, layers 0..6, float32. Peak RSS in bytes."""
    for worker_id in list(service.workers):
        service.stop_worker(worker_id)
    worker = service.start_worker(WORKER_ID)
    service.wait_serving()
    after_load = status_bytes(worker.pid, "VmHWM")
    frontend_before = status_bytes(service.frontend.pid, "VmHWM")
    rng = np.random.default_rng(2048)
    request = pb.EncodeRequest(
        items=[pb.Item(sequence=random_sequence(rng, RESIDUES)) for _ in range(ITEMS)],
        params=pb.EncodeParams(repr_layers=LAYERS, include=INCLUDE, dtype=pb.DTYPE_FLOAT32),
    )
    response = encode_counting(service.target, request, timeout_s)
    peak = status_bytes(worker.pid, "VmHWM")
    return {
        "request": f"{ITEMS} x {RESIDUES} residues, all outputs, layers 0..6, float32",
        "worker_peak_rss_after_load_bytes": after_load,
        "worker_peak_rss_after_request_bytes": peak,
        "frontend_peak_rss_before_bytes": frontend_before,
        "frontend_peak_rss_after_bytes": status_bytes(service.frontend.pid, "VmHWM"),
        "redis_peak_rss_bytes": status_bytes(service.redis.process.pid, "VmHWM"),
        "expected_tensor_bytes": expected_bytes(),
        "response": response,
        "target_bytes": TARGET_BYTES,
        "pass": peak <= TARGET_BYTES and response["items_complete"] == ITEMS,
    }
