"""Readings from /proc: peak memory and CPU seconds of processes, and machine-wide CPU use."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def status_bytes(pid: int, field: str) -> int:
    """A memory field of /proc/<pid>/status (VmHWM: peak RSS, VmRSS: current), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(f"{field} not in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds used so far by all threads of `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields[:7])
    return (user + nice + system + irq + softirq) / _TICKS_PER_S


class ForeignCpu:
    """CPU seconds that processes other than `pids` used between `start()` and `stop()`:
    how much the rest of a shared machine competed with a measurement."""

    def __init__(self, pids: Iterable[int]):
        self.pids = list(pids)
        self._start = (0.0, 0.0)

    def _reading(self) -> tuple[float, float]:
        return machine_busy_seconds(), sum(cpu_seconds(pid) for pid in self.pids)

    def start(self) -> None:
        self._start = self._reading()

    def stop(self) -> float:
        """Foreign CPU seconds since `start()` (never negative)."""
        machine, ours = self._reading()
        return max(0.0, (machine - self._start[0]) - (ours - self._start[1]))
