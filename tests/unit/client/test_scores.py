"""Planning a Score of any size into requests within the service's limits, and merging."""

from __future__ import annotations

import numpy as np

from esm2_service.client.results import ModelInfo
from esm2_service.client.scores import (
    MAX_REQUEST_VARIANT_BYTES,
    ScoreResult,
    merge_results,
    plan_requests,
    score_request,
)
from esm2_service.variants import MAX_FORWARD_PASSES, MAX_VARIANTS

WILD_TYPE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQ"


def singles(count: int) -> list[str]:
    return [
        f"{WILD_TYPE[i % 83]}{i % 83 + 1}{'ACDEFGHIKLMNPQRSTVWY'[i % 20]}" for i in range(count)
    ]


def test_a_small_score_is_one_request_unchanged():
    request = score_request(WILD_TYPE, singles(10), False, ["masked_marginal"])
    assert plan_requests(request) == [(0, request)]
    scan = score_request(WILD_TYPE, None, True, ["masked_marginal", "wt_marginal"])
    assert plan_requests(scan) == [(0, scan)]


def test_variants_beyond_a_request_are_consecutive_slices_within_every_limit():
    mutants = singles(MAX_VARIANTS + 7_000)
    plans = plan_requests(score_request(WILD_TYPE, mutants, False, ["masked_marginal"]))

    assert [offset for offset, _ in plans] == [
        0,
        *np.cumsum([len(r.variants) for _, r in plans])[:-1],
    ]
    assert [v for _, r in plans for v in r.variants] == mutants
    for _, request in plans:
        assert len(request.variants) <= MAX_VARIANTS
        assert sum(len(v) + 4 for v in request.variants) <= MAX_REQUEST_VARIANT_BYTES


def test_pseudo_log_likelihood_is_split_by_forward_passes_and_a_large_scan_expanded():
    plans = plan_requests(score_request(WILD_TYPE, None, True, ["pseudo_log_likelihood"]))

    assert all(not request.scan for _, request in plans)
    assert sum(len(request.variants) for _, request in plans) == 19 * len(WILD_TYPE)
    for _, request in plans:
        assert len(WILD_TYPE) * len(request.variants) <= MAX_FORWARD_PASSES
    assert plans[0][1].variants[:2] == ["M1A", "M1C"]


def test_merged_results_keep_the_variant_order_and_every_position_once():
    model = ModelInfo("esm2", "ab" * 32, False, "cpu")
    first = ScoreResult(
        ["A4G"], {"masked_marginal": np.array([1.0])}, [4],
        {"masked_marginal": np.full((1, 20), 4.0)}, "ACDEFGHIKLMNPQRSTVWY", 1, model,
    )  # fmt: skip
    second = ScoreResult(
        ["Q9W", "A4C"], {"masked_marginal": np.array([2.0, 3.0])}, [4, 9],
        {"masked_marginal": np.stack([np.full(20, 4.0), np.full(20, 9.0)])},
        "ACDEFGHIKLMNPQRSTVWY", 2, model,
    )  # fmt: skip

    merged = merge_results([first, second])

    assert merged.mutants == ["A4G", "Q9W", "A4C"]
    np.testing.assert_array_equal(merged.scores["masked_marginal"], [1.0, 2.0, 3.0])
    assert merged.positions == [4, 9]
    np.testing.assert_array_equal(merged.log_probs["masked_marginal"][:, 0], [4.0, 9.0])
    assert merged.forward_passes == 3
