"""Timing helpers: passes over a corpus timed in interleaved rounds, and latency percentiles.

The machine may be shared, so every timing also records how many CPU seconds
processes other than the measured ones used meanwhile (`ForeignCpu`).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
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


@dataclass(frozen=True)
class Contender:
    """One way of running a pass over a corpus, warmed up and ready to be timed."""

    label: str
    run_pass: Callable[[], object]
    pids: tuple[int, ...] = ()  # the processes doing its work (default: this one)


def time_rounds(
    contenders: Mapping[str, Contender], repeats: int, residues: int
) -> dict[str, Throughput]:
    """Throughput of each contender over `repeats` rounds, a round being one pass of
    every contender in turn: a shared machine's slow minutes then hit them all alike,
    and ratios between them are measured side by side. While some contender's fastest
    pass was noisy (`is_noisy`), up to `repeats` more rounds are run."""
    foreign = {
        name: ForeignCpu(contender.pids or [os.getpid()]) for name, contender in contenders.items()
    }
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    foreign_cpu: dict[str, list[float]] = {name: [] for name in contenders}

    def any_noisy() -> bool:
        return any(is_noisy(*_fastest(seconds[n], foreign_cpu[n])) for n in contenders)

    rounds = 0
    while rounds < repeats or (rounds < 2 * repeats and any_noisy()):
        for name, contender in contenders.items():
            foreign[name].start()
            started = time.perf_counter()
            contender.run_pass()
            seconds[name].append(time.perf_counter() - started)
            foreign_cpu[name].append(foreign[name].stop())
        rounds += 1
    return {
        name: Throughput(contender.label, residues, seconds[name], foreign_cpu[name])
        for name, contender in contenders.items()
    }


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
