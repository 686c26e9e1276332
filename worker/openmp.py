"""How torch's OpenMP threads wait between parallel regions; set before torch loads.

A forward pass runs a few hundred short parallel regions. A thread that sleeps
between them (OMP_WAIT_POLICY=PASSIVE, or too short a spin) pays a futex wake-up
per region, and after the machine has been idle a while each wake-up costs far
more: the virtual CPUs are halted, so a 100-residue request was 1.5x slower after
a 1 to 10 s pause than back to back (`python -m bench`, "latency after idle",
2026-12-02). Spinning 300,000 iterations (libgomp's own default when nothing is
set) bridges every gap inside a pass and ends within milliseconds of its end: an
idle worker still uses 0.3% of a core, the after-idle penalty fell to 1.15x, and
service throughput rose 10% on the same host (10,000 spins, tried before, slept
inside passes).
"""

from __future__ import annotations

import os

SPIN_COUNT = "300000"


def configure_openmp_wait() -> None:
    """Spins between regions, then sleeps, unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is
    set already. Set explicitly, not left to libgomp, whose default drops to 100 spins
    whenever it counts more threads than CPUs."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
