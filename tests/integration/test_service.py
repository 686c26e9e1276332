"""End to end: client -> gRPC frontend -> Redis -> worker -> client, all real processes."""

from __future__ import annotations

import asyncio
import concurrent.futures

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from queue_helpers import last_generated_ids
from support import assert_close, bad_request_fields, fair_esm_outputs

from esm2_service.alphabet import VOCAB_TOKENS
from esm2_service.client import AsyncEsm2Client, Esm2Client
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.esm2.v1 import esm2_pb2_grpc

ALL = ["mean", "per_token", "bos", "contacts", "logits", "attentions"]


@pytest.fixture(scope="module")
def client(service):
    with Esm2Client(service.target, timeout_s=120) as client:
        yield client


def test_encode_returns_every_output_equal_to_fair_esm(client, tiny_reference):
    sequences = ["MKTAYIAKQRQISFVKSHFSRQ", "ACDEFGHIKLMNPQRSTVWYXBUZO-", "M"]
    results = client.encode(sequences, include=ALL, repr_layers=[-1, 0, 3])
    assert [r.sequence_index for r in results] == [0, 1, 2]
    for result, sequence in zip(results, sequences, strict=True):
        expected = fair_esm_outputs(tiny_reference, sequence)
        assert sorted(result.embeddings) == [0, 3, 6]
        for layer in (0, 3, 6):
            assert_close(result.embeddings[layer], expected["mean"][layer], what="mean")
            assert_close(result.per_token[layer], expected["per_token"][layer], what="per_token")
            assert_close(result.bos[layer], expected["bos"][layer], what="bos")
        assert_close(result.contacts, expected["contacts"], what="contacts")
        assert_close(result.logits, expected["logits"], what="logits")
        assert_close(result.attentions, expected["attentions"], what="attentions")
        assert result.vocab_tokens == list(VOCAB_TOKENS)
        assert result.model.random_weights is True


def test_encode_default_is_the_mean_of_the_last_layer_only(client, tiny_reference):
    (result,) = client.encode(["MKTAYIAK"])
    assert list(result.embeddings) == [6]
    assert result.per_token == {} and result.bos == {}
    assert result.contacts is None and result.logits is None and result.attentions is None
    assert_close(result.embeddings[6], fair_esm_outputs(tiny_reference, "MKTAYIAK")["mean"][6])


def test_predict_returns_mask_logits_and_tokens(client, tiny_reference):
    sequences = ["ACD<mask>FGHI", "MN<mask>P<mask>RST"]
    results = client.predict(sequences)
    for result, sequence in zip(results, sequences, strict=True):
        expected = fair_esm_outputs(tiny_reference, sequence)["mask_logits"]
        assert result.logits.shape == (sequence.count("<mask>"), 33)
        assert_close(result.logits, expected)
        assert result.vocab_tokens == list(VOCAB_TOKENS)
    assert results[1].sequence_tokens == ["M", "N", "<mask>", "P", "<mask>", "R", "S", "T"]


def test_half_precision_outputs(client):
    (f32,) = client.encode(["MKTAYIAKQR"], include=["per_token"])
    (f16,) = client.encode(["MKTAYIAKQR"], include=["per_token"], dtype="float16")
    (bf16,) = client.encode(["MKTAYIAKQR"], include=["per_token"], dtype="bfloat16")
    assert f16.per_token[6].dtype == np.float16
    assert bf16.per_token[6].dtype == np.float32
    np.testing.assert_allclose(f16.per_token[6], f32.per_token[6], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(bf16.per_token[6], f32.per_token[6], rtol=1e-2, atol=1e-2)


def test_long_lists_are_split_into_concurrent_requests_in_input_order(client, tiny_reference):
    sequences = ["M" * (1 + (i * 7) % 40) + "K" * i for i in range(19)]
    results = client.encode(sequences, include=["mean"])
    assert [r.sequence_index for r in results] == list(range(19))
    for result, sequence in zip(results, sequences, strict=True):
        assert_close(result.embeddings[6], fair_esm_outputs(tiny_reference, sequence)["mean"][6])


def test_items_batched_across_concurrent_requests_match_fair_esm_alone(service, tiny_reference):
    lengths = [5, 300, 17, 120, 1, 64, 250, 33]
    sequences = [
        "".join("ACDEFGHIKLMNPQRSTVWY"[(i * 7 + n) % 20] for i in range(n)) for n in lengths
    ]
    with Esm2Client(service.target) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(client.encode, [s], include=["contacts", "per_token"]) for s in sequences
        ]
        results = [f.result()[0] for f in futures]
    for result, sequence in zip(results, sequences, strict=True):
        expected = fair_esm_outputs(tiny_reference, sequence)
        assert_close(result.per_token[6], expected["per_token"][6])
        assert_close(result.contacts, expected["contacts"])


def test_responses_larger_than_4_mib_arrive_in_chunks_a_default_client_reads(service):
    sequence = "MKTAYIAKQRQISFVKSHFSRQ" * 55  # 1,210 residues: attentions are 4 x L x L fp32, 23 MB
    with grpc.insecure_channel(service.target) as channel:  # default 4 MiB receive limit
        stub = esm2_pb2_grpc.Esm2ServiceStub(channel)
        request = pb.EncodeRequest(
            items=[pb.Item(sequence=sequence)],
            params=pb.EncodeParams(include=[pb.INCLUDE_ATTENTIONS]),
        )
        messages = list(stub.Encode(request, timeout=120))
    chunks = [m.chunk for m in messages if m.HasField("chunk")]
    assert len(chunks) >= 6
    assert max(m.ByteSize() for m in messages) < 4 * 1024 * 1024
    assert sum(len(c.tensor.data) for c in chunks) == 4 * 1210 * 1210 * 4
    assert messages[-1].HasField("complete")


def test_packed_streams_carry_the_plain_streams_responses_under_4_mib_a_message(service):
    sequences = ["MKTAYIAKQRQISFVKSHFSRQ" * 20, "ACDEFGHIKLMNPQRSTVWY", "M"]  # 440 residues
    params = pb.EncodeParams(
        include=[pb.INCLUDE_MEAN, pb.INCLUDE_ATTENTIONS, pb.INCLUDE_LOGITS], repr_layers=[0, 6]
    )
    with grpc.insecure_channel(service.target) as channel:  # default 4 MiB receive limit
        stub = esm2_pb2_grpc.Esm2ServiceStub(channel)
        items = [pb.Item(sequence=s) for s in sequences]
        plain = list(stub.Encode(pb.EncodeRequest(items=items, params=params), timeout=120))
        packed = list(
            stub.EncodePacked(pb.EncodePackedRequest(items=items, params=params), timeout=120)
        )
        masked = [pb.Item(sequence="MK<mask>V"), pb.Item(sequence="<mask>")]
        predicted = list(stub.Predict(pb.PredictRequest(items=masked), timeout=120))
        predicted_packed = list(
            stub.PredictPacked(pb.PredictPackedRequest(items=masked), timeout=120)
        )

    def by_item(messages):  # items may finish in any order; each item's own order holds
        ordered = {}
        for message in messages:
            ordered.setdefault(message.sequence_index, []).append(message.SerializeToString())
        return ordered

    assert 1 < len(packed) < len(plain)
    assert max(m.ByteSize() for m in packed) <= 4 * 1024 * 1024
    assert by_item(r for m in packed for r in m.responses) == by_item(plain)
    assert len(predicted_packed) == 1
    assert by_item(predicted_packed[0].responses) == by_item(predicted)


def test_invalid_requests_are_rejected_with_every_violation_before_queueing(service, redis_server):
    redis_client = redis.Redis.from_url(redis_server.url)
    before = last_generated_ids(redis_client)
    with grpc.insecure_channel(service.target) as channel:
        stub = esm2_pb2_grpc.Esm2ServiceStub(channel)
        request = pb.EncodeRequest(
            items=[
                pb.Item(sequence="MKV"),
                pb.Item(sequence="MKV"),
                pb.Item(sequence="MKV"),
                pb.Item(sequence="MK1V"),
            ],
            params=pb.EncodeParams(repr_layers=[12], include=[99]),
        )
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Encode(request, timeout=10))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(raised.value) == [
            (
                "items[3].sequence",
                "character '1' at position 3 is not accepted "
                "(accepted: ACDEFGHIKLMNPQRSTVWY, XBUZO, '-')",
            ),
            ("params.repr_layers[0]", "layer 12 is outside -7..6"),
            (
                "params.include[0]",
                "unknown output 99; valid: INCLUDE_MEAN, INCLUDE_PER_TOKEN, INCLUDE_BOS, "
                "INCLUDE_CONTACTS, INCLUDE_LOGITS, INCLUDE_ATTENTIONS",
            ),
        ]
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Predict(pb.PredictRequest(items=[pb.Item(sequence="MKV")]), timeout=10))
        assert bad_request_fields(raised.value) == [
            ("items[0].sequence", "no <mask>; Predict needs at least one per item")
        ]
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.PredictPacked(pb.PredictPackedRequest(items=[pb.Item()]), timeout=10))
        assert bad_request_fields(raised.value) == [
            ("items[0].sequence", "empty; a sequence needs 1 to 2,048 tokens")
        ]
        packed = pb.EncodePackedRequest.FromString(request.SerializeToString())
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.EncodePacked(packed, timeout=10))
        assert [field for field, _ in bad_request_fields(raised.value)] == [
            "items[3].sequence",
            "params.repr_layers[0]",
            "params.include[0]",
        ]
    assert last_generated_ids(redis_client) == before


def test_client_surfaces_server_errors_as_rpc_errors(client):
    with pytest.raises(grpc.RpcError) as raised:
        client.encode(["MKV", "jkv"])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[1].sequence: character 'j' at position 1" in raised.value.details()


def test_async_client(service, tiny_reference):
    async def main():
        async with AsyncEsm2Client(service.target) as client:
            return await asyncio.gather(
                client.encode(["MKTAYIAK"] * 10, include=["bos"], repr_layers=[2]),
                client.predict(["M<mask>K"]),
            )

    encoded, predicted = asyncio.run(main())
    assert len(encoded) == 10 and [r.sequence_index for r in encoded] == list(range(10))
    assert_close(encoded[9].bos[2], fair_esm_outputs(tiny_reference, "MKTAYIAK")["bos"][2])
    assert predicted[0].logits.shape == (1, 33)


def test_status_health_and_reflection(service):
    with grpc.insecure_channel(service.target) as channel:
        status = esm2_pb2_grpc.Esm2ServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
        health = health_pb2_grpc.HealthStub(channel)
        check = health.Check(
            health_pb2.HealthCheckRequest(service="esm2.v1.Esm2Service"), timeout=5
        )
        services = next(
            iter(
                reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                )
            )
        )
    assert [w.worker_id for w in status.workers] == ["test-worker-0"]
    assert status.any_random_weights and status.workers[0].model.random_weights
    assert len(status.workers[0].model.checkpoint_sha256) == 64
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    names = {s.name for s in services.list_services_response.service}
    assert {"esm2.v1.Esm2Service", "grpc.health.v1.Health"} <= names


def test_undecodable_request_bytes_get_invalid_argument_and_the_service_keeps_serving(
    service, client
):
    with grpc.insecure_channel(service.target) as channel:
        raw = channel.unary_stream(
            "/esm2.v1.Esm2Service/Encode", request_serializer=None, response_deserializer=None
        )
        for body in (b"\xff\xff\xff", b"\x0a\x05\x0a\x03\xc3\x28\x41"):  # garbage; invalid UTF-8
            with pytest.raises(grpc.RpcError) as raised:
                list(raw(body, timeout=10))
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            ((field, description),) = bad_request_fields(raised.value)
            assert field == "request"
            assert description.startswith("not a valid esm2.v1.EncodeRequest message")
    (result,) = client.encode(["MKV"])
    assert result.embeddings[6].shape == (32,)


@pytest.mark.parametrize(
    ("request_", "total"),
    [
        # The item count, then 11 bad characters in each of 10,000 items.
        (pb.EncodeRequest(items=[pb.Item(sequence="MK" + "!" * 11)] * 10_000), 1 + 110_000),
        (
            pb.EncodeRequest(
                items=[pb.Item(sequence="MKV")], params=pb.EncodeParams(include=[0] * 200_000)
            ),
            200_000,  # 200 KB: a frontend takes messages of up to 256 KiB
        ),
    ],
    ids=["bad-items", "bad-outputs"],
)
def test_bad_request_details_list_at_most_the_bound_and_count_the_rest(service, request_, total):
    from esm2_service.client import InvalidArgumentError, field_violations
    from esm2_service.validation import MAX_REPORTED_VIOLATIONS

    with grpc.insecure_channel(service.target) as channel, pytest.raises(grpc.RpcError) as raised:
        list(esm2_pb2_grpc.Esm2ServiceStub(channel).Encode(request_, timeout=60))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    *listed, rest = bad_request_fields(raised.value)
    assert 0 < len(listed) <= MAX_REPORTED_VIOLATIONS
    assert rest == ("request", f"and {total - len(listed):,} more violations, not listed")
    assert f"[{total:,} violations; the first {len(listed)} are listed" in raised.value.details()
    assert len(raised.value.details()) < 2_000
    # The Python client keeps the count beside the items it renumbers.
    shifted = InvalidArgumentError.from_server(raised.value, offset=16)
    assert field_violations(shifted)[-1] == rest
    assert shifted.details().endswith(f"(and {total - 5:,} more)")


def test_the_client_decodes_field_violations_without_googleapis(service, client):
    from esm2_service.client import field_violations

    request = pb.EncodeRequest(items=[pb.Item(sequence="MKV"), pb.Item(sequence="MK<cls>")])
    request.params.repr_layers.append(9)
    with grpc.insecure_channel(service.target) as channel, pytest.raises(grpc.RpcError) as server:
        list(esm2_pb2_grpc.Esm2ServiceStub(channel).Encode(request, timeout=30))
    assert field_violations(server.value) == bad_request_fields(server.value)
    assert field_violations(server.value)[-1] == (
        "params.repr_layers[0]",
        "layer 9 is outside -7..6",
    )
    # The client checks a list with the server's own rules, and refuses it the same way
    # before sending it.
    with pytest.raises(grpc.RpcError) as refused:
        client.encode(["MKV", "MK<cls>"], repr_layers=[9])
    assert refused.value.code() == server.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(refused.value) == field_violations(server.value)
