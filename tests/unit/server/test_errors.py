from __future__ import annotations

import logging

import grpc
import orjson
from google.rpc import error_details_pb2, status_pb2
from starlette.testclient import TestClient

from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.server.errors import (
    MAX_DETAILS_BYTES,
    QueueFull,
    to_http_error,
    to_rpc_status,
)
from esm2_service.server.http_app import HttpDoor, HttpLimits, build_app
from esm2_service.validation import (
    MAX_REPORTED_VIOLATIONS,
    InvalidRequest,
    clip,
    validate_encode,
)


def details_of(status: grpc.Status) -> status_pb2.Status:
    (value,) = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    return status_pb2.Status.FromString(value)


def test_huge_violation_lists_fit_a_default_clients_trailer_and_name_every_field():
    request = pb.EncodeRequest(
        items=[pb.Item(sequence="j" * 16)] * 8,
        params=pb.EncodeParams(repr_layers=[99] * 300),
    )
    try:
        validate_encode(request)
    except InvalidRequest as error:
        status = to_rpc_status(error)
        total = error.found.total
    assert total == 8 * 11 + 300
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    rich = details_of(status)
    assert len(rich.SerializeToString()) <= MAX_DETAILS_BYTES + 1024  # plus the message
    bad = error_details_pb2.BadRequest()
    rich.details[0].Unpack(bad)
    *listed, rest = bad.field_violations
    assert {f"items[{i}].sequence" for i in range(8)} <= {v.field for v in listed}
    assert (rest.field, rest.description) == (
        "request",
        f"and {total - len(listed)} more violations, not listed",
    )
    assert f"[{total} violations; the first {len(listed)} are listed" in status.details


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


def test_http_and_grpc_errors_list_the_same_bounded_violations():
    request = pb.EncodeRequest(
        items=[pb.Item(sequence="MK" + "!" * 11)] * 8, params=pb.EncodeParams(include=[0] * 1_000)
    )
    try:
        validate_encode(request)
    except InvalidRequest as error:
        refused = error
    total = 8 * 11 + 1_000
    status, body, _ = to_http_error(refused)
    assert status == 400
    assert len(body["errors"]) == MAX_REPORTED_VIOLATIONS + 1
    assert body["errors"][-1] == {
        "field": "request",
        "msg": f"and {total - MAX_REPORTED_VIOLATIONS:,} more violations, not listed",
    }
    assert body["detail"] == str(refused)
    bad = error_details_pb2.BadRequest()
    details_of(to_rpc_status(refused)).details[0].Unpack(bad)
    *listed, rest = bad.field_violations
    # The trailer holds fewer (each field's first first), in the same order.
    in_body = iter((e["field"], e["msg"]) for e in body["errors"][:-1])
    assert all((v.field, v.description) in in_body for v in listed)
    assert (rest.field, rest.description) == (
        "request",
        f"and {total - len(listed):,} more violations, not listed",
    )


def test_the_http_door_cuts_a_huge_field_name_in_its_body_and_its_log(caplog):
    door = HttpDoor(broker=None, monitor=None, limits=HttpLimits(max_request_bytes=2**21))
    name = "x" * 1_000_000
    with caplog.at_level(logging.INFO, logger="esm2_service.server.http_app"):
        response = TestClient(build_app(door)).post(
            "/api/v3/esm2-8m/encode/",
            content=orjson.dumps({"items": [{"sequence": "MKV"}], name: 1}),
        )
    assert response.status_code == 400
    cut = clip(name)
    assert response.json()["errors"] == [
        {"field": cut, "msg": "unknown field; expected items, params"}
    ]
    assert len(response.content) < 1_000
    (line,) = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert cut in line and len(line) < 500
