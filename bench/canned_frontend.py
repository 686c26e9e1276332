"""`python -m bench.canned_frontend`: the gRPC floor under the frontend, for `bench.plumbing`.

A grpc.aio server with the frontend's registration (handlers, metrics interceptor, options) whose
Encode streams what the service would send for a request (a chunk and a completion per item,
serialized once at start), and EncodePacked the same packed, with no validation, no Redis and
no worker. What the frontend
costs above this is what its own code costs.
"""

from __future__ import annotations

import argparse
import asyncio

import grpc

from esm2_service.allocator import keep_freed_memory
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.esm2.v1 import esm2_pb2_grpc
from esm2_service.server.handlers import add_esm2_service
from esm2_service.server.main import server_options
from esm2_service.server.metrics import FrontendMetrics, MetricsInterceptor
from esm2_service.server.packing import pack
from esm2_service.server.settings import ServerSettings

EMBED_DIM = 320


def canned_messages(include: int, residues: int, items: int = 8) -> list[bytes]:
    shape = [residues, EMBED_DIM] if include == pb.INCLUDE_PER_TOKEN else [EMBED_DIM]
    size = 4 * EMBED_DIM * (residues if include == pb.INCLUDE_PER_TOKEN else 1)
    messages = []
    for index in range(items):
        tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape, data=bytes(size))
        chunk = pb.TensorChunk(kind=include, layer=6, offset=0, tensor=tensor)
        messages.append(pb.EncodeResponse(sequence_index=index, chunk=chunk).SerializeToString())
        complete = pb.ItemComplete(vocab_tokens=["A"])
        messages.append(
            pb.EncodeResponse(sequence_index=index, complete=complete).SerializeToString()
        )
    return messages


class CannedService(esm2_pb2_grpc.Esm2ServiceServicer):
    def __init__(self, residues: int):
        self.canned = {
            kind: canned_messages(kind, residues)
            for kind in (pb.INCLUDE_MEAN, pb.INCLUDE_PER_TOKEN)
        }

    async def Encode(self, request, context):
        for message in self._messages(request):
            yield message

    async def EncodePacked(self, request, context):
        for message in pack(self._messages(request)):
            yield message

    def _messages(self, request) -> list[bytes]:
        kind = request.params.include[0] if request.params.include else pb.INCLUDE_MEAN
        return self.canned[kind][: 2 * len(request.items)]

    async def GetStatus(self, request, context):
        return pb.GetStatusResponse()


async def serve(port: int, residues: int) -> None:
    interceptors = [MetricsInterceptor(FrontendMetrics())]
    server = grpc.aio.server(interceptors=interceptors, options=server_options(ServerSettings()))
    add_esm2_service(CannedService(residues), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"canned frontend listening on port {port}", flush=True)
    await server.wait_for_termination()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.canned_frontend")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--residues", type=int, default=340)
    args = parser.parse_args()
    keep_freed_memory()  # as the frontend's main does
    asyncio.run(serve(args.port, args.residues))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
