"""Esm2Client and AsyncEsm2Client end to end against the fake server on loopback."""

from __future__ import annotations

import grpc
import grpc.aio
import numpy as np
import pytest

from esm2_service.alphabet import VOCAB_TOKENS
from esm2_service.client import (
    AsyncEsm2Client,
    Esm2Client,
    IncompleteResultError,
    InvalidArgumentError,
    ServiceUnreachableError,
    field_violations,
)
from esm2_service.client.client import _planned_score_requests
from esm2_service.esm2.v1 import esm2_pb2 as pb

ALL = ("mean", "per_token", "bos", "contacts", "logits", "attentions")
SEQUENCES = ["A" * (n + 1) for n in range(19)]  # distinct lengths tell results apart


def check_encode_results(results, sequences, fake_tensor) -> None:
    assert [result.sequence_index for result in results] == list(range(len(sequences)))
    for result, sequence in zip(results, sequences, strict=True):
        length = len(sequence)
        assert sorted(result.embeddings) == [0, 6]
        expected = [
            (result.embeddings, pb.INCLUDE_MEAN, 6),
            (result.embeddings, pb.INCLUDE_MEAN, 0),
            (result.per_token, pb.INCLUDE_PER_TOKEN, 0),
            (result.bos, pb.INCLUDE_BOS, 6),
        ]
        for arrays, kind, layer in expected:
            np.testing.assert_array_equal(arrays[layer], fake_tensor(kind, layer, length))
        assert result.contacts.shape == (length, length) and result.contacts[0, 0] == length
        assert result.logits.shape == (length, 33)
        assert result.attentions.shape == (20, length, length)
        assert result.vocab_tokens == list(VOCAB_TOKENS)
        assert result.model.name == "esm2_t6_8M_UR50D"


def test_long_lists_split_into_requests_of_eight_in_input_order(fake_server):
    target, servicer = fake_server
    with Esm2Client(target) as client:
        results = client.encode(SEQUENCES, include=ALL, repr_layers=[-1, 0])

    check_encode_results(results, SEQUENCES, servicer.tensor)
    assert sorted(len(request) for request in servicer.requests) == [3, 8, 8]
    assert sorted(sum(servicer.requests, [])) == sorted(SEQUENCES)


def test_requests_in_flight_are_bounded_by_max_concurrency(fake_server):
    target, servicer = fake_server
    servicer.delay_s = 0.2
    with Esm2Client(target, max_concurrency=2, batch_size=2) as client:
        results = client.encode(SEQUENCES[:10])

    assert [len(request) for request in servicer.requests] == [2] * 5
    assert servicer.max_in_flight == 2
    assert [result.embeddings[6][0] for result in results] == [n + 1.75 for n in range(10)]


def test_tensor_over_four_mib_arrives_through_default_limits(fake_server):
    target, servicer = fake_server
    sequence = "M" * 260  # attentions: 20 * 260 * 260 * 4 bytes = 5.4 MB
    with Esm2Client(target) as client:
        (result,) = client.encode([sequence], include=["attentions"])

    assert result.attentions.shape == (20, 260, 260)
    expected = servicer.tensor(pb.INCLUDE_ATTENTIONS, 6, 260)
    np.testing.assert_array_equal(result.attentions, expected)
    assert result.embeddings == {}


def test_float16_and_bfloat16_results(fake_server):
    target, _ = fake_server
    with Esm2Client(target) as client:
        (half,) = client.encode(["MKV"], include=["bos"], dtype="float16")
        (brain,) = client.encode(["MKV"], include=["bos"], dtype="bfloat16")

    assert half.bos[6].dtype == np.float16 and half.bos[6][0] == -9.0
    assert brain.bos[6].dtype == np.float32 and brain.bos[6][0] == -9.0


def test_predict_returns_masks_in_input_order(fake_server):
    target, servicer = fake_server
    sequences = ["M" * n + "<mask>" + "K<mask>" for n in range(10)]
    with Esm2Client(target) as client:
        results = client.predict(sequences)

    assert [result.sequence_index for result in results] == list(range(10))
    for n, result in enumerate(results):
        assert result.mask_positions == [n, n + 2]
        assert result.predicted_tokens == [servicer.predicted_token(n + 3)] * 2
        assert result.logits.shape == (2, 33)


def test_empty_list_makes_no_call():
    with Esm2Client("127.0.0.1:1") as client:  # nothing listens there
        assert client.encode([]) == []
        assert client.predict([]) == []


def test_a_lone_string_is_refused(fake_server):
    with Esm2Client(fake_server[0]) as client, pytest.raises(TypeError, match="not one string"):
        client.encode("MKV")


def test_invalid_input_anywhere_in_a_long_list_is_named_before_any_request(fake_server):
    target, servicer = fake_server
    sequences = ["MKV"] * 30
    sequences[3], sequences[27] = "MKj", "MK<mask>"
    with Esm2Client(target) as client, pytest.raises(grpc.RpcError) as caught:
        client.encode(sequences, repr_layers=[9])

    error = caught.value
    assert isinstance(error, InvalidArgumentError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in field_violations(error)] == [
        "items[3].sequence",
        "items[27].sequence",
        "params.repr_layers[0]",
    ]
    assert "items[3].sequence: character 'j' at position 3" in error.details()
    assert servicer.requests == []


def test_an_unknown_output_name_is_an_invalid_argument_beside_every_other_violation(fake_server):
    target, servicer = fake_server
    with Esm2Client(target) as client, pytest.raises(InvalidArgumentError) as caught:
        client.encode(["MKV", "MK1"], include=["mean", "means"], repr_layers=[9], dtype="fp8")

    # The fields and wording of the service (and of its HTTP door, for the names).
    assert caught.value.violations == [
        (
            "items[1].sequence",
            "character '1' at position 3 is not accepted (accepted: ACDEFGHIKLMNPQRSTVWY, "
            "XBUZO, '-')",
        ),
        ("params.repr_layers[0]", "layer 9 is outside -7..6"),
        (
            "params.include[1]",
            "unknown output 'means'; valid: mean, per_token, bos, contacts, logits, attentions",
        ),
        ("params.dtype", "unknown dtype 'fp8'; valid: float32, float16, bfloat16"),
    ]
    with Esm2Client(target) as client, pytest.raises(InvalidArgumentError) as caught:
        client.predict([], dtype="float64")
    assert [field for field, _ in caught.value.violations] == ["params.dtype"]
    assert servicer.requests == []


def test_lowercase_residues_are_accepted_and_sent_uppercased(fake_server):
    target, servicer = fake_server
    with Esm2Client(target) as client:
        client.encode(["mktayiak"])
        (predicted,) = client.predict(["mk<mask>ay"])

    assert servicer.requests == [["MKTAYIAK"], ["MK<mask>AY"]]
    assert predicted.sequence_tokens == ["M", "K", "<mask>", "A", "Y"]
    ((_, request),) = _planned_score_requests("mktayiak", ["M1A", "K2G"], False, "wt_marginal")
    assert request.wild_type == "MKTAYIAK"


def test_a_target_where_nothing_listens_is_named_with_what_to_check():
    with Esm2Client("127.0.0.1:1", timeout_s=10) as client:
        for call in (client.status, lambda: client.encode(["MKV"])):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert isinstance(caught.value, ServiceUnreachableError)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert str(caught.value).startswith("cannot reach the service at 127.0.0.1:1: ")
            assert "is `esm2 serve`" in str(caught.value)


def test_an_http1_port_is_named_as_not_grpc(http1_port):
    target = f"127.0.0.1:{http1_port}"
    with (
        Esm2Client(target, timeout_s=10) as client,
        pytest.raises(ServiceUnreachableError, match="speaks HTTP/1, not gRPC"),
    ):
        client.predict(["M<mask>"])


async def test_the_async_client_names_an_unreachable_target():
    async with AsyncEsm2Client("127.0.0.1:1", timeout_s=10) as client:
        with pytest.raises(grpc.aio.AioRpcError, match="cannot reach the service at 127.0.0.1:1"):
            await client.encode(["MKV"])


def twenty_with_3_and_17_refused() -> list[str]:
    """20 sequences (three requests) of which the fake server refuses items 3 and 17."""
    sequences = [f"MK{'A' * i}" for i in range(20)]
    sequences[3] += "QQQQ"
    sequences[17] += "QQQQ"
    return sequences


def test_server_refusals_of_every_request_are_merged_in_the_callers_numbering(fake_server):
    target, servicer = fake_server
    servicer.delay_s = 0.3  # the three requests are all in flight before any refusal
    sequences = twenty_with_3_and_17_refused()
    with Esm2Client(target) as client, pytest.raises(InvalidArgumentError) as caught:
        client.encode(sequences)

    assert caught.value.violations == [
        ("items[3].sequence", "holds QQQQ"),
        ("items[17].sequence", "holds QQQQ"),
    ]
    assert servicer.requests == [sequences[8:16]]  # the valid request ran


def test_a_servers_count_of_unlisted_violations_survives_renumbering_and_merging(fake_server):
    target, servicer = fake_server
    servicer.delay_s = 0.3  # the three requests are all in flight before any refusal
    servicer.left_out = 250  # each refusal says it lists only some of its violations
    sequences = twenty_with_3_and_17_refused()
    with Esm2Client(target) as client, pytest.raises(InvalidArgumentError) as caught:
        client.encode(sequences)

    assert caught.value.violations == [
        ("items[3].sequence", "holds QQQQ"),
        ("items[17].sequence", "holds QQQQ"),
        ("request", "and 500 more violations, not listed"),
    ]
    assert caught.value.details().endswith("holds QQQQ (and 500 more)")


def test_stream_without_an_items_complete_raises(fake_server):
    target, servicer = fake_server
    servicer.drop_last_complete = True
    with Esm2Client(target) as client, pytest.raises(IncompleteResultError, match=r"items \[2\]"):
        client.encode(["M", "MK", "MKV"])


def test_status_returns_the_response(fake_server):
    target, servicer = fake_server
    servicer.random_weights = True
    with Esm2Client(target, timeout_s=5.0, metadata=[("x-user", "test")]) as client:
        status = client.status()

    assert isinstance(status, pb.GetStatusResponse)
    assert status.queue_depth == 3 and status.any_random_weights
    assert [worker.worker_id for worker in status.workers] == ["w1"]


def test_invalid_client_settings_are_refused():
    with pytest.raises(ValueError, match="batch_size must be 1 to 8, got 9"):
        Esm2Client("127.0.0.1:1", batch_size=9)
    with pytest.raises(ValueError, match="max_concurrency must be at least 1, got 0"):
        Esm2Client("127.0.0.1:1", max_concurrency=0)


async def test_async_client_splits_orders_and_bounds_concurrency(fake_server):
    target, servicer = fake_server
    servicer.delay_s = 0.1
    async with AsyncEsm2Client(target, max_concurrency=2) as client:
        results = await client.encode(SEQUENCES, include=ALL, repr_layers=(-1, 0))
        predictions = await client.predict(["<mask>" * n for n in range(1, 11)])
        status = await client.status()
        assert await client.encode([]) == []

    check_encode_results(results, SEQUENCES, servicer.tensor)
    assert servicer.max_in_flight == 2
    assert [len(result.mask_positions) for result in predictions] == list(range(1, 11))
    assert status.queue_depth == 3


async def test_async_invalid_input_and_refusals_name_the_callers_items(fake_server):
    target, servicer = fake_server
    servicer.delay_s = 0.3
    async with AsyncEsm2Client(target) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            await client.predict(["<mask>"] * 12 + ["!<mask>"])
        assert field_violations(caught.value)[0][0] == "items[12].sequence"

        with pytest.raises(InvalidArgumentError) as caught:
            await client.predict(["<mask>"] * 12 + ["QQQQ<mask>", "<mask>QQQQ"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in caught.value.violations] == [
        "items[12].sequence",
        "items[13].sequence",
    ]


def test_results_come_packed_and_a_server_without_packed_methods_gets_plain_calls(fake_server):
    target, servicer = fake_server
    with Esm2Client(target) as client:
        packed = client.encode(SEQUENCES[:3], include=ALL, repr_layers=[-1, 0])
    assert servicer.methods == ["EncodePacked"]

    servicer.packed_methods = False  # a server of a version before them
    servicer.methods.clear()
    with Esm2Client(target, max_concurrency=1) as client:
        plain = client.encode(SEQUENCES, include=ALL, repr_layers=[-1, 0])
        predictions = client.predict(["M<mask>"])

    # One packed call is refused; it and every later call go plain.
    assert servicer.methods == ["EncodePacked", "Encode", "Encode", "Encode", "Predict"]
    check_encode_results(packed, SEQUENCES[:3], servicer.tensor)
    check_encode_results(plain, SEQUENCES, servicer.tensor)
    assert predictions[0].predicted_tokens == [servicer.predicted_token(2)]


async def test_the_async_client_falls_back_to_plain_calls_as_the_sync_one_does(fake_server):
    target, servicer = fake_server
    servicer.packed_methods = False
    async with AsyncEsm2Client(target, max_concurrency=1) as client:
        results = await client.encode(SEQUENCES[:9], include=ALL, repr_layers=[-1, 0])
        predictions = await client.predict(["MK<mask>"])

    assert servicer.methods == ["EncodePacked", "Encode", "Encode", "Predict"]
    check_encode_results(results, SEQUENCES[:9], servicer.tensor)
    assert predictions[0].predicted_tokens == [servicer.predicted_token(3)]

    servicer.methods.clear()
    servicer.packed_methods = True
    async with AsyncEsm2Client(target) as client:
        await client.predict(["MK<mask>"])
    assert servicer.methods == ["PredictPacked"]
