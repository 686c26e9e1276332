"""What the `esm2` commands share: connection options, argument types, input checks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esm2_service.config import env_or

from .client import Esm2Client, tls_credentials
from .fasta import FastaRecord, read_fasta
from .params import DTYPE_NAMES, MAX_ITEMS_PER_REQUEST, include_value

DEFAULT_TARGET = "localhost:50051"
TARGET_ENV = "ESM2_TARGET"
TOKEN_ENV = "ESM2_TOKEN"


class UsageError(Exception):
    """A problem with the command's input, reported without a traceback (exit 2)."""


def add_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=list(DTYPE_NAMES),
        default="float32",
        help="precision of the tensors sent back (default: float32)",
    )


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=env_or(TARGET_ENV, DEFAULT_TARGET),
        help=f"service host:port (default: ${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="deadline of each request, in seconds (default: none of its own; the service "
        "ends a request after its --request-timeout-s, 600 s unless set otherwise)",
    )
    parser.add_argument(
        "--token",
        default=env_or(TOKEN_ENV),
        help=f"send 'authorization: Token TOKEN' (default: ${TOKEN_ENV}; prefer the "
        "variable: a flag shows in ps)",
    )
    parser.add_argument(
        "--tls", action="store_true", help="use TLS, trusting the system's CA certificates"
    )
    parser.add_argument(
        "--tls-ca", metavar="PEM", help="use TLS, trusting server certificates this CA signed"
    )
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate, for mutual TLS")
    parser.add_argument("--tls-key", metavar="PEM", help="client private key, for mutual TLS")


def include_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    try:
        for name in names:
            include_value(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return names


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def client_from_args(args: argparse.Namespace) -> Esm2Client:
    tls_files = [getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key")]
    try:
        credentials = (
            tls_credentials(*tls_files) if getattr(args, "tls", False) or any(tls_files) else None
        )
        return Esm2Client(
            args.target,
            timeout_s=args.timeout,
            token=getattr(args, "token", None),
            credentials=credentials,
            max_concurrency=getattr(args, "concurrency", None) or 1,
            batch_size=getattr(args, "batch_size", MAX_ITEMS_PER_REQUEST),
        )
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None


def read_records(path: str, sequence_option: str | None = None) -> list[FastaRecord]:
    """The records of FASTA file `path`; UsageError for a missing, unreadable or empty
    one. `sequence_option`: the command's option for a sequence itself, suggested when
    `path` is no file (a sequence typed where the file goes)."""
    try:
        records = read_fasta(path)
    except FileNotFoundError:
        hint = f"; to send a sequence itself, use {sequence_option}" if sequence_option else ""
        raise UsageError(f"{path}: no such FASTA file{hint}") from None
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None
    if not records:
        raise UsageError(f"{path}: no FASTA records")
    return records


def check_output_dir(path: str | None) -> None:
    """Fails before any request if `path` could not be written for want of a folder."""
    if path is not None and not Path(path).absolute().parent.is_dir():
        raise UsageError(f"{path}: no such directory to write into")


def warn_if_random(random_weights: bool) -> None:
    if random_weights:
        print(
            "WARNING: the service runs RANDOM weights (a make-checkpoint --random "
            "checkpoint); its outputs are meaningless",
            file=sys.stderr,
        )
