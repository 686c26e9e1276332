"""A short chaos run (bench/chaos.py): every fault at once, nothing lost or duplicated."""

from __future__ import annotations

import sys

from support import ROOT

sys.path.insert(0, str(ROOT))
from bench.chaos import chaos_run  # noqa: E402

sys.path.pop(0)


def test_chaos_run_loses_and_duplicates_nothing(full_checkpoint, capsys):
    tally = chaos_run(full_checkpoint, seconds=24, clients=5, max_queue_items=24)
    report = capsys.readouterr().out
    assert tally.lost == [], report
    assert tally.duplicated == 0, report
    assert tally.completed >= 10, report
    assert tally.sent == tally.completed + sum(tally.failed_right.values())
    assert "kill -9 a worker" in report and "stop Redis" in report
