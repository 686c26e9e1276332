"""The clients' token and TLS arguments, and the CLI's flags for them."""

from __future__ import annotations

import grpc
import pytest

from esm2_service.client import AsyncEsm2Client, Esm2Client, tls_credentials
from esm2_service.client.cli import build_parser, main


def test_token_becomes_authorization_metadata_next_to_other_metadata():
    with Esm2Client("localhost:1", token="t0k", metadata=[("x-team", "a")]) as client:
        assert client._call_options["metadata"] == (("x-team", "a"), ("authorization", "Token t0k"))
    with Esm2Client("localhost:1") as client:
        assert client._call_options["metadata"] is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token": ""}, "token must be non-empty, without spaces"),
        ({"token": "a b"}, "token must be non-empty, without spaces"),
        (
            {"token": "t", "metadata": [("Authorization", "Token u")]},
            "metadata already holds 'authorization'",
        ),
        ({"tls_cert": "c.pem"}, "a client certificate needs its key"),
        (
            {"tls_ca": "ca.pem", "credentials": grpc.ssl_channel_credentials()},
            "give credentials or tls_ca/tls_cert/tls_key, not both",
        ),
    ],
)
def test_conflicting_or_incomplete_security_arguments(kwargs, message):
    with pytest.raises(ValueError) as error:
        Esm2Client("localhost:1", **kwargs)
    assert message in str(error.value)


async def test_async_client_takes_the_same_arguments(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    async with AsyncEsm2Client("localhost:1", token="t", tls_ca=ca) as client:
        assert client._call_options["metadata"] == (("authorization", "Token t"),)


def test_tls_credentials_read_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        tls_credentials(tmp_path / "missing.pem")
    assert isinstance(tls_credentials(), grpc.ChannelCredentials)  # the system's roots


def test_cli_flags_and_token_environment(monkeypatch, capsys):
    monkeypatch.setenv("ESM2_TOKEN", "from-env")
    args = build_parser().parse_args(["status", "--tls-ca", "ca.pem"])
    assert (args.token, args.tls_ca, args.tls, args.tls_cert) == ("from-env", "ca.pem", False, None)
    assert build_parser().parse_args(["status", "--token", "flag"]).token == "flag"
    assert main(["status", "--target", "localhost:1", "--tls-ca", "/nonexistent/ca.pem"]) == 2
    assert "/nonexistent/ca.pem" in capsys.readouterr().err
