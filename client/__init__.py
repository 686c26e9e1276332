"""Python clients and the `esm2` command line of the ESM-2 8M gRPC service.

Needs grpcio, protobuf and numpy (h5py and tqdm for `esm2 encode`): never torch or redis.
"""

from .client import AsyncEsm2Client, Esm2Client, tls_credentials
from .results import (
    EncodeResult,
    IncompleteResultError,
    ModelInfo,
    PredictResult,
    ResultStreamError,
)
from .rich_errors import (
    InvalidArgumentError,
    ServiceUnreachableError,
    field_violations,
    request_id,
)
from .scores import ScoreResult

__all__ = [
    "AsyncEsm2Client",
    "EncodeResult",
    "Esm2Client",
    "IncompleteResultError",
    "InvalidArgumentError",
    "ModelInfo",
    "PredictResult",
    "ResultStreamError",
    "ScoreResult",
    "ServiceUnreachableError",
    "field_violations",
    "request_id",
    "tls_credentials",
]
