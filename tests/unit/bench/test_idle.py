"""The latency-after-idle table: contenders take turns, and back to back means right
after the same contender's own call."""

from __future__ import annotations

import sys

from support import ROOT

sys.path.insert(0, str(ROOT))
from bench import idle  # noqa: E402

sys.path.pop(0)


def test_back_to_back_each_timed_call_follows_its_own_and_contenders_take_turns(monkeypatch):
    monkeypatch.setattr(idle, "IDLE_GAPS_S", (0.0,))
    monkeypatch.setattr(idle, "CALLS_PER_GAP", {0.0: 2})
    made = []
    calls = {name: (lambda name=name: made.append(name)) for name in ("service", "openvino")}

    result = idle.idle_latency(calls, worker_pid=None)

    warm_up = ["service"] * 3 + ["openvino"] * 3  # the first calls pay one-time costs
    assert made == warm_up + ["service", "service", "openvino", "openvino"] * 2
    assert set(result["p50_ms"]) == {"service", "openvino"}
    assert all(row["0"] >= 0 for row in result["p50_ms"].values())


def test_after_a_pause_every_call_is_timed_once_in_turn(monkeypatch):
    monkeypatch.setattr(idle, "IDLE_GAPS_S", (0.01,))
    monkeypatch.setattr(idle, "CALLS_PER_GAP", {0.01: 2})
    made = []
    calls = {name: (lambda name=name: made.append(name)) for name in ("service", "openvino")}

    result = idle.idle_latency(calls, worker_pid=None)

    warm_up = ["service"] * 3 + ["openvino"] * 3  # the first calls pay one-time costs
    assert made == warm_up + ["service", "openvino"] * 2
    assert set(result["p50_ms"]["service"]) == {"0.01"}
    assert result["p50_ms"]["service"]["0.01"] < 10  # the pause itself is not timed
