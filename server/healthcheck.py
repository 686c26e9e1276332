"""`python -m esm2_service.server.healthcheck [--http]`: a container's health check.

Exits 0 when the frontend in this container reports gRPC health SERVING for
`esm2.v1.Esm2Service` (Redis answers and a worker is live), or, with `--http`, when
the HTTP door's /readyz answers 200; 1 otherwise. It reads the ports the processes
read (ESM2_PORT, ESM2_HTTP_PORT). A frontend that serves TLS only (ESM2_TLS_CERT) is
checked by connecting to its port, since its certificate need not name localhost.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esm2_service.server.handlers import SERVICE_NAME
from esm2_service.server.http_main import DEFAULT_HTTP_PORT
from esm2_service.server.settings import ServerSettings

TIMEOUT_S = 3.0


def grpc_serving(port: int) -> bool:
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT_S
            )
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("localhost", port), timeout=TIMEOUT_S).close()
    except OSError:
        return False
    return True


def http_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://localhost:{port}/readyz", timeout=TIMEOUT_S) as reply:
            return reply.status == 200
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esm2_service.server.healthcheck")
    parser.add_argument("--http", action="store_true", help="check the HTTP door instead")
    args = parser.parse_args(argv)
    if args.http:
        healthy = http_ready(int(os.environ.get("ESM2_HTTP_PORT") or DEFAULT_HTTP_PORT))
    else:
        port = int(os.environ.get("ESM2_PORT") or ServerSettings().port)
        healthy = port_open(port) if os.environ.get("ESM2_TLS_CERT") else grpc_serving(port)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
