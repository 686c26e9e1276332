"""esm2_service: ESM-2 8M as a gRPC service.

This root package is the contract every part shares: the generated gRPC code
(`esm2_service.esm2.v1`), the Redis queue protocol, the packed-tensor codec and
the ESM alphabet. It imports neither torch nor redis.
"""

__version__ = "0.1.0"
