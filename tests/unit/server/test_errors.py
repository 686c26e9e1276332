from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.server.errors import MAX_DETAILS_BYTES, QueueFull, to_rpc_status
from esm2_service.validation import InvalidRequest, validate_encode


def details_of(status: grpc.Status) -> status_pb2.Status:
    (value,) = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    return status_pb2.Status.FromString(value)


def test_huge_violation_lists_fit_a_default_clients_trailer_and_name_every_field():
    request = pb.EncodeRequest(
        items=[pb.Item(sequence="mktayiakqrqisfvk")] * 8,
        params=pb.EncodeParams(repr_layers=[99] * 300),
    )
    try:
        validate_encode(request)
    except InvalidRequest as error:
        status = to_rpc_status(error)
        total = len(error.violations)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    rich = details_of(status)
    assert len(rich.SerializeToString()) <= MAX_DETAILS_BYTES + 1024  # plus the message
    bad = error_details_pb2.BadRequest()
    rich.details[0].Unpack(bad)
    named = {v.field for v in bad.field_violations}
    assert {f"items[{i}].sequence" for i in range(8)} <= named
    assert len(named) == 8 + 300 or len(bad.field_violations) < total
    assert (
        f"[{total} violations; the first {len(bad.field_violations)} are listed" in status.details
    )


def test_queue_full_carries_a_retry_hint():
    status = to_rpc_status(QueueFull("full", retry_after_s=2.5))
    retry = error_details_pb2.RetryInfo()
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details_of(status).details[0].Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 2500


def test_unexpected_errors_are_internal_without_leaking_details():
    status = to_rpc_status(KeyError("secret internals"))
    assert status.code == grpc.StatusCode.INTERNAL
    assert "secret" not in status.details
