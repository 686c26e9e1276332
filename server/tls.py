"""TLS for the frontend: its certificate and key, and optionally a CA for client certs."""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {flag} {path}: {error}") from None
    if not data.strip():
        raise ValueError(f"{flag} {path} is empty")
    return data


def server_credentials(
    cert: str | None, key: str | None, client_ca: str | None
) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None for plaintext (no cert and no key).

    With `client_ca`, clients must present a certificate that CA signed (mutual TLS).
    Raises ValueError naming the flag when a file is missing, unreadable or empty."""
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key go together: give both or neither")
    pair = (_read(key, "--tls-key"), _read(cert, "--tls-cert"))
    root = _read(client_ca, "--tls-client-ca") if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=root, require_client_auth=root is not None
    )
