"""`esm2 encode`: a FASTA file of any size to HDF5 (see bulk.py and h5store.py)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from esm2_service.alphabet import VOCAB_TOKENS
from esm2_service.cli_help import CLIENT_EXIT_CODES, HelpFormatter, epilog
from esm2_service.validation import MAX_TOKENS, encode_violations

from .bulk import BulkEncoder, BulkSettings, count_residues, print_summary
from .bulk_records import (
    DEFAULT_OVERLAP,
    DEFAULT_WINDOW,
    RECORD_KEYS,
    Accepted,
    Reject,
    screen,
)
from .cli_options import (
    UsageError,
    add_connection_options,
    add_dtype,
    check_output_dir,
    client_from_args,
    include_list,
    int_list,
    positive_int,
    warn_if_random,
)
from .client import Esm2Client
from .fasta import iter_fasta
from .h5store import H5_LAYOUT, SHARD_RECORDS, JobMismatch, ShardedStore
from .interrupts import ctrl_c_stops
from .params import INCLUDE_NAMES, EncodeSpec

# `esm2 encode` finished, but some records were rejected (listed in OUT.rejects.tsv).
EXIT_REJECTS = 3


def add_encode_command(commands: Any) -> None:
    encode = commands.add_parser(
        "encode",
        help="embeddings and other tensors of a FASTA file of any size, to HDF5",
        description="Encodes every record of a FASTA file into an HDF5 file keyed by record "
        "id (or accession: --key), streaming, with a bounded number of requests in flight. "
        "Interrupted (Ctrl-C, a crash, a lost connection), the same command continues where "
        "it stopped; it refuses to if the settings changed. Bad records are listed in "
        "OUT.rejects.tsv and the rest is encoded; the exit code is then 3.",
        epilog=epilog(
            "esm2 encode proteins.fasta -o embeddings.h5 --include mean,contacts",
            {
                **CLIENT_EXIT_CODES,
                EXIT_REJECTS: "done, but some records rejected (OUT.rejects.tsv)",
            },
            H5_LAYOUT,
        ),
        formatter_class=HelpFormatter,
    )
    encode.add_argument("fasta", help="input FASTA file")
    encode.add_argument("-o", "--output", required=True, help="output HDF5 file (.h5)")
    encode.add_argument(
        "--include",
        type=include_list,
        default=["mean"],
        help=f"comma-separated, any of {','.join(INCLUDE_NAMES)} (default: mean)",
    )
    encode.add_argument(
        "--layers",
        type=int_list,
        default=[-1],
        help="comma-separated layers 0-6 for mean, per_token and bos; -1 is the last (default: -1)",
    )
    add_dtype(encode)
    encode.add_argument(
        "--long",
        choices=["reject", "windows"],
        default="reject",
        help=f"sequences over {MAX_TOKENS:,} residues: list them as rejects (default), or "
        "embed overlapping windows, averaged where they overlap",
    )
    encode.add_argument(
        "--window",
        type=positive_int,
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
    encode.add_argument(
        "--key",
        choices=list(RECORD_KEYS),
        default="id",
        help="what names each record in the output: id, the first word of its header line "
        "after '>' (default); or accession, the middle field of a db|ACCESSION|NAME id "
        "(>sp|P00698|LYSC_CHICK: P00698), else the id",
    )
    add_connection_options(encode)
    encode.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        help="requests of 8 sequences in flight (default: 2 per live worker, at least 4)",
    )
    encode.add_argument(
        "--shard-records",
        type=positive_int,
        default=SHARD_RECORDS,
        help=f"records per shard while the job runs: at most this many are computed again "
        f"after a crash (default: {SHARD_RECORDS:,})",
    )
    encode.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    encode.set_defaults(handler=run_encode)


def run_encode(args: argparse.Namespace) -> int:
    settings = _bulk_settings(args)
    check_output_dir(args.output)
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
    entries, total = count_residues(_screened(args.fasta, settings))
    if not entries:
        raise UsageError(f"{args.fasta}: no FASTA records")
    rejects_path = f"{args.output}.rejects.tsv"
    started = time.monotonic()
    with client_from_args(args) as client:
        concurrency = args.concurrency or _default_concurrency(client)
        disable = True if args.no_progress else None
        progress = tqdm(total=total, unit="res", unit_scale=True, desc="encode", disable=disable)
        with progress as bar, ctrl_c_stops() as ctrl_c:
            encoder = BulkEncoder(client, settings, store, concurrency, bar, ctrl_c)
            try:
                summary = encoder.run(_screened(args.fasta, settings), done)
            except JobMismatch as error:
                raise UsageError(str(error)) from None
            except BaseException:
                print(f"\nesm2 encode: {_stopped(store)}", file=sys.stderr)
                raise
            finally:
                write_rejects(rejects_path, encoder.summary.rejects)
    store.finish(list(VOCAB_TOKENS))
    print_summary(summary, args.output, rejects_path, time.monotonic() - started)
    warn_if_random(summary.random_weights)
    return EXIT_REJECTS if summary.rejects else 0


def _screened(fasta: str, settings: BulkSettings) -> Iterator[Accepted | Reject]:
    return screen(iter_fasta(fasta), settings.long == "windows", settings.key)


def _stopped(store: ShardedStore) -> str:
    if not store.holds_records():
        return "stopped before any record was written"
    return (
        f"stopped; the records written so far are kept in {store.folder}: run the same "
        "command again to continue"
    )


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
        key=args.key,
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
