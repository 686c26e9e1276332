"""Registers the Esm2 servicer with request decoding that never fails.

gRPC's generated registration turns an undecodable request into a bare INTERNAL
error. Here a request that is not valid protobuf (or holds invalid UTF-8) reaches
the servicer as `Undecodable`, which validation reports as INVALID_ARGUMENT like
any other bad input. Responses that are already serialized bytes (results relayed
from the workers) are sent as they are.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError, Message

from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.validation import Undecodable

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Esm2Service"].full_name  # esm2.v1.Esm2Service


def _decoder(message_type: type[Message]):
    def decode(data: bytes):
        try:
            return message_type.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as error:
            return Undecodable(message_type.DESCRIPTOR.full_name, str(error) or "malformed")

    return decode


def _encode(message: Message | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


# The streaming methods and their requests.
_STREAMS = (
    ("Encode", pb.EncodeRequest),
    ("Predict", pb.PredictRequest),
    ("EncodePacked", pb.EncodePackedRequest),
    ("PredictPacked", pb.PredictPackedRequest),
    ("Score", pb.ScoreRequest),
)


def add_esm2_service(servicer, server: grpc.aio.Server) -> None:
    handlers = {
        method: grpc.unary_stream_rpc_method_handler(
            getattr(servicer, method),
            request_deserializer=_decoder(request),
            response_serializer=_encode,
        )
        for method, request in _STREAMS
    }
    handlers["GetStatus"] = grpc.unary_unary_rpc_method_handler(
        servicer.GetStatus,
        request_deserializer=_decoder(pb.GetStatusRequest),
        response_serializer=_encode,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
