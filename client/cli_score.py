"""`esm2 score`: variants of a CSV, or a full scan, scored by the service."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from typing import Any

from tqdm import tqdm

from esm2_service.cli_help import HelpFormatter, epilog

from .cli_options import (
    UsageError,
    add_connection_options,
    check_output_dir,
    client_from_args,
    read_records,
    warn_if_random,
)
from .fasta import FastaRecord
from .rich_errors import InvalidArgumentError
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


def add_score_command(commands: Any) -> None:
    score = commands.add_parser(
        "score",
        help="zero-shot scores of variants of one sequence, or of every single substitution",
        description="Scores the variants of a CSV's 'mutant' column (A42G, 1-based; "
        "multi-mutants A42G:L45P) or, with --scan, every single substitution, and writes the "
        "CSV back with one column per strategy (other columns kept). Scores are log-odds "
        "log p(mutant) - log p(wild type) summed over a variant's positions; "
        "pseudo_log_likelihood is the PLL of the variant's whole sequence.",
        epilog=epilog("esm2 score --wt MKTAYIAKQRQISFVK --scan --heatmap scan.png -o scan.csv"),
        formatter_class=HelpFormatter,
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
    add_connection_options(score)
    score.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    score.set_defaults(handler=run_score)


def _strategy_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    try:
        strategy_values(names)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return names


def run_score(args: argparse.Namespace) -> int:
    wild_type = args.wt if args.wt is not None else _single_record(args.wt_fasta).sequence
    table = None
    if args.variants is not None:
        table = _read_table(args.variants)
    if args.truth and table is None:
        raise UsageError("--truth needs --variants: a scan has no measured column")
    check_output_dir(args.output)
    check_output_dir(args.heatmap)
    if args.heatmap and importlib.util.find_spec("matplotlib") is None:  # before the scoring
        raise UsageError(
            "--heatmap needs matplotlib, which this environment lacks: pip install matplotlib "
            "(in a clone set up by make: .venv/bin/pip install matplotlib)"
        )
    mutants = table.mutants if table is not None else None
    total = len(args.strategy) * (len(mutants) if mutants else 19 * len(wild_type))
    with client_from_args(args) as client, _progress(args, total, "score") as bar:
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
    warn_if_random(result.model.random_weights)
    return 0


def _single_record(path: str) -> FastaRecord:
    records = read_records(path)
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
    draw_heatmap(result, wild_type, path)


def _progress(args: argparse.Namespace, total: int, what: str) -> tqdm:
    """A progress bar on stderr; silent unless stderr is a terminal."""
    disable = True if args.no_progress else None
    return tqdm(total=total, desc=what, unit="variant", disable=disable, file=sys.stderr)
