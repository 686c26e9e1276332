"""The `esm2` command line: encode, predict and status against a running service,
plus entry points (server, worker, serve, make-checkpoint) forwarded to the
modules of the server and worker extras."""

from __future__ import annotations

import argparse
import csv
import importlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from tqdm import tqdm

from esm2_service import __version__
from esm2_service.alphabet import VOCAB_TOKENS
from esm2_service.config import env_or
from esm2_service.validation import MAX_TOKENS, check_sequence, encode_violations

from .bulk import BulkEncoder, BulkSettings, count_residues, print_summary
from .bulk_records import DEFAULT_OVERLAP, DEFAULT_WINDOW, Reject, screen
from .client import Esm2Client, tls_credentials
from .fasta import FastaRecord, iter_fasta, read_fasta
from .h5store import H5_LAYOUT, SHARD_RECORDS, JobMismatch, ShardedStore
from .output import predict_document, predict_json
from .params import DTYPE_NAMES, INCLUDE_NAMES, MAX_ITEMS_PER_REQUEST, EncodeSpec, include_value
from .results import ResultStreamError
from .rich_errors import InvalidArgumentError, field_violations, request_id, shift_item
from .scores import STRATEGY_VALUES, ScoreResult, strategy_values
from .variant_table import (
    VariantTable,
    draw_heatmap,
    measured_values,
    read_variant_table,
    scan_table,
    spearman,
    write_scored,
)

DEFAULT_TARGET = "localhost:50051"
TARGET_ENV = "ESM2_TARGET"
TOKEN_ENV = "ESM2_TOKEN"

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


# `esm2 encode` finished, but some records were rejected (listed in OUT.rejects.tsv).
EXIT_REJECTS = 3


class UsageError(Exception):
    """A problem with the command's input, reported without a traceback (exit 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `esm2 ARGS`; returns the exit code (0 ok, 1 server error, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
        return 1
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
    parser = argparse.ArgumentParser(prog="esm2", description="ESM-2 8M gRPC service client.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_encode(commands)
    _add_predict(commands)
    _add_score(commands)
    status = commands.add_parser("status", help="print the service's workers and queue as JSON")
    _add_connection_options(status)
    status.set_defaults(handler=run_status)
    for name, (_, _, help_text) in FORWARDED.items():
        commands.add_parser(name, help=f"{help_text} (see esm2 {name} --help)", add_help=False)
    return parser


def _add_encode(commands: Any) -> None:
    encode = commands.add_parser(
        "encode",
        help="embeddings and other tensors of a FASTA file of any size, to HDF5",
        description="Encodes every record of a FASTA file into an HDF5 file keyed by record "
        "id, streaming, with a bounded number of requests in flight. Interrupted (Ctrl-C, a "
        "crash, a lost connection), the same command continues where it stopped; it refuses "
        "to if the settings changed. Bad records are listed in OUT.rejects.tsv and the rest "
        "is encoded; the exit code is then 3.",
        epilog=H5_LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    encode.add_argument("fasta", help="input FASTA file")
    encode.add_argument("-o", "--output", required=True, help="output HDF5 file (.h5)")
    encode.add_argument(
        "--include",
        type=_include_list,
        default=["mean"],
        help=f"comma-separated, any of {','.join(INCLUDE_NAMES)} (default: mean)",
    )
    encode.add_argument(
        "--layers",
        type=_int_list,
        default=[-1],
        help="comma-separated layers 0-6 for mean, per_token and bos; -1 is the last (default: -1)",
    )
    _add_dtype(encode)
    encode.add_argument(
        "--long",
        choices=["reject", "windows"],
        default="reject",
        help=f"sequences over {MAX_TOKENS:,} residues: list them as rejects (default), or "
        "embed overlapping windows, averaged where they overlap",
    )
    encode.add_argument(
        "--window",
        type=_positive_int,
        default=DEFAULT_WINDOW,
        help=f"residues per window with --long windows (default: {DEFAULT_WINDOW}, the "
        "1,024-token crops ESM-2 was trained on)",
    )
    encode.add_argument(
        "--overlap",
        type=int,
        default=DEFAULT_OVERLAP,
        help=f"residues shared by neighbouring windows (default: {DEFAULT_OVERLAP})",
    )
    _add_connection_options(encode)
    encode.add_argument(
        "--concurrency",
        type=_positive_int,
        default=None,
        help="requests of 8 sequences in flight (default: 2 per live worker, at least 4)",
    )
    encode.add_argument(
        "--shard-records",
        type=_positive_int,
        default=SHARD_RECORDS,
        help=f"records per shard while the job runs: at most this many are computed again "
        f"after a crash (default: {SHARD_RECORDS:,})",
    )
    encode.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    encode.set_defaults(handler=run_encode)


def _add_predict(commands: Any) -> None:
    predict = commands.add_parser(
        "predict",
        help="logits and top tokens at the <mask> positions of sequences, as JSON",
        description="Prints (or writes with -o) a JSON object: vocab_tokens, and per sequence "
        "its id, sequence_tokens, mask_positions (indices into sequence_tokens), "
        "predicted_tokens (at each mask, the top-scoring of the 20 standard amino acids) and "
        "logits (one row per mask, all 33 vocabulary columns).",
    )
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("fasta", nargs="?", help="input FASTA file")
    source.add_argument(
        "--sequence",
        action="append",
        help="a sequence with at least one <mask>; repeat for more (ids seq1, seq2, ...)",
    )
    predict.add_argument("-o", "--output", help="output .json file (default: stdout)")
    _add_dtype(predict)
    _add_connection_options(predict)
    _add_batching_options(predict)
    predict.set_defaults(handler=run_predict)


def _add_score(commands: Any) -> None:
    score = commands.add_parser(
        "score",
        help="zero-shot scores of variants of one sequence, or of every single substitution",
        description="Scores the variants of a CSV's 'mutant' column (A42G, 1-based; "
        "multi-mutants A42G:L45P) or, with --scan, every single substitution, and writes the "
        "CSV back with one column per strategy (other columns kept). Scores are log-odds "
        "log p(mutant) - log p(wild type) summed over a variant's positions; "
        "pseudo_log_likelihood is the PLL of the variant's whole sequence.",
    )
    wild_type = score.add_mutually_exclusive_group(required=True)
    wild_type.add_argument("--wt", metavar="SEQ", help="the wild-type sequence")
    wild_type.add_argument("--wt-fasta", metavar="FASTA", help="a FASTA file of one record")
    variants = score.add_mutually_exclusive_group(required=True)
    variants.add_argument("--variants", metavar="CSV", help="a CSV with a 'mutant' column")
    variants.add_argument("--scan", action="store_true", help="every single substitution")
    score.add_argument("-o", "--output", help="output CSV (default: stdout)")
    score.add_argument(
        "--strategy",
        type=_strategy_list,
        default=["masked_marginal"],
        help=f"comma-separated, any of {','.join(STRATEGY_VALUES)} (default: masked_marginal)",
    )
    score.add_argument(
        "--truth",
        metavar="COLUMN",
        help="a measured column of the CSV (e.g. DMS_score): print each strategy's Spearman",
    )
    score.add_argument(
        "--heatmap",
        metavar="PNG",
        help="draw the position x amino-acid landscape (needs the plot extra: matplotlib)",
    )
    _add_connection_options(score)
    score.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    score.set_defaults(handler=run_score)


def _strategy_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    try:
        strategy_values(names)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return names


def _add_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", choices=list(DTYPE_NAMES), default="float32", help="wire precision"
    )


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=env_or(TARGET_ENV, DEFAULT_TARGET),
        help=f"service host:port (default: ${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="deadline of each request, in seconds"
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
        type=_positive_int,
        default=8,
        help="requests in flight at once (default: 8)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _include_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    try:
        for name in names:
            include_value(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


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


def _client(args: argparse.Namespace) -> Esm2Client:
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


def _read_records(path: str) -> list[FastaRecord]:
    try:
        records = read_fasta(path)
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None
    if not records:
        raise UsageError(f"{path}: no FASTA records")
    return records


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


def run_encode(args: argparse.Namespace) -> int:
    settings = _bulk_settings(args)
    _check_output_dir(args.output)
    if not Path(args.fasta).is_file():
        raise UsageError(f"{args.fasta}: no such file")
    store = ShardedStore(args.output, settings.job(), args.shard_records)
    try:
        if store.finished():
            print(f"esm2 encode: {args.output} is complete; nothing to do", file=sys.stderr)
            return 0
        done = store.open()
    except JobMismatch as error:
        raise UsageError(str(error)) from None
    allow_long = settings.long == "windows"
    entries, total = count_residues(screen(iter_fasta(args.fasta), allow_long))
    if not entries:
        raise UsageError(f"{args.fasta}: no FASTA records")
    rejects_path = f"{args.output}.rejects.tsv"
    started = time.monotonic()
    with _client(args) as client:
        concurrency = args.concurrency or _default_concurrency(client)
        disable = True if args.no_progress else None
        with tqdm(total=total, unit="res", unit_scale=True, desc="encode", disable=disable) as bar:
            encoder = BulkEncoder(client, settings, store, concurrency, bar)
            try:
                summary = encoder.run(screen(iter_fasta(args.fasta), allow_long), done)
            except JobMismatch as error:
                raise UsageError(str(error)) from None
            except BaseException:
                print(
                    f"\nesm2 encode: stopped; the records written so far are kept in "
                    f"{store.folder}: run the same command again to continue",
                    file=sys.stderr,
                )
                raise
            finally:
                write_rejects(rejects_path, encoder.summary.rejects)
    store.finish(list(VOCAB_TOKENS))
    print_summary(summary, args.output, rejects_path, time.monotonic() - started)
    _warn_if_random(summary.random_weights)
    return EXIT_REJECTS if summary.rejects else 0


def _bulk_settings(args: argparse.Namespace) -> BulkSettings:
    if Path(args.output).suffix not in (".h5", ".hdf5"):
        raise UsageError(f"{args.output}: esm2 encode writes HDF5; name the output .h5")
    if args.long == "windows":
        if not 0 <= args.overlap < args.window <= MAX_TOKENS:
            raise UsageError(
                f"--window {args.window} --overlap {args.overlap}: need "
                f"0 <= overlap < window <= {MAX_TOKENS:,}"
            )
        unmergeable = sorted({"contacts", "attentions"} & set(args.include))
        if unmergeable:
            raise UsageError(
                f"--long windows cannot merge {' and '.join(unmergeable)} across windows; "
                "leave them out, or use --long reject"
            )
    spec = EncodeSpec.parse(args.include, args.layers, args.dtype)
    problems = [v for v in encode_violations(spec.request(["M"])) if v.field.startswith("params")]
    if problems:
        raise UsageError("; ".join(f"{v.field}: {v.description}" for v in problems))
    return BulkSettings(
        include=tuple(args.include),
        layers=tuple(args.layers),
        dtype=args.dtype,
        long=args.long,
        window=args.window,
        overlap=args.overlap,
    )


def _default_concurrency(client: Esm2Client) -> int:
    """Two requests per live worker: one being computed, one waiting in the queue."""
    try:
        workers = len(client.status().workers)
    except grpc.RpcError:
        workers = 0
    return max(4, 2 * workers)


def write_rejects(path: str, rejects: list[Reject]) -> None:
    """id, line and reason of each rejected record, tab-separated; no file when none."""
    if not rejects:
        Path(path).unlink(missing_ok=True)
        return
    with open(path, "w", encoding="utf-8") as file:
        file.write("id\tline\treason\n")
        for reject in rejects:
            file.write(f"{reject.id}\t{reject.line}\t{reject.reason}\n")


def run_predict(args: argparse.Namespace) -> int:
    if args.fasta is not None:
        records = _read_records(args.fasta)
    else:
        records = [
            FastaRecord(f"seq{i}", sequence, 0) for i, sequence in enumerate(args.sequence, 1)
        ]
    vocab: list[str] = []
    documents: list[dict[str, Any]] = []
    random_weights = False
    _check_output_dir(args.output)
    _check_records(records, allow_mask=True)
    with _client(args) as client:
        predict = partial(client.predict, dtype=args.dtype)
        for record_id, result in _run_windows(records, predict, args):
            documents.append(predict_json(record_id, result))
            vocab = result.vocab_tokens
            random_weights |= result.model.random_weights
    _write_text(args.output, predict_document(vocab, documents))
    _warn_if_random(random_weights)
    return 0


def run_score(args: argparse.Namespace) -> int:
    wild_type = args.wt if args.wt is not None else _single_record(args.wt_fasta).sequence
    table = None
    if args.variants is not None:
        table = _read_table(args.variants)
    if args.truth and table is None:
        raise UsageError("--truth needs --variants: a scan has no measured column")
    _check_output_dir(args.output)
    _check_output_dir(args.heatmap)
    mutants = table.mutants if table is not None else None
    total = len(args.strategy) * (len(mutants) if mutants else 19 * len(wild_type))
    with _client(args) as client, _progress(args, total, "score") as bar:
        try:
            result = client.score(
                wild_type, mutants, scan=args.scan, strategies=args.strategy, on_scores=bar.update
            )
        except InvalidArgumentError as error:
            raise _name_rows(error, table) from None
    table = table or scan_table(result)
    if args.output is None:
        write_scored(table, result, sys.stdout)
    else:
        with open(args.output, "w", newline="", encoding="utf-8") as file:
            write_scored(table, result, file)
    if args.truth:
        _print_spearman(table, result, args.truth)
    if args.heatmap:
        _draw(result, wild_type, args.heatmap)
    _warn_if_random(result.model.random_weights)
    return 0


def _single_record(path: str) -> FastaRecord:
    records = _read_records(path)
    if len(records) != 1:
        raise UsageError(f"{path}: {len(records)} records; --wt-fasta takes a file of one")
    return records[0]


def _read_table(path: str) -> VariantTable:
    try:
        return read_variant_table(path)
    except (OSError, ValueError, csv.Error) as error:
        raise UsageError(str(error)) from None


def _name_rows(error: InvalidArgumentError, table: VariantTable | None) -> InvalidArgumentError:
    """`variants[i]` -> `variants[i] (CSV line N)`."""
    if table is None:
        return error
    named = []
    for field, description in error.violations:
        if field.startswith("variants["):
            index = int(field[len("variants[") : field.index("]")])
            field += f" (CSV line {table.lines[index]})"
        named.append((field, description))
    return InvalidArgumentError(named, error.request_ids)


def _print_spearman(table: VariantTable, result: ScoreResult, column: str) -> None:
    try:
        truth = measured_values(table, column)
    except ValueError as error:
        raise UsageError(str(error)) from None
    for name, scores in result.scores.items():
        rho, pairs = spearman(scores, truth)
        print(f"spearman {name} vs {column}: {rho:.4f} (n={pairs:,})", file=sys.stderr)


def _draw(result: ScoreResult, wild_type: str, path: str) -> None:
    if not result.log_probs:
        raise UsageError("--heatmap needs masked_marginal or wt_marginal among the strategies")
    try:
        draw_heatmap(result, wild_type, path)
    except ImportError:
        raise UsageError("--heatmap needs matplotlib: pip install 'esm2-service[plot]'") from None


def _progress(args: argparse.Namespace, total: int, what: str) -> tqdm:
    """A progress bar on stderr; silent unless stderr is a terminal."""
    disable = True if args.no_progress else None
    return tqdm(total=total, desc=what, unit="variant", disable=disable, file=sys.stderr)


def run_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.status()
    print(
        json_format.MessageToJson(
            response,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
            unquote_int64_if_possible=True,
        )
    )
    _warn_if_random(response.any_random_weights)
    return 0


def _check_output_dir(path: str | None) -> None:
    """Fails before any request if `path` could not be written for want of a folder."""
    if path is not None and not Path(path).absolute().parent.is_dir():
        raise UsageError(f"{path}: no such directory to write into")


def _write_text(path: str | None, text: str) -> None:
    if path is None:
        print(text)
        return
    with open(path, "w", encoding="utf-8") as file:
        file.write(text + "\n")


def _warn_if_random(random_weights: bool) -> None:
    if random_weights:
        print(
            "WARNING: the service runs RANDOM weights (a make-checkpoint --random "
            "checkpoint); its outputs are meaningless",
            file=sys.stderr,
        )


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


if __name__ == "__main__":
    sys.exit(main())
