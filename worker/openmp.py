"""How torch's OpenMP threads wait between parallel regions; set before torch loads.

A forward pass runs a few hundred short parallel regions. Sleeping between them
(OMP_WAIT_POLICY=PASSIVE) makes every region pay a futex wake-up: about 20% of a
100-residue request on this 2-core machine (18.6 vs 15.3 ms). libgomp's default
spins 300,000 iterations after each region, which takes cores from the frontend
and Redis sharing the machine once the batch is done. 10,000 spins bridge the gaps
inside a forward pass and are over within microseconds of its end.
"""

from __future__ import annotations

import os

SPIN_COUNT = "10000"


def configure_openmp_wait() -> None:
    """Short spins, then sleep, unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set already."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
