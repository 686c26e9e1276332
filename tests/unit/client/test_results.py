"""Assembly of hand-built response streams into EncodeResult / PredictResult."""

from __future__ import annotations

import numpy as np
import pytest

from esm2_service.alphabet import VOCAB_TOKENS
from esm2_service.client import IncompleteResultError, ModelInfo, ResultStreamError
from esm2_service.client.params import (
    EncodeSpec,
    include_value,
    split_batches,
)
from esm2_service.client.results import (
    READ_IN_PLACE_BYTES,
    StreamAssembler,
    encode_result,
    predict_result,
)
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.tensors import to_wire_bytes

MODEL = pb.ModelInfo(name="esm2_t6_8M_UR50D", checkpoint_sha256="cd" * 32, device="cuda")


def chunks(index, kind, layer, array, dtype=pb.DTYPE_FLOAT32, pieces=3) -> list[bytes]:
    """The tensor split into `pieces` roughly equal chunks, in byte order, serialized."""
    data = to_wire_bytes(array, dtype)
    bounds = np.linspace(0, len(data), pieces + 1).astype(int)
    return [
        pb.EncodeResponse(
            sequence_index=index,
            chunk=pb.TensorChunk(
                kind=kind,
                layer=layer,
                offset=int(start),
                tensor=pb.Tensor(dtype=dtype, shape=array.shape, data=data[start:end]),
            ),
        ).SerializeToString()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def complete(index, sequence_tokens=()) -> bytes:
    return pb.EncodeResponse(
        sequence_index=index,
        complete=pb.ItemComplete(
            vocab_tokens=VOCAB_TOKENS, sequence_tokens=sequence_tokens, model=MODEL
        ),
    ).SerializeToString()


def assemble(messages, n_items):
    assembler = StreamAssembler(n_items)
    for message in messages:
        assembler.add(message)
    return assembler.finish()


def test_interleaved_items_and_out_of_order_chunks_reassemble_exactly():
    rng = np.random.default_rng(0)
    mean0, mean1 = rng.standard_normal(320, np.float32), rng.standard_normal(320, np.float32)
    tokens1 = rng.standard_normal((5, 320), np.float32)
    contacts0 = rng.random((4, 4), np.float32)
    a = chunks(0, pb.INCLUDE_MEAN, 6, mean0)
    b = chunks(1, pb.INCLUDE_MEAN, 6, mean1)
    c = chunks(1, pb.INCLUDE_PER_TOKEN, 6, tokens1, pieces=4)
    d = chunks(0, pb.INCLUDE_CONTACTS, 0, contacts0, pieces=2)
    messages = [c[3], a[2], b[1], c[0], d[1], a[0], c[2], b[2], b[0], c[1]]
    messages += [complete(1), a[1], d[0], complete(0)]

    items = assemble(messages, 2)

    assert [item.index for item in items] == [0, 1]
    first = encode_result(items[0], 10, [pb.INCLUDE_MEAN, pb.INCLUDE_CONTACTS], [-1])
    second = encode_result(items[1], 11, [pb.INCLUDE_MEAN, pb.INCLUDE_PER_TOKEN], [6])
    assert first.sequence_index == 10 and second.sequence_index == 11
    np.testing.assert_array_equal(first.embeddings[6], mean0)
    np.testing.assert_array_equal(first.contacts, contacts0)
    np.testing.assert_array_equal(second.embeddings[6], mean1)
    np.testing.assert_array_equal(second.per_token[6], tokens1)
    assert second.per_token[6].dtype == np.float32 and second.per_token[6].shape == (5, 320)
    assert first.per_token == {} and first.logits is None and first.attentions is None
    assert first.vocab_tokens == list(VOCAB_TOKENS)
    assert first.model == ModelInfo("esm2_t6_8M_UR50D", "cd" * 32, False, "cuda")


def test_bfloat16_decodes_to_float32_with_round_to_nearest():
    values = np.array([[1.5, -2.0, 0.15625], [0.1, 3.0e38, -0.0]], dtype=np.float32)
    items = assemble(
        chunks(0, pb.INCLUDE_LOGITS, 0, values, pb.DTYPE_BFLOAT16, pieces=2) + [complete(0)], 1
    )
    logits = encode_result(items[0], 0, [pb.INCLUDE_LOGITS], [-1]).logits

    assert logits.dtype == np.float32 and logits.shape == (2, 3)
    np.testing.assert_array_equal(logits[0], [1.5, -2.0, 0.15625])
    assert logits[1, 0] == np.float32(0.10009765625)  # 0.1 rounded to 8 mantissa bits
    assert abs(logits[1, 1] - 3.0e38) / 3.0e38 < 2**-8


def test_float16_decodes_to_float16():
    values = np.array([0.5, -1.25, 65504.0, 1e-3], dtype=np.float32)
    items = assemble(
        chunks(0, pb.INCLUDE_BOS, 3, values, pb.DTYPE_FLOAT16, pieces=2) + [complete(0)], 1
    )
    bos = encode_result(items[0], 0, [pb.INCLUDE_BOS], [3]).bos

    assert list(bos) == [3]
    assert bos[3].dtype == np.float16
    np.testing.assert_array_equal(bos[3], values.astype(np.float16))


def test_large_chunks_read_in_place_reassemble_exactly_into_writable_arrays():
    tokens = np.random.default_rng(1).standard_normal((340, 320), np.float32)  # 435 KB
    messages = chunks(0, pb.INCLUDE_PER_TOKEN, 6, tokens, pieces=3)
    assert min(map(len, messages)) >= READ_IN_PLACE_BYTES
    whole = chunks(1, pb.INCLUDE_PER_TOKEN, 6, tokens, pieces=1)
    items = assemble(messages[::-1] + whole + [complete(1), complete(0)], 2)

    for item in items:
        array = encode_result(item, 0, [pb.INCLUDE_PER_TOKEN], [6]).per_token[6]
        np.testing.assert_array_equal(array, tokens)
        array[0, 0] = 7.0  # the caller's to change
        assert array[0, 0] == 7.0


def test_incomplete_tensor_at_item_complete_raises():
    parts = chunks(0, pb.INCLUDE_MEAN, 6, np.ones(320, np.float32), pieces=3)
    assembler = StreamAssembler(1)
    for message in (parts[0], parts[2]):
        assembler.add(message)

    message = r"item 0: mean layer 6 incomplete at the item's ItemComplete \(of 1280 bytes\)"
    with pytest.raises(IncompleteResultError, match=message):
        assembler.add(complete(0))


def test_stream_ending_before_an_item_completes_raises():
    messages = chunks(0, pb.INCLUDE_MEAN, 6, np.ones(320, np.float32)) + [complete(0)]
    messages += chunks(2, pb.INCLUDE_MEAN, 6, np.ones(320, np.float32))

    with pytest.raises(IncompleteResultError, match=r"stream ended before items \[1, 2\]"):
        assemble(messages, 3)


def test_missing_requested_layer_raises():
    items = assemble(chunks(0, pb.INCLUDE_MEAN, 6, np.ones(320, np.float32)) + [complete(0)], 1)

    with pytest.raises(IncompleteResultError, match="item 0: no mean tensor for layer 0"):
        encode_result(items[0], 0, [pb.INCLUDE_MEAN], [-1, 0])
    with pytest.raises(IncompleteResultError, match="item 0: no attentions tensor"):
        encode_result(items[0], 0, [pb.INCLUDE_MEAN, pb.INCLUDE_ATTENTIONS], [-1])


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (complete(5), "sequence_index 5 outside the request's 2 items"),
        (pb.EncodeResponse(sequence_index=0).SerializeToString(), "neither chunk nor complete"),
        (b"\x12\x05\x08", "a response that does not parse"),
    ],
)
def test_contract_violations_raise(message, error):
    with pytest.raises(ResultStreamError, match=error):
        StreamAssembler(2).add(message)


def test_message_after_item_complete_raises():
    assembler = StreamAssembler(1)
    assembler.add(complete(0))

    with pytest.raises(ResultStreamError, match="item 0: message after its ItemComplete"):
        assembler.add(chunks(0, pb.INCLUDE_MEAN, 6, np.ones(320, np.float32))[0])


def test_chunks_disagreeing_on_shape_raise():
    first = chunks(0, pb.INCLUDE_MEAN, 6, np.ones(320, np.float32))[0]
    other = chunks(0, pb.INCLUDE_MEAN, 6, np.ones(321, np.float32))[1]
    assembler = StreamAssembler(1)
    assembler.add(first)

    with pytest.raises(ResultStreamError, match="item 0 mean layer 6: bad chunk"):
        assembler.add(other)


def test_predict_result_names_masks_and_top_tokens():
    logits = np.zeros((2, 33), np.float32)
    logits[0, VOCAB_TOKENS.index("K")] = 4.0
    logits[1, VOCAB_TOKENS.index("W")] = 2.0
    tokens = ["M", "<mask>", "V", "<mask>"]
    items = assemble(chunks(0, pb.INCLUDE_LOGITS, 0, logits) + [complete(0, tokens)], 1)

    result = predict_result(items[0], 7)

    assert result.sequence_index == 7
    assert result.sequence_tokens == tokens
    assert result.mask_positions == [1, 3]
    assert result.predicted_tokens == ["K", "W"]
    np.testing.assert_array_equal(result.logits, logits)


def test_predicted_tokens_are_standard_amino_acids_whatever_else_scores_higher():
    logits = np.full((3, 33), -9.0, np.float32)
    for row, (beaten, residue) in enumerate((("<eos>", "A"), ("<cls>", "C"), ("X", "Y"))):
        logits[row, VOCAB_TOKENS.index(beaten)] = 5.0
        logits[row, VOCAB_TOKENS.index("<pad>")] = 4.0
        logits[row, VOCAB_TOKENS.index("-")] = 3.0
        logits[row, VOCAB_TOKENS.index(residue)] = 1.0
    tokens = ["<mask>", "M", "<mask>", "<mask>"]
    items = assemble(chunks(0, pb.INCLUDE_LOGITS, 0, logits) + [complete(0, tokens)], 1)

    assert predict_result(items[0], 0).predicted_tokens == ["A", "C", "Y"]


def test_predict_result_without_logits_raises():
    with pytest.raises(IncompleteResultError, match="item 0: no logits tensor"):
        predict_result(assemble([complete(0)], 1)[0], 0)


def test_split_into_requests_of_eight_keeps_global_positions():
    sequences = [f"S{i}" for i in range(19)]
    batches = split_batches(sequences, 8)
    assert [(offset, len(items)) for offset, items in batches] == [(0, 8), (8, 8), (16, 3)]
    assert [sequence for _, items in batches for sequence in items] == sequences

    spec = EncodeSpec.parse(["logits"], [-1], "float32")
    results = []
    for offset, items in reversed(batches):  # requests finishing in any order
        messages = []
        for index in reversed(range(len(items))):
            logits = np.full((1, 33), offset + index, np.float32)
            messages += chunks(index, pb.INCLUDE_LOGITS, 0, logits) + [complete(index)]
        assembled = assemble(messages, len(items))
        results += [spec.result(item, offset + item.index) for item in assembled]
    results.sort(key=lambda result: result.sequence_index)
    assert [result.sequence_index for result in results] == list(range(19))
    assert [result.logits[0, 0] for result in results] == list(range(19))


def test_encode_spec_defaults_and_names():
    spec = EncodeSpec.parse([], [], "bfloat16")
    assert spec == EncodeSpec((pb.INCLUDE_MEAN,), (-1,), pb.DTYPE_BFLOAT16)
    assert EncodeSpec.parse("contacts", 0, "float16").include == (pb.INCLUDE_CONTACTS,)
    request = EncodeSpec.parse(["per_token", "logits"], [0, -1], "float32").request(["MK"])
    assert list(request.params.include) == [pb.INCLUDE_PER_TOKEN, pb.INCLUDE_LOGITS]
    assert list(request.params.repr_layers) == [0, -1]
    assert [item.sequence for item in request.items] == ["MK"]


def test_unknown_include_and_dtype_names_are_refused():
    with pytest.raises(ValueError, match=r"unknown include 'embeddings'; valid: mean, per_token"):
        include_value("embeddings")
    spec = EncodeSpec.parse(["mean", "means"], [-1], "fp8")
    assert spec.include == (pb.INCLUDE_MEAN,)
    assert [(v.field, v.description) for v in spec.unknown_names] == [
        (
            "params.include[1]",
            "unknown output 'means'; valid: mean, per_token, bos, contacts, logits, attentions",
        ),
        ("params.dtype", "unknown dtype 'fp8'; valid: float32, float16, bfloat16"),
    ]
