"""Timing helpers: repeated wall-clock passes and latency percentiles."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Throughput:
    """Timed passes over one corpus; tokens/s counts residues only."""

    label: str
    residues: int
    seconds: list[float]  # wall seconds of each timed pass

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def tokens_per_s(self) -> float:
        """Residues per wall second of the median pass."""
        return self.residues / self.median_s

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "residues": self.residues,
            "pass_seconds": [round(s, 4) for s in self.seconds],
            "median_seconds": round(self.median_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 1),
        }


def time_passes(run_pass: Callable[[], object], repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `run_pass`."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run_pass()
        seconds.append(time.perf_counter() - started)
    return seconds


@dataclass(frozen=True)
class Latency:
    """Per-call wall times of one small request, in milliseconds."""

    label: str
    milliseconds: list[float]

    def percentile(self, q: float) -> float:
        """The q-th percentile (0..100) in ms, linearly interpolated."""
        return float(np.percentile(self.milliseconds, q))

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "calls": len(self.milliseconds),
            "p50_ms": round(self.p50, 3),
            "p90_ms": round(self.percentile(90), 3),
            "p99_ms": round(self.p99, 3),
            "min_ms": round(min(self.milliseconds), 3),
            "max_ms": round(max(self.milliseconds), 3),
        }


def time_calls(call: Callable[[], object], warmup: int, repeats: int, label: str) -> Latency:
    """`warmup` untimed calls, then the ms of each of `repeats` sequential calls."""
    for _ in range(warmup):
        call()
    return Latency(label, [1000 * s for s in time_passes(call, repeats)])
