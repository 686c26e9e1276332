"""The benchmark's ratios: best and median passes, and the runner only at its own precision."""

from __future__ import annotations

import sys

from support import ROOT

sys.path.insert(0, str(ROOT))
from bench.report import ratios  # noqa: E402

sys.path.pop(0)


def _rates(best: float, median: float) -> dict:
    return {"tokens_per_s": best, "median_tokens_per_s": median}


def test_ratios_give_best_and_median_passes_and_judge_the_target_on_the_best():
    throughput = {
        "openvino-bf16": _rates(10_000, 9_000),
        "runner": _rates(12_500, 10_800),
        "service": _rates(12_000, 9_900),
    }

    found = {row["name"]: row for row in ratios(throughput, "bf16")}

    assert found["service / openvino-bf16"]["value"] == 1.2
    assert found["service / openvino-bf16"]["median_value"] == 1.1
    assert found["service / openvino-bf16"]["pass"] is True
    assert found["service / runner"]["value"] == 0.96
    assert found["runner / openvino-bf16"]["median_value"] == 1.2


def test_the_runner_is_compared_with_openvino_at_the_workers_precision_only():
    throughput = {
        "openvino": _rates(5_000, 5_000),
        "openvino-bf16": _rates(10_000, 10_000),
        "runner": _rates(6_000, 6_000),
    }

    names = [row["name"] for row in ratios(throughput, "fp32")]

    assert names == ["runner / openvino"]
