"""The shared contract: generated code, alphabet, packed-tensor codec, import boundaries."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from esm2_service import alphabet, tensors
from esm2_service.esm2.v1 import esm2_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_protos():
    sys.path.insert(0, str(ROOT / "protos"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    assert generate.stale_files() == []


@pytest.mark.parametrize(
    ("packed", "plain"),
    [(pb.EncodePackedRequest, pb.EncodeRequest), (pb.PredictPackedRequest, pb.PredictRequest)],
)
def test_packed_methods_take_the_plain_requests_bytes(packed, plain):
    """Clients send a plain request's bytes to the packed methods; a packed response is
    its responses as field 1, as `server.packing` writes it."""

    def fields(message):
        return [
            (f.name, f.number, f.type, f.is_repeated, f.message_type and f.message_type.full_name)
            for f in message.DESCRIPTOR.fields
        ]

    assert fields(packed) == fields(plain)
    response = packed.DESCRIPTOR.name.replace("Request", "Response")
    (responses,) = pb.DESCRIPTOR.message_types_by_name[response].fields
    assert (responses.name, responses.number, responses.is_repeated) == ("responses", 1, True)
    assert responses.message_type.name == plain.DESCRIPTOR.name.replace("Request", "Response")


def test_generated_code_check_fails_when_a_proto_changes(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "protos"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    changed = tmp_path / "esm2" / "v1"
    changed.mkdir(parents=True)
    (tmp_path / "esm2" / "internal" / "v1").mkdir(parents=True)
    for name in generate.PROTO_FILES:
        text = (ROOT / "protos" / name).read_text()
        (tmp_path / name).write_text(
            text.replace("message GetStatusRequest {}", "message GetStatusRequest { int32 x = 1; }")
        )
    monkeypatch.setattr(generate, "PROTO_ROOT", tmp_path)
    assert "esm2/v1/esm2_pb2.py" in generate.stale_files()


def test_alphabet_matches_fair_esm():
    import esm

    reference = esm.data.Alphabet.from_architecture("ESM-1b")
    assert list(alphabet.VOCAB_TOKENS) == reference.all_toks
    assert (
        reference.cls_idx,
        reference.eos_idx,
        reference.padding_idx,
        reference.mask_idx,
    ) == (alphabet.CLS_INDEX, alphabet.EOS_INDEX, alphabet.PAD_INDEX, alphabet.MASK_INDEX)
    sequence = "MK<mask>X-BUZO"
    _, _, tokens = reference.get_batch_converter()([("s", sequence)])
    assert tokens[0].tolist() == alphabet.encode_tokens(alphabet.split_tokens(sequence))


@pytest.mark.parametrize(
    "sequence", ["MKTAYIAKQR", "ACDEFGHIKLMNPQRSTVWYXBUZO-.", "MK<mask>X-BUZO", "<mask>"]
)
def test_token_ids_match_fair_esms_batch_converter(sequence):
    import esm

    converter = esm.data.Alphabet.from_architecture("ESM-1b").get_batch_converter()
    _, _, tokens = converter([("s", sequence)])
    assert alphabet.token_ids(sequence) == tuple(tokens[0].tolist())


@pytest.mark.parametrize("sequence", ["MK<", "MKé", "MKa", "M<mas", "A<mask>a"])
def test_token_ids_refuse_what_is_not_a_token_on_either_path(sequence):
    with pytest.raises(KeyError):
        alphabet.token_ids(sequence)


def test_split_tokens_keeps_mask_whole():
    assert alphabet.split_tokens("A<mask>C") == ["A", "<mask>", "C"]
    assert alphabet.split_tokens("<mas") == ["<", "m", "a", "s"]


@pytest.mark.parametrize(
    "dtype, numpy_dtype", [(pb.DTYPE_FLOAT32, np.float32), (pb.DTYPE_FLOAT16, np.float16)]
)
def test_codec_round_trips_float32_and_float16(dtype, numpy_dtype):
    array = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    decoded = _round_trip(array, dtype)
    assert decoded.dtype == numpy_dtype
    np.testing.assert_array_equal(decoded, array.astype(numpy_dtype))


def test_codec_bfloat16_rounds_to_nearest_even_and_decodes_to_float32():
    values = np.array([1.0, 1.00390625, 1.01171875, -2.5, np.inf, 3.0e38], dtype=np.float32)
    decoded = _round_trip(values, pb.DTYPE_BFLOAT16)
    assert decoded.dtype == np.float32
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even mantissa wins (1.0).
    np.testing.assert_array_equal(decoded[:5], [1.0, 1.0, 1.015625, -2.5, np.inf])
    assert np.isnan(_round_trip(np.array([np.nan], np.float32), pb.DTYPE_BFLOAT16)[0])


def test_codec_splits_large_tensors_under_the_default_grpc_limit():
    array = np.arange(3 * 1024 * 1024, dtype=np.float32)  # 12 MiB
    data = tensors.to_wire_bytes(array, pb.DTYPE_FLOAT32)
    chunks = list(
        tensors.chunk_messages(pb.INCLUDE_ATTENTIONS, 6, array.shape, pb.DTYPE_FLOAT32, data)
    )
    assert len(chunks) == 4
    for chunk in chunks:
        message = pb.EncodeResponse(sequence_index=7, chunk=chunk)
        assert message.ByteSize() < 4 * 1024 * 1024
    assembler = tensors.TensorAssembler(pb.DTYPE_FLOAT32, array.shape)
    for chunk in reversed(chunks):  # any order
        assembler.add(chunk)
    np.testing.assert_array_equal(assembler.array(), array)


@pytest.mark.parametrize(
    ("shape", "dtype", "sequence_index", "offset"),
    [
        ((342, 320), pb.DTYPE_FLOAT32, 5, 0),
        ((320,), pb.DTYPE_UNSPECIFIED, 0, 0),  # index 0 and dtype 0: fields left out
        ((1024, 2048), pb.DTYPE_FLOAT16, 7, 123_456),  # 4 MiB: two chunks
        ((0, 320), pb.DTYPE_FLOAT32, 1, 0),  # no bytes: no data field
        ((3, 3), pb.DTYPE_BFLOAT16, 300, 2**40),  # multi-byte varints
    ],
)
def test_serialized_chunk_responses_are_protobufs_own_bytes(shape, dtype, sequence_index, offset):
    """The worker writes responses built around the tensor bytes (one copy of them):
    byte for byte what protobuf serializes, and what either response type parses."""
    size = int(np.prod(shape)) * tensors.element_size(dtype)
    data = np.random.default_rng(0).bytes(size)
    expected = [
        (chunk.offset, pb.EncodeResponse(sequence_index=sequence_index, chunk=chunk))
        for chunk in tensors.chunk_messages(pb.INCLUDE_PER_TOKEN, 6, shape, dtype, data, offset)
    ]
    built = list(
        tensors.serialized_chunk_responses(
            sequence_index, pb.INCLUDE_PER_TOKEN, 6, shape, dtype, data, offset
        )
    )
    assert built == [(at, message.SerializeToString()) for at, message in expected]
    for _, message in built:
        predict = pb.PredictResponse.FromString(message)
        assert predict.sequence_index == sequence_index and predict.chunk.layer == 6


def test_assembler_refuses_incomplete_or_foreign_chunks():
    data = tensors.to_wire_bytes(np.ones((2, 2), np.float32), pb.DTYPE_FLOAT32)
    (first,) = tensors.chunk_messages(pb.INCLUDE_CONTACTS, 0, (2, 2), pb.DTYPE_FLOAT32, data[:8])
    assembler = tensors.TensorAssembler(pb.DTYPE_FLOAT32, (2, 2))
    assembler.add(first)
    with pytest.raises(ValueError, match="incomplete: 8 of 16 bytes"):
        assembler.array()
    (wrong_shape,) = tensors.chunk_messages(pb.INCLUDE_CONTACTS, 0, (4,), pb.DTYPE_FLOAT32, data)
    with pytest.raises(ValueError, match="disagrees"):
        assembler.add(wrong_shape)
    assembler.add(first)  # a duplicate chunk does not fill the gap after it
    assert not assembler.complete
    (beyond,) = tensors.chunk_messages(
        pb.INCLUDE_CONTACTS, 0, (2, 2), pb.DTYPE_FLOAT32, data, offset=8
    )
    with pytest.raises(ValueError, match="outside tensor"):
        assembler.add(beyond)


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("esm2_service.server.main", ("torch", "esm")),
        ("esm2_service.client", ("torch", "redis", "esm")),
        (
            "esm2_service.client.cli",
            ("torch", "redis", "esm", "google.rpc", "grpc_status", "esm2_service.server"),
        ),
        ("esm2_service.worker.queue_loop", ("torch",)),
    ],
)
def test_import_boundaries(module, forbidden):
    code = f"import sys, {module}; print(sorted(m for m in {forbidden!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def _round_trip(array: np.ndarray, dtype: int) -> np.ndarray:
    data = tensors.to_wire_bytes(array, dtype)
    assembler = tensors.TensorAssembler(dtype, array.shape)
    for chunk in tensors.chunk_messages(pb.INCLUDE_MEAN, 6, array.shape, dtype, data):
        assembler.add(chunk)
    return assembler.array()


def test_the_client_distribution_needs_neither_torch_nor_redis():
    """grpcio, protobuf and numpy for the client; h5py and tqdm for `esm2 encode`'s HDF5
    output and progress bar (issue 13 asks for a well-kept progress library)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ \[]", requirement)[0] for requirement in project["dependencies"]}
    assert names == {"grpcio", "protobuf", "numpy", "h5py", "tqdm"}


def test_the_frontend_registers_every_streaming_method_with_its_request():
    from esm2_service.server.handlers import _STREAMS

    service = pb.DESCRIPTOR.services_by_name["Esm2Service"]
    streams = {m.name: m.input_type.full_name for m in service.methods if m.server_streaming}
    assert {name: request.DESCRIPTOR.full_name for name, request in _STREAMS} == streams
