"""The benchmark's interleaved rounds: stages alternate, so drift hits them all alike."""

from __future__ import annotations

import sys

from support import ROOT

sys.path.insert(0, str(ROOT))
from bench.timing import Contender, time_rounds  # noqa: E402

sys.path.pop(0)


def test_rounds_alternate_the_contenders_and_time_each_pass():
    calls = []
    contenders = {
        name: Contender(f"label {name}", lambda name=name: calls.append(name))
        for name in ("fair-esm", "hf", "service")
    }

    measured = time_rounds(contenders, repeats=3, residues=1000)

    rounds = len(calls) // 3
    assert 3 <= rounds <= 6  # a noisy machine may add up to `repeats` rounds
    assert calls == ["fair-esm", "hf", "service"] * rounds
    assert set(measured) == {"fair-esm", "hf", "service"}
    for name, throughput in measured.items():
        assert throughput.label == f"label {name}"
        assert throughput.residues == 1000
        assert len(throughput.seconds) == len(throughput.foreign_cpu_s) == rounds
        assert all(seconds >= 0 for seconds in throughput.seconds)
