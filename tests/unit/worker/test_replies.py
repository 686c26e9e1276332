"""The reply writer's completion messages: protobuf's own bytes, built from a cached part."""

from __future__ import annotations

import redis

from esm2_service.alphabet import VOCAB_TOKENS, split_tokens
from esm2_service.esm2.internal.v1 import queue_pb2 as qpb
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.worker.direct_connection import DirectConnection
from esm2_service.worker.replies import ReplyWriter

MODEL = pb.ModelInfo(name="esm2_t6_8M_UR50D", device="cpu", precision="fp32")


def _completion(task: int, index: int) -> bytes:
    client = redis.Redis(port=1)  # never connected: completions are only buffered here
    writer = ReplyWriter(
        client,
        DirectConnection(client),
        MODEL,
        result_ttl_s=60,
        max_reply_chunks=8,
        reader_stall_s=1.0,
    )
    item = qpb.QueueItem(request_id="r", sequence_index=index, task=task, sequence="MK<mask>A")
    writer.complete(item, predict=task == qpb.TASK_PREDICT)
    ((_, field, value, piece),) = writer._buffer
    assert field == b"chunk" and piece == str(index).encode()
    return value


def test_an_encode_completion_is_protobufs_serialization():
    for index in (0, 1, 7, 200):
        done = pb.ItemComplete(vocab_tokens=VOCAB_TOKENS, model=MODEL)
        expected = pb.EncodeResponse(sequence_index=index, complete=done).SerializeToString()
        assert _completion(qpb.TASK_ENCODE, index) == expected


def test_a_predict_completion_names_the_sequence_tokens():
    message = pb.PredictResponse.FromString(_completion(qpb.TASK_PREDICT, 3))
    assert message.sequence_index == 3
    assert list(message.complete.sequence_tokens) == split_tokens("MK<mask>A")
    assert list(message.complete.vocab_tokens) == list(VOCAB_TOKENS)
    assert message.complete.model == MODEL
