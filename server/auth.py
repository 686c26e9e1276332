"""Token authentication: every RPC but health checks needs `authorization: Token <token>`.

Tokens come from a file (one per line) and/or the ESM2_AUTH_TOKENS environment
variable, never from a flag, so they do not show in `ps`. A presented token is
compared with every configured one in constant time (`hmac.compare_digest` of
SHA-256 digests, so neither the content nor the length of a token leaks through
timing, nor which token matched).

Exempt: `grpc.health.v1.Health/*`, for load balancers and Kubernetes probes that
cannot send metadata. Not exempt: server reflection. It only describes the
public API, but the service is closed when tokens are configured; grpcurl sends
`-H 'authorization: Token ...'` with its reflection calls too.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc

from esm2_service import metadata

log = logging.getLogger(__name__)

SCHEME = "Token"
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)

# Worded for both doors: gRPC metadata and the HTTP header are both `authorization`.
MISSING = "missing credentials: send 'authorization: Token <token>'"
WRONG_SCHEME = "authorization must have the form 'Token <token>'"
WRONG_TOKEN = "the token is not valid"


def parse_tokens(text: str, source: str) -> list[str]:
    """Tokens in `text`, one per line; blank lines and lines starting with `#` are skipped
    (a `#` inside a token is part of it)."""
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if token and not token.startswith("#"):
            tokens.append(_checked(token, f"{source} line {number}"))
    return tokens


def _checked(token: str, where: str) -> str:
    # The message never quotes the token: it is a secret even when malformed.
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise ValueError(f"{where}: a token must be printable ASCII without spaces")
    return token


def load_tokens(tokens_file: str | None, tokens_env: str | None) -> tuple[str, ...]:
    """The configured tokens: those of `tokens_file` and the comma-separated `tokens_env`.

    Raises ValueError when a configured source is unreadable or holds no token, so a
    typo cannot start an open service by accident."""
    tokens: list[str] = []
    if tokens_file is not None:
        try:
            text = Path(tokens_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read the auth tokens file {tokens_file}: {error}") from None
        tokens += parse_tokens(text, tokens_file)
        if not tokens:
            raise ValueError(f"the auth tokens file {tokens_file} holds no token")
    if tokens_env is not None:
        from_env = [
            _checked(part.strip(), f"ESM2_AUTH_TOKENS item {index}")
            for index, part in enumerate(tokens_env.split(","), start=1)
            if part.strip()
        ]
        if not from_env:
            raise ValueError("ESM2_AUTH_TOKENS is set but holds no token")
        tokens += from_env
    return tuple(dict.fromkeys(tokens))  # unique, in order


class TokenChecker:
    """Decides whether an `authorization` value names a configured token."""

    def __init__(self, tokens: Iterable[str]):
        self._digests = [_digest(token) for token in tokens]
        if not self._digests:
            raise ValueError("token authentication needs at least one token")

    def check(self, values: Sequence[str]) -> str | None:
        """None if the request may pass, else why not (a message for the client)."""
        if not values:
            return MISSING
        scheme, _, token = values[0].strip().partition(" ")
        token = token.strip()
        if scheme.lower() != SCHEME.lower() or not token:
            return WRONG_SCHEME
        given = _digest(token)
        matched = False
        for digest in self._digests:  # every one, without stopping at a match
            matched |= hmac.compare_digest(given, digest)
        return None if matched else WRONG_TOKEN


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Aborts with UNAUTHENTICATED any RPC (health checks aside) without a valid token."""

    def __init__(self, tokens: Iterable[str]):
        self.checker = TokenChecker(tokens)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler  # an unknown method is UNIMPLEMENTED either way
        values = [
            value
            for key, value in handler_call_details.invocation_metadata or ()
            if key == metadata.AUTHORIZATION and isinstance(value, str)
        ]
        reason = self.checker.check(values)
        if reason is None:
            return handler
        log.info("refused %s: %s", method, reason)
        return _refusal(handler, reason)


def _refusal(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts without reading the request."""

    async def refuse(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **codecs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **codecs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **codecs)
    return grpc.unary_unary_rpc_method_handler(refuse, **codecs)
