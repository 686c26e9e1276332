"""`esm2 score` against live processes: CSV in and out, Spearman, heatmap, errors."""

from __future__ import annotations

import csv

import numpy as np
from support import esm2, reference_masked_marginal, reference_wt_marginal, tem1_variants

from esm2_service.client.variant_table import spearman


def write_tem1_csv(path, every: int = 200) -> list[tuple[str, float]]:
    _, variants = tem1_variants()
    sample = variants[::every]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["mutant", "DMS_score", "note"])
        for mutant, fitness in sample:
            writer.writerow([mutant, fitness, f"kept {mutant}"])
    return sample


def test_score_writes_the_csv_back_with_a_column_per_strategy_and_prints_spearman(
    service, tiny_reference, tmp_path
):
    wild_type, _ = tem1_variants()
    (tmp_path / "wt.fasta").write_text(f">tem1 TEM-1\n{wild_type[:150]}\n{wild_type[150:]}\n")
    sample = write_tem1_csv(tmp_path / "variants.csv")
    out = tmp_path / "scored.csv"

    result = esm2(
        "score",
        "--wt-fasta",
        tmp_path / "wt.fasta",
        "--variants",
        tmp_path / "variants.csv",
        "-o",
        out,
        "--strategy",
        "masked_marginal,wt_marginal",
        "--truth",
        "DMS_score",
        "--target",
        service.target,
    )

    assert result.returncode == 0, result.stderr
    with open(out, newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["mutant", "DMS_score", "note", "masked_marginal", "wt_marginal"]
    assert [row["mutant"] for row in rows] == [mutant for mutant, _ in sample]
    assert rows[3]["note"] == f"kept {sample[3][0]}"
    mm = np.array([float(row["masked_marginal"]) for row in rows])
    wt = np.array([float(row["wt_marginal"]) for row in rows])
    for index in (0, 5, len(rows) - 1):
        mutant = sample[index][0]
        assert abs(mm[index] - reference_masked_marginal(tiny_reference, wild_type, mutant)) < 1e-4
        assert abs(wt[index] - reference_wt_marginal(tiny_reference, wild_type, mutant)) < 1e-4
    truth = np.array([fitness for _, fitness in sample])
    rho, pairs = spearman(mm, truth)
    assert f"spearman masked_marginal vs DMS_score: {rho:.4f} (n={pairs:,})" in result.stderr
    assert "RANDOM weights" in result.stderr


def test_scan_prints_every_substitution_and_draws_the_heatmap(service, tmp_path):
    png = tmp_path / "scan.png"

    result = esm2(
        "score", "--wt", "MKTAYIAKQR", "--scan", "--heatmap", png, "--target", service.target
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "mutant,masked_marginal"
    assert len(lines) == 1 + 19 * 10
    assert lines[1].startswith("M1A,")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_variants_are_named_by_csv_line_and_nothing_is_written(service, tmp_path):
    (tmp_path / "bad.csv").write_text("mutant,score\nK2A,1\nA2G,2\nM1M:Q9X,3\n")
    out = tmp_path / "scored.csv"

    result = esm2(
        "score",
        "--wt",
        "MKTAYIAKQR",
        "--variants",
        tmp_path / "bad.csv",
        "-o",
        out,
        "--target",
        service.target,
    )

    assert result.returncode == 2
    assert "variants[1] (CSV line 3): A2G: the wild type has 'K' at position 2, not 'A'" in (
        result.stderr
    )
    assert "variants[2] (CSV line 4): Q9X: mutant residue 'X' is not one of the 20" in (
        result.stderr
    )
    assert not out.exists()


def test_usage_errors_exit_2(service, tmp_path):
    (tmp_path / "no_mutant.csv").write_text("variant,score\nK2A,1\n")
    missing = esm2("score", "--wt", "MKT", "--variants", tmp_path / "no_mutant.csv")
    unknown = esm2("score", "--wt", "MKT", "--scan", "--strategy", "esm1v")
    scan_truth = esm2("score", "--wt", "MKT", "--scan", "--truth", "DMS_score")

    assert missing.returncode == 2 and "no 'mutant' column" in missing.stderr
    assert unknown.returncode == 2 and "unknown strategy 'esm1v'" in unknown.stderr
    assert scan_truth.returncode == 2 and "--truth needs --variants" in scan_truth.stderr


def test_spearman_averages_tied_ranks_and_skips_missing_values():
    rho, pairs = spearman(np.array([1.0, 2.0, 2.0, 3.0, np.nan]), np.array([1, 2, 3, 4, 5.0]))
    assert pairs == 4
    assert rho == np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1]
