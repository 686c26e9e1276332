"""The latency-after-idle table's call order: interleaved after pauses, blocks back to back."""

from __future__ import annotations

import sys

from support import ROOT

sys.path.insert(0, str(ROOT))
from bench.idle import _call_order  # noqa: E402

sys.path.pop(0)


def test_after_a_pause_contenders_take_turns():
    calls = {"service": print, "openvino": len}

    order = [name for name, _ in _call_order(calls, repeats=2, gap=0.15)]

    assert order == ["service", "openvino", "service", "openvino"]


def test_back_to_back_each_contender_runs_its_calls_in_one_block():
    calls = {"service": print, "openvino": len}

    order = [(name, call) for name, call in _call_order(calls, repeats=2, gap=0.0)]

    assert order == [("service", print), ("service", print), ("openvino", len), ("openvino", len)]
