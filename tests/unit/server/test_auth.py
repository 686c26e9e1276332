"""Token files, the token check and the interceptor's decisions; TLS and auth settings."""

from __future__ import annotations

import asyncio
import types

import grpc
import pytest

from esm2_service.server import auth
from esm2_service.server.settings import ServerSettings, build_parser, settings_from_args
from esm2_service.server.tls import server_credentials

TOKENS = ("alpha-0123456789", "beta#not-a-comment")


def test_token_files_skip_blank_lines_and_comments():
    text = "# comment\n\n  alpha-0123456789  \n\t# indented comment\nbeta#not-a-comment\n"
    assert auth.parse_tokens(text, "tokens.txt") == list(TOKENS)


@pytest.mark.parametrize("bad", ["two words", "tab\tinside", "caf\u00e9", "bell\x07"])
def test_malformed_tokens_are_refused_without_being_quoted(bad):
    with pytest.raises(ValueError) as error:
        auth.parse_tokens(f"ok-token\n{bad}\n", "tokens.txt")
    assert str(error.value) == "tokens.txt line 2: a token must be printable ASCII without spaces"


def test_load_tokens_joins_the_file_and_the_environment(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("alpha-0123456789\nshared\n")
    assert auth.load_tokens(str(path), " env-1 ,shared,, env-2") == (
        "alpha-0123456789",
        "shared",
        "env-1",
        "env-2",
    )
    assert auth.load_tokens(None, None) == ()
    assert auth.load_tokens(None, "only") == ("only",)


def test_load_tokens_refuses_unusable_sources(tmp_path):
    with pytest.raises(ValueError, match="cannot read the auth tokens file .*missing"):
        auth.load_tokens(str(tmp_path / "missing"), None)
    (tmp_path / "empty").write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no token"):
        auth.load_tokens(str(tmp_path / "empty"), None)
    with pytest.raises(ValueError, match="ESM2_AUTH_TOKENS is set but holds no token"):
        auth.load_tokens(None, " , ")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], auth.MISSING),
        (["Token alpha-0123456789"], None),
        (["token   beta#not-a-comment  "], None),
        (["TOKEN alpha-0123456789"], None),
        (["Token alpha-012345678"], auth.WRONG_TOKEN),  # a prefix
        (["Token alpha-0123456789x"], auth.WRONG_TOKEN),
        (["Token "], auth.WRONG_SCHEME),
        (["Bearer alpha-0123456789"], auth.WRONG_SCHEME),
        (["alpha-0123456789"], auth.WRONG_SCHEME),
        (["Token wrong", "Token alpha-0123456789"], auth.WRONG_TOKEN),  # the first counts
    ],
)
def test_token_checker_decisions(values, expected):
    assert auth.TokenChecker(TOKENS).check(values) == expected


def test_token_checker_compares_with_every_token(monkeypatch):
    compared = []

    def spy(a, b):
        compared.append(b)
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert auth.TokenChecker(["t1", "t2", "t3"]).check(["Token t1"]) is None
    assert len(compared) == 3  # no early exit on the first match


def test_token_checker_needs_a_token():
    with pytest.raises(ValueError, match="at least one token"):
        auth.TokenChecker([])


def _details(method: str, metadata=()):
    return types.SimpleNamespace(method=method, invocation_metadata=tuple(metadata))


async def _behavior(request, context):
    return "served"


def _decide(method: str, metadata=(), handler=None):
    handler = handler or grpc.unary_unary_rpc_method_handler(_behavior)

    async def continuation(details):
        return handler if not method.endswith("/Unknown") else None

    interceptor = auth.TokenAuthInterceptor(TOKENS)
    return asyncio.run(interceptor.intercept_service(continuation, _details(method, metadata)))


class _AbortingContext:
    def __init__(self):
        self.aborted = None

    async def abort(self, code, details):
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


def test_interceptor_passes_valid_tokens_and_health_checks_unchanged():
    handler = grpc.unary_unary_rpc_method_handler(_behavior)
    valid = [("user-agent", "test"), ("authorization", "Token alpha-0123456789")]
    assert _decide("/esm2.v1.Esm2Service/GetStatus", valid, handler) is handler
    assert _decide("/grpc.health.v1.Health/Check", (), handler) is handler
    assert _decide("/grpc.health.v1.Health/Watch", (), handler) is handler
    assert _decide("/esm2.v1.Esm2Service/Unknown", ()) is None


@pytest.mark.parametrize(
    "make",
    [
        grpc.unary_unary_rpc_method_handler,
        grpc.unary_stream_rpc_method_handler,
        grpc.stream_unary_rpc_method_handler,
        grpc.stream_stream_rpc_method_handler,
    ],
)
def test_interceptor_refusals_keep_the_method_shape_and_abort(make):
    handler = make(_behavior, request_deserializer=bytes, response_serializer=bytes)
    refusal = _decide(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        [("authorization", "Token nope")],
        handler,
    )
    assert refusal is not handler
    assert (refusal.request_streaming, refusal.response_streaming) == (
        handler.request_streaming,
        handler.response_streaming,
    )
    assert refusal.request_deserializer is bytes
    behavior = (
        refusal.unary_unary or refusal.unary_stream or refusal.stream_unary or refusal.stream_stream
    )
    context = _AbortingContext()
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(behavior(None, context))
    assert context.aborted == (grpc.StatusCode.UNAUTHENTICATED, auth.WRONG_TOKEN)


def test_settings_read_tokens_but_never_show_them(tmp_path, monkeypatch):
    path = tmp_path / "tokens"
    path.write_text("file-secret-123\n")
    monkeypatch.setenv("ESM2_AUTH_TOKENS", "env-secret-456")
    settings = settings_from_args(build_parser().parse_args(["--auth-tokens-file", str(path)]))
    assert settings.auth_tokens == ("file-secret-123", "env-secret-456")
    for text in (repr(settings), settings.describe()):
        assert "secret" not in text
    assert "auth_tokens=<2 configured>" in settings.describe()


def test_auth_flags_do_not_take_raw_tokens():
    options = {option for action in build_parser()._actions for option in action.option_strings}
    assert "--auth-tokens-file" in options
    assert not {"--auth-tokens", "--auth-token", "--token"} & options


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tls_cert": "c.pem"}, "--tls-cert and --tls-key go together"),
        ({"tls_key": "k.pem"}, "--tls-cert and --tls-key go together"),
        ({"tls_client_ca": "ca.pem"}, "--tls-client-ca (mutual TLS) needs --tls-cert"),
        ({"metrics_port": 70000}, "metrics_port 70000 is outside 0..65535"),
        ({"metrics_port": 50051}, "metrics_port and port are both 50051"),
        ({"log_format": "xml"}, "log_format 'xml' is not one of text, json"),
    ],
)
def test_settings_validation(values, message):
    with pytest.raises(ValueError) as error:
        ServerSettings(**values)
    assert message in str(error.value)


def test_server_credentials_read_the_files(tmp_path):
    assert server_credentials(None, None, None) is None
    with pytest.raises(ValueError, match="cannot read --tls-key .*missing.key"):
        server_credentials(str(tmp_path / "c.pem"), str(tmp_path / "missing.key"), None)
    (tmp_path / "empty.pem").write_text("\n")
    (tmp_path / "k.pem").write_text("not checked until gRPC loads it\n")
    with pytest.raises(ValueError, match="--tls-cert .*empty.pem is empty"):
        server_credentials(str(tmp_path / "empty.pem"), str(tmp_path / "k.pem"), None)
