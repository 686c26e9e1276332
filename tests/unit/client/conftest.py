"""A fake `esm2.v1.Esm2Service` server on loopback, streaming hand-built response messages.

Every tensor is a function of the item's sequence length, so tests can tell
which sequence a result belongs to: use sequences of distinct lengths.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from esm2_service import metadata
from esm2_service.alphabet import TOKEN_INDEX, VOCAB_TOKENS, split_tokens
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.esm2.v1 import esm2_pb2_grpc
from esm2_service.server.packing import pack
from esm2_service.tensors import chunk_messages, resolve_dtype, to_wire_bytes
from esm2_service.validation import left_out_violation

LAYERED = (pb.INCLUDE_MEAN, pb.INCLUDE_PER_TOKEN, pb.INCLUDE_BOS)
# A rule only this server has, as a server of another version might: the client's own
# check passes such sequences, and the server refuses them.
REFUSED_MOTIF = "QQQQ"
MODEL = pb.ModelInfo(name="esm2_t6_8M_UR50D", checkpoint_sha256="ab" * 32, device="cpu")


def fake_tensor(kind: int, layer: int, length: int) -> np.ndarray:
    """The tensor the fake server sends for a sequence of `length` residues."""
    if kind == pb.INCLUDE_MEAN:
        return np.full(320, length + layer / 8, dtype=np.float32)
    if kind == pb.INCLUDE_PER_TOKEN:
        return np.arange(length * 320, dtype=np.float32).reshape(length, 320) + layer
    if kind == pb.INCLUDE_BOS:
        return np.full(320, -length - layer, dtype=np.float32)
    if kind == pb.INCLUDE_CONTACTS:
        return np.eye(length, dtype=np.float32) * length
    if kind == pb.INCLUDE_LOGITS:
        return np.full((length, 33), length, dtype=np.float32)
    return np.full((20, length, length), length, dtype=np.float32)  # attentions


def predicted_token(length: int) -> str:
    """The top token the fake Predict gives each mask of a `length`-token sequence."""
    return VOCAB_TOKENS[4 + length % 20]


def _interleave(streams: list[list]) -> Iterator:
    """Round-robin over the items' messages, last item first."""
    streams = [list(stream) for stream in reversed(streams)]
    while any(streams):
        for stream in streams:
            if stream:
                yield stream.pop(0)


class FakeEsm2(esm2_pb2_grpc.Esm2ServiceServicer):
    """Streams each item's chunks in reverse, items interleaved, then the completes; the
    packed methods pack those messages as the frontend does (`packed_methods = False`: a
    server from before them, which answers UNIMPLEMENTED)."""

    tensor = staticmethod(fake_tensor)
    predicted_token = staticmethod(predicted_token)

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.drop_last_complete = False
        self.random_weights = False
        self.left_out = 0  # a refusal's count of violations it does not list
        self.requests: list[list[str]] = []
        self.max_in_flight = 0
        self.packed_methods = True
        self.methods: list[str] = []  # every call's method, in order
        # Calls to end CANCELLED, as gRPC ends those that reach a stopping server before a
        # handler takes them (no request id); with one if `cancel_with_request_id`.
        self.calls_to_cancel = 0
        self.cancel_with_request_id = False
        self._in_flight = 0
        self._lock = threading.Lock()

    def Encode(self, request, context):  # noqa: N802 (gRPC method name)
        sequences = self._start(request, context)
        try:
            params = request.params
            layers = [layer + 7 if layer < 0 else layer for layer in params.repr_layers]
            streams = []
            for index, sequence in enumerate(sequences):
                messages = []
                for kind in params.include:
                    for layer in layers if kind in LAYERED else [6]:
                        array = fake_tensor(kind, layer, len(sequence))
                        messages += self._chunks(
                            pb.EncodeResponse, index, kind, layer, array, params.dtype
                        )
                streams.append(messages)
            yield from self._finish(pb.EncodeResponse, streams, [[] for _ in sequences])
        finally:
            self._end()

    def Predict(self, request, context):  # noqa: N802
        sequences = self._start(request, context)
        try:
            streams, tokens = [], []
            for index, sequence in enumerate(sequences):
                tokens.append(split_tokens(sequence))
                logits = np.zeros((tokens[-1].count("<mask>"), 33), dtype=np.float32)
                logits[:, TOKEN_INDEX[predicted_token(len(tokens[-1]))]] = len(tokens[-1])
                streams.append(
                    self._chunks(
                        pb.PredictResponse,
                        index,
                        pb.INCLUDE_LOGITS,
                        0,
                        logits,
                        request.params.dtype,
                    )
                )
            yield from self._finish(pb.PredictResponse, streams, tokens)
        finally:
            self._end()

    def EncodePacked(self, request, context):  # noqa: N802
        yield from self._packed("EncodePacked", pb.EncodePackedResponse, request, context)

    def PredictPacked(self, request, context):  # noqa: N802
        yield from self._packed("PredictPacked", pb.PredictPackedResponse, request, context)

    def _packed(self, method: str, packed_type, request, context) -> Iterator:
        if not self.packed_methods:
            with self._lock:
                self.methods.append(method)
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        plain = self.Encode if packed_type is pb.EncodePackedResponse else self.Predict
        messages = (message.SerializeToString() for message in plain(request, context))
        for packed in pack(messages):
            yield packed_type.FromString(packed)

    def GetStatus(self, request, context):  # noqa: N802
        worker = pb.WorkerStatus(worker_id="w1", model=MODEL, last_seen_unix_s=1.5)
        worker.model.random_weights = self.random_weights
        return pb.GetStatusResponse(
            workers=[worker], queue_depth=3, any_random_weights=self.random_weights
        )

    def _start(self, request, context) -> list[str]:
        sequences = [item.sequence for item in request.items]
        refused = [i for i, sequence in enumerate(sequences) if REFUSED_MOTIF in sequence]
        if refused:
            time.sleep(self.delay_s)
            status = bad_request_status(refused, self.left_out)
            context.abort_with_status(rpc_status.to_status(status))
        with self._lock:
            self.methods.append(type(request).__name__.removesuffix("Request"))
            cancel = self.calls_to_cancel > 0
            self.calls_to_cancel -= cancel
        if cancel:
            if self.cancel_with_request_id:
                context.set_trailing_metadata(((metadata.REQUEST_ID, "r-taken"),))
            context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
        with self._lock:
            self.requests.append(sequences)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        time.sleep(self.delay_s)
        return sequences

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1

    @staticmethod
    def _chunks(response, index, kind, layer, array, dtype) -> list:
        """`response` (EncodeResponse or PredictResponse) messages of one tensor."""
        data = to_wire_bytes(array, dtype)
        chunks = chunk_messages(kind, layer, array.shape, resolve_dtype(dtype), data)
        return [response(sequence_index=index, chunk=chunk) for chunk in chunks][::-1]

    def _finish(self, response, streams, tokens) -> Iterator:
        yield from _interleave(streams)
        last = len(streams) - 1 if self.drop_last_complete else len(streams)
        for index in reversed(range(last)):
            complete = pb.ItemComplete(
                vocab_tokens=VOCAB_TOKENS, sequence_tokens=tokens[index], model=MODEL
            )
            yield response(sequence_index=index, complete=complete)


def bad_request_status(indices: list[int], left_out: int = 0) -> status_pb2.Status:
    """INVALID_ARGUMENT with a BadRequest field violation for each of `indices`, then, if
    `left_out`, the service's count of the violations it did not list."""
    violations = [
        error_details_pb2.BadRequest.FieldViolation(
            field=f"items[{i}].sequence", description=f"holds {REFUSED_MOTIF}"
        )
        for i in indices
    ]
    if left_out:
        rest = left_out_violation(left_out)
        violations.append(
            error_details_pb2.BadRequest.FieldViolation(
                field=rest.field, description=rest.description
            )
        )
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=violations))
    return status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message="invalid request", details=[detail]
    )


@pytest.fixture
def fake_server() -> Iterator[tuple[str, FakeEsm2]]:
    """(target, servicer) of a fake server on 127.0.0.1, default message limits."""
    servicer = FakeEsm2()
    server = grpc.server(ThreadPoolExecutor(max_workers=16))
    esm2_pb2_grpc.add_Esm2ServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


@pytest.fixture
def http1_port() -> Iterator[int]:
    """A port where an HTTP/1 server (as the HTTP door is) listens on 127.0.0.1."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port
    server.shutdown()
    server.server_close()
