"""Variant tables for `esm2 score`: CSV in and out, Spearman against measured fitness,
and the position x amino-acid heatmap."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .scores import ScoreResult

MUTANT_COLUMN = "mutant"
# Position labels on a heatmap's x axis; longer sequences label every k-th position.
MAX_TICKS = 60


@dataclass
class VariantTable:
    """A CSV's rows, in order, with the file line each row starts on."""

    columns: list[str]
    rows: list[dict[str, str]]
    lines: list[int]

    @property
    def mutants(self) -> list[str]:
        return [row[MUTANT_COLUMN].strip() for row in self.rows]


def read_variant_table(path: str | Path) -> VariantTable:
    """Raises ValueError for a file without a `mutant` column or without rows."""
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        columns = list(reader.fieldnames or [])
        if MUTANT_COLUMN not in columns:
            raise ValueError(f"{path}: no {MUTANT_COLUMN!r} column (columns: {columns})")
        rows, lines = [], []
        for row in reader:
            lines.append(reader.line_num)
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no variants")
    return VariantTable(columns, rows, lines)


def scan_table(result: ScoreResult) -> VariantTable:
    rows = [{MUTANT_COLUMN: mutant} for mutant in result.mutants]
    return VariantTable([MUTANT_COLUMN], rows, [0] * len(rows))


def write_scored(table: VariantTable, result: ScoreResult, file) -> None:
    """The table with one column per strategy, named as the strategy (replaced if there)."""
    columns = table.columns + [name for name in result.scores if name not in table.columns]
    writer = csv.DictWriter(file, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for index, row in enumerate(table.rows):
        scored = {name: f"{scores[index]:.6g}" for name, scores in result.scores.items()}
        writer.writerow({**row, **scored})


def measured_values(table: VariantTable, column: str) -> np.ndarray:
    """The column as floats, NaN where empty or not a number; ValueError if absent."""
    if column not in table.columns:
        raise ValueError(f"no column {column!r} to compare with (columns: {table.columns})")
    values = []
    for row in table.rows:
        try:
            values.append(float(row[column]))
        except (TypeError, ValueError):
            values.append(math.nan)
    return np.array(values)


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Spearman's rank correlation (ties get their average rank) over the pairs where
    both are finite, and the number of such pairs."""
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 2:
        return math.nan, int(keep.sum())
    rx, ry = _ranks(x[keep]), _ranks(y[keep])
    return float(np.corrcoef(rx, ry)[0, 1]), int(keep.sum())


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def draw_heatmap(result: ScoreResult, wild_type: str, path: str | Path) -> str:
    """Writes the landscape of log p(aa) - log p(wild type) at every scored position as
    an image; returns the strategy drawn. Needs matplotlib (the `plot` extra)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    strategy = next(iter(result.log_probs))
    log_odds = _log_odds(result, strategy, wild_type).T  # [20, positions]
    width = min(max(6.0, 4 + len(result.positions) / 12), 60)
    figure = Figure(figsize=(width, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(log_odds, aspect="auto", cmap="RdBu", interpolation="nearest")
    limit = np.nanmax(np.abs(log_odds)) or 1.0
    image.set_clim(-limit, limit)
    axes.set_yticks(range(len(result.amino_acids)), list(result.amino_acids))
    ticks, labels = wild_type_ticks(result.positions, wild_type)
    axes.set_xticks(ticks, labels, fontsize=7, rotation=90 if len(labels) > 20 else 0)
    axes.set_xlabel("wild-type residue and position")
    axes.set_ylabel("mutant residue")
    axes.set_title(f"ESM-2 8M, {strategy}\nlog p(mutant) - log p(wild type)")
    figure.colorbar(image, ax=axes, fraction=0.03)
    figure.savefig(path, dpi=120)
    return strategy


def _log_odds(result: ScoreResult, strategy: str, wild_type: str) -> np.ndarray:
    """[positions, 20]: each row's log p minus its wild-type residue's (NaN if none)."""
    table = result.log_probs[strategy]
    columns = {aa: i for i, aa in enumerate(result.amino_acids)}
    wild = np.array(
        [
            table[row, columns[wild_type[p - 1]]] if wild_type[p - 1] in columns else np.nan
            for row, p in enumerate(result.positions)
        ]
    )
    return table - wild[:, None]


def wild_type_ticks(positions: list[int], wild_type: str) -> tuple[range, list[str]]:
    """Tick indices and labels ("M1", "K2", ...), at most MAX_TICKS of them."""
    ticks = range(0, len(positions), max(1, math.ceil(len(positions) / MAX_TICKS)))
    return ticks, [f"{wild_type[positions[i] - 1]}{positions[i]}" for i in ticks]
