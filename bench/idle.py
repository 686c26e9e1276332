"""Latency after idle: one short request after 0, 0.15, 1 and 10 s without work.

A service with sparse traffic meets most requests after a pause, when the worker's
threads sleep and its caches are cold; back-to-back timings hide that. Every
contender gets the same pause before each call, in turn, so a noisy minute hits
them alike. Also reports the worker's CPU use while idle: staying fast must not
mean spinning a core.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

from bench.procfs import cpu_seconds
from esm2_service.esm2.v1 import esm2_pb2 as pb

IDLE_GAPS_S = (0.0, 0.15, 1.0, 10.0)
# Fewer calls after longer pauses: 10 s x 4 calls x 3 contenders is two minutes already.
CALLS_PER_GAP = {0.0: 30, 0.15: 15, 1.0: 8, 10.0: 4}
IDLE_CPU_WINDOW_S = 10.0
WORKER_RUNNER = "worker's runner in-process"


def python_work() -> None:
    """A fixed piece of pure Python (protobuf and JSON round trips), about 0.3 ms back to
    back: no I/O and no other thread to wake, so what a pause adds to it is the CPU's
    caches and predictors gone cold, which every process on a request's path pays."""
    request = pb.EncodeRequest(
        items=[pb.Item(sequence="MKTAYIAKQR" * 10)], params=pb.EncodeParams(repr_layers=[-1])
    )
    for _ in range(30):
        pb.EncodeRequest.FromString(request.SerializeToString())
        json.loads(json.dumps({"layers": list(range(40)), "id": "bench"}))


def _pause_or_repeat(call: Callable[[], object], gap: float) -> None:
    """Before a timed call: the pause, or with none, an untimed call of the same, so
    that back to back means right after itself, not after another contender (whose
    threads may still be spinning: torch's OpenMP threads spin for milliseconds after
    a pass). Contenders still take turns, so a noisy moment hits them all alike."""
    if gap:
        time.sleep(gap)
    else:
        call()


def idle_latency(calls: dict[str, Callable[[], object]], worker_pid: int | None) -> dict:
    """p50 ms of each of `calls` after each pause of IDLE_GAPS_S, and the worker's
    CPU share over IDLE_CPU_WINDOW_S without requests."""
    for call in calls.values():  # warm: the first call of each pays one-time costs
        for _ in range(3):
            call()
    table: dict[str, dict[str, float]] = {name: {} for name in calls}
    for gap in IDLE_GAPS_S:
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(CALLS_PER_GAP[gap]):
            for name, call in calls.items():
                _pause_or_repeat(call, gap)
                started = time.perf_counter()
                call()
                times[name].append(1000 * (time.perf_counter() - started))
        for name, values in times.items():
            table[name][f"{gap:g}"] = round(statistics.median(values), 2)
    result = {"gaps_s": list(IDLE_GAPS_S), "calls_per_gap": CALLS_PER_GAP, "p50_ms": table}
    if worker_pid is not None:
        before = cpu_seconds(worker_pid)
        time.sleep(IDLE_CPU_WINDOW_S)
        result["idle_worker_cpu_share"] = round(
            (cpu_seconds(worker_pid) - before) / IDLE_CPU_WINDOW_S, 4
        )
    return result


def idle_lines(result: dict) -> list[str]:
    gaps = [f"{gap:g}" for gap in result["gaps_s"]]
    lines = [
        "latency after idle, p50 ms of one request after a pause of:",
        f"  {'':36}" + "".join(f"{gap + ' s':>9}" for gap in gaps) + "   worst / back to back",
    ]
    for name, row in result["p50_ms"].items():
        worst = max(row[gap] for gap in gaps) / row[gaps[0]]
        cells = "".join(f"{row[gap]:>9.2f}" for gap in gaps)
        lines.append(f"  {name:36}{cells}   {worst:.2f}x")
    service = result["p50_ms"].get("service e2e")
    bases = {
        result.get("openvino_at_service_precision"): "(issue 12: at most +3 ms)",
        WORKER_RUNNER: "(what the service adds to its own arithmetic)",
    }
    for base, note in bases.items():
        if service and base in result["p50_ms"]:
            row = result["p50_ms"][base]
            cells = "".join(f"{service[gap] - row[gap]:>+9.2f}" for gap in gaps)
            lines.append(f"  {'service - ' + base:36}{cells}   {note}")
    if "idle_worker_cpu_share" in result:
        lines.append(
            f"  idle worker CPU: {result['idle_worker_cpu_share']:.1%} of a core over "
            f"{IDLE_CPU_WINDOW_S:g} s without requests"
        )
    return lines
