"""Domain errors and the one table that maps them to gRPC status codes.

Servicers raise these; `to_rpc_status` turns any exception into the status the
client sees. Anything not in the table is INTERNAL, and its traceback is logged.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from esm2_service.server.validation import InvalidRequest

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with a gRPC code of its own; the message is shown to the client."""

    code = grpc.StatusCode.INTERNAL


class QueueFull(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ItemFailed(ServiceError):
    """A worker reported that one item of the request failed."""

    def __init__(self, sequence_index: int, code_name: str, message: str):
        code = getattr(grpc.StatusCode, code_name, grpc.StatusCode.INTERNAL)
        self.code = code
        super().__init__(f"items[{sequence_index}]: {message}")


def to_rpc_status(error: Exception) -> grpc.Status:
    """The status (code, message, rich details) a client sees for `error`."""
    if isinstance(error, InvalidRequest):
        return _status(grpc.StatusCode.INVALID_ARGUMENT, str(error), _bad_request(error))
    if isinstance(error, QueueFull):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after_s * 1000))
        return _status(error.code, str(error), error_details_pb2.RetryInfo(retry_delay=delay))
    if isinstance(error, ServiceError):
        return _status(error.code, str(error))
    log.error("unexpected error", exc_info=error)
    return _status(grpc.StatusCode.INTERNAL, "internal error; the server logged the details")


def _bad_request(error: InvalidRequest) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]
    )


def _status(code: grpc.StatusCode, message: str, detail=None) -> grpc.Status:
    details = []
    if detail is not None:
        packed = any_pb2.Any()
        packed.Pack(detail)
        details.append(packed)
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return rpc_status.to_status(proto)
