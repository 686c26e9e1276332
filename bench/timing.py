"""Timing helpers: repeated wall-clock passes and latency percentiles.

The machine may be shared, so every timing also records how many CPU seconds
processes other than the measured ones used meanwhile (`ForeignCpu`).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from bench.procfs import ForeignCpu

# Other processes using more than this share of one core make a timing noisy.
NOISY_SHARE = 0.05


@dataclass(frozen=True)
class Throughput:
    """Timed passes over one corpus; tokens/s counts residues only, of the fastest pass."""

    label: str
    residues: int
    seconds: list[float]  # wall seconds of each timed pass
    foreign_cpu_s: list[float]  # CPU seconds other processes used during each pass

    @property
    def best(self) -> int:
        """Index of the fastest pass: the least disturbed on a shared machine."""
        return min(range(len(self.seconds)), key=self.seconds.__getitem__)

    @property
    def best_s(self) -> float:
        return self.seconds[self.best]

    @property
    def tokens_per_s(self) -> float:
        """Residues per wall second of the fastest pass."""
        return self.residues / self.best_s

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "residues": self.residues,
            "pass_seconds": [round(s, 4) for s in self.seconds],
            "pass_foreign_cpu_s": [round(s, 2) for s in self.foreign_cpu_s],
            "best_seconds": round(self.best_s, 4),
            "median_seconds": round(statistics.median(self.seconds), 4),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "median_tokens_per_s": round(self.residues / statistics.median(self.seconds), 1),
            "best_pass_foreign_cpu_s": round(self.foreign_cpu_s[self.best], 2),
            "best_pass_noisy": is_noisy(self.best_s, self.foreign_cpu_s[self.best]),
        }


def is_noisy(seconds: float, foreign_cpu_s: float) -> bool:
    """Whether other processes took more than NOISY_SHARE of a core during a timing."""
    return foreign_cpu_s > NOISY_SHARE * seconds


def time_passes(
    run_pass: Callable[[], object], repeats: int, pids: Iterable[int] | None = None
) -> tuple[list[float], list[float]]:
    """Wall seconds of `repeats` calls of `run_pass`, and the CPU seconds processes
    other than `pids` (default: this one) used during each. While the fastest pass
    so far was noisy (`is_noisy`), up to `repeats` more passes are run."""
    foreign = ForeignCpu(pids if pids is not None else [os.getpid()])
    seconds, foreign_cpu = [], []
    while len(seconds) < repeats or (
        len(seconds) < 2 * repeats and is_noisy(*_fastest(seconds, foreign_cpu))
    ):
        foreign.start()
        started = time.perf_counter()
        run_pass()
        seconds.append(time.perf_counter() - started)
        foreign_cpu.append(foreign.stop())
    return seconds, foreign_cpu


def _fastest(seconds: list[float], foreign_cpu: list[float]) -> tuple[float, float]:
    return min(zip(seconds, foreign_cpu, strict=True))


@dataclass(frozen=True)
class Latency:
    """Per-call wall times of one small request, in milliseconds."""

    label: str
    milliseconds: list[float]
    foreign_cpu_s: float  # CPU seconds other processes used during all the timed calls

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
            "foreign_cpu_s": round(self.foreign_cpu_s, 2),
        }


def time_interleaved(
    calls: dict[str, Callable[[], object]], repeats: int, pids: Iterable[int] | None = None
) -> dict[str, Latency]:
    """ms of `repeats` rounds of sequential calls, each round calling every one of
    `calls` once in turn, so that a shared machine's noise hits them all alike.
    Returns a Latency per label of `calls`; no warm-up here."""
    foreign = ForeignCpu(pids if pids is not None else [os.getpid()])
    foreign.start()
    milliseconds: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(repeats):
        for label, call in calls.items():
            started = time.perf_counter()
            call()
            milliseconds[label].append(1000 * (time.perf_counter() - started))
    foreign_s = foreign.stop()
    return {label: Latency(label, ms, foreign_s) for label, ms in milliseconds.items()}
