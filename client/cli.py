"""The `esm2` command line: encode, score, predict and status against a running service,
plus entry points (server, worker, serve, make-checkpoint) forwarded to the
modules of the server and worker extras."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from tqdm import tqdm

from esm2_service import __version__
from esm2_service.allocator import keep_freed_memory
from esm2_service.cli_help import HelpFormatter, epilog
from esm2_service.validation import check_sequence

from .cli_encode import add_encode_command
from .cli_options import (
    TARGET_ENV,
    UsageError,
    add_connection_options,
    add_dtype,
    check_output_dir,
    client_from_args,
    positive_int,
    read_records,
    warn_if_random,
)
from .cli_score import add_score_command
from .fasta import FastaRecord
from .output import predict_document, predict_json
from .params import MAX_ITEMS_PER_REQUEST
from .results import ResultStreamError
from .rich_errors import (
    InvalidArgumentError,
    ServiceUnreachableError,
    field_violations,
    request_id,
    shift_item,
)

# command -> (module whose main(argv) runs it, extras it needs, help)
FORWARDED: dict[str, tuple[str, tuple[str, ...], str]] = {
    "server": ("esm2_service.server.main", ("server",), "run the gRPC front end"),
    "http": (
        "esm2_service.server.http_main",
        ("server",),
        "run the HTTP/JSON front end (BioLM's esm2-8m API)",
    ),
    "worker": ("esm2_service.worker.main", ("worker",), "run a model worker"),
    "serve": (
        "esm2_service.server.serve",
        ("server", "worker"),
        "run a server, workers and a Redis in one process tree",
    ),
    "make-checkpoint": (
        "esm2_service.worker.checkpoint",
        ("worker",),
        "write a model checkpoint for the workers",
    ),
}
# Options whose value may start with "-" ("--layers -1,0").
_DASH_VALUE_OPTIONS = ("--layers",)

Result = TypeVar("Result")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `esm2 ARGS`; returns the exit code (0 ok, 1 the service failed, 2 bad usage or
    input, whether refused here or by the service)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()
    if argv and argv[0] in FORWARDED:
        return forward(argv[0], argv[1:])
    args = parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:
        print_rpc_error(error)
        return 2 if error.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    except ResultStreamError as error:
        print(f"error: malformed response: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def forward(command: str, argv: list[str]) -> int:
    """Hands `argv` unchanged to the `main` of `command`'s module, imported now."""
    module_name, extras, _ = FORWARDED[command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        noun = "extra" if len(extras) == 1 else "extras"
        print(
            f"esm2 {command} needs the {' and '.join(extras)} {noun}: "
            f"pip install 'esm2-service[{','.join(extras)}]' ({error})",
            file=sys.stderr,
        )
        return 2
    return module.main(argv)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed arguments of encode, predict or status; exits 2 on a usage error."""
    return build_parser().parse_args(_join_dash_values(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esm2",
        description="The ESM-2 8M protein language model as a service: encode, predict, "
        "score and status are its client; serve runs the whole service on this machine, "
        "server, http and worker run its parts. 'esm2 COMMAND --help' lists a command's options.",
        epilog=epilog("esm2 predict --sequence 'MKTAYIAK<mask>RQISFVK'"),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_encode_command(commands)
    _add_predict(commands)
    add_score_command(commands)
    _add_status(commands)
    for name, (_, _, help_text) in FORWARDED.items():
        commands.add_parser(name, help=f"{help_text} (see esm2 {name} --help)", add_help=False)
    return parser


def _add_status(commands: Any) -> None:
    status = commands.add_parser(
        "status",
        help="print the service's workers and queue as JSON",
        description="Prints, as JSON, the service's live workers (each one's checkpoint, "
        "device and precision) and the depth of its queue; warns on stderr when a worker "
        "runs random weights.",
        epilog=epilog("esm2 status --target localhost:50051"),
        formatter_class=HelpFormatter,
    )
    add_connection_options(status)
    status.set_defaults(handler=run_status)


def _add_predict(commands: Any) -> None:
    predict = commands.add_parser(
        "predict",
        help="logits and top tokens at the <mask> positions of sequences, as JSON",
        description="Prints (or writes with -o) a JSON object: vocab_tokens, and per sequence "
        "its id, sequence_tokens, mask_positions (indices into sequence_tokens), "
        "predicted_tokens (at each mask, the top-scoring of the 20 standard amino acids) and "
        "logits (one row per mask, all 33 vocabulary columns).",
        epilog=epilog("esm2 predict --sequence 'MKTAYIAK<mask>RQISFVK' -o predicted.json"),
        formatter_class=HelpFormatter,
    )
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("fasta", nargs="?", help="input FASTA file")
    source.add_argument(
        "--sequence",
        action="append",
        help="a sequence with at least one <mask>; repeat for more (ids seq1, seq2, ...)",
    )
    predict.add_argument("-o", "--output", help="output .json file (default: stdout)")
    add_dtype(predict)
    add_connection_options(predict)
    _add_batching_options(predict)
    predict.set_defaults(handler=run_predict)


def _add_batching_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size",
        type=int,
        default=MAX_ITEMS_PER_REQUEST,
        choices=range(1, MAX_ITEMS_PER_REQUEST + 1),
        metavar=f"1-{MAX_ITEMS_PER_REQUEST}",
        help=f"sequences per request (default: {MAX_ITEMS_PER_REQUEST})",
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=8,
        help="requests in flight at once (default: 8)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _join_dash_values(argv: list[str]) -> list[str]:
    """["--layers", "-1,0"] -> ["--layers=-1,0"], which argparse would read as an option."""
    joined: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token in _DASH_VALUE_OPTIONS:
            value = next(tokens, None)
            joined.append(token if value is None else f"{token}={value}")
        else:
            joined.append(token)
    return joined


def _check_records(records: list[FastaRecord], allow_mask: bool) -> None:
    """InvalidArgumentError naming every bad record, before any request is sent."""
    violations = [
        (f"items[{index}].sequence", violation.description)
        for index, record in enumerate(records)
        for violation in check_sequence(record.sequence, "sequence", allow_mask)
    ]
    if violations:
        raise _name_records(InvalidArgumentError(violations), records, offset=0)


def _name_records(
    error: InvalidArgumentError, records: list[FastaRecord], offset: int
) -> InvalidArgumentError:
    """`items[i]` of a call that sent records[offset:] -> `items[offset+i] (record 'ID',
    line N)`, the record's place in the user's FASTA file (no line for --sequence)."""
    named = []
    for field, description in error.violations:
        field = shift_item(field, offset)
        if field.startswith("items["):
            index = int(field[len("items[") : field.index("]")])
            if index < len(records):
                record = records[index]
                line = f", line {record.line}" if record.line else ""
                field += f" (record {record.id!r}{line})"
        named.append((field, description))
    return InvalidArgumentError(named, error.request_ids)


def _run_windows(
    records: list[FastaRecord],
    call: Callable[[list[str]], list[Result]],
    args: argparse.Namespace,
) -> Iterator[tuple[str, Result]]:
    """(id, result) per record, sending `batch_size * concurrency` sequences at a time."""
    window = args.batch_size * args.concurrency
    disable = True if args.no_progress else None
    with tqdm(total=len(records), unit="seq", disable=disable) as progress:
        for start in range(0, len(records), window):
            part = records[start : start + window]
            try:
                results = call([record.sequence for record in part])
            except InvalidArgumentError as error:
                raise _name_records(error, records, start) from None
            progress.update(len(part))
            yield from zip((record.id for record in part), results, strict=True)


def run_predict(args: argparse.Namespace) -> int:
    if args.fasta is not None:
        records = read_records(args.fasta, sequence_option="--sequence SEQ")
    else:
        records = [
            FastaRecord(f"seq{i}", sequence, 0) for i, sequence in enumerate(args.sequence, 1)
        ]
    vocab: list[str] = []
    documents: list[dict[str, Any]] = []
    random_weights = False
    check_output_dir(args.output)
    _check_records(records, allow_mask=True)
    with client_from_args(args) as client:
        predict = partial(client.predict, dtype=args.dtype)
        for record_id, result in _run_windows(records, predict, args):
            documents.append(predict_json(record_id, result))
            vocab = result.vocab_tokens
            random_weights |= result.model.random_weights
    _write_text(args.output, predict_document(vocab, documents))
    warn_if_random(random_weights)
    return 0


def run_status(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        response = client.status()
    print(
        json_format.MessageToJson(
            response,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
            unquote_int64_if_possible=True,
        )
    )
    warn_if_random(response.any_random_weights)
    return 0


def _write_text(path: str | None, text: str) -> None:
    if path is None:
        print(text)
        return
    with open(path, "w", encoding="utf-8") as file:
        file.write(text + "\n")


def print_rpc_error(error: grpc.RpcError) -> None:
    """`error: CODE: details` on stderr, or, for invalid input, one line per violation;
    then the request id the service logged the call under, if it got one."""
    violations = field_violations(error)
    if violations:
        noun = "violation" if len(violations) == 1 else "violations"
        print(f"error: {error.code().name}: {len(violations)} {noun}:", file=sys.stderr)
        for field, description in violations:
            print(f"  {field}: {description}", file=sys.stderr)
    else:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
    found = request_id(error)
    if found:
        print(f"request id: {found}", file=sys.stderr)
    if isinstance(error, ServiceUnreachableError):
        print(f"the service's address: --target HOST:PORT, or ${TARGET_ENV}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
