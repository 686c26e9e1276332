"""`python -m bench.http`: the HTTP/JSON door against gRPC, end to end, in one run.

One Redis, one worker, the gRPC frontend and `esm2 http` over the same queue. Each
round times one pass of the corpus through each contender in turn (requests of 8,
8 in flight): gRPC and HTTP, mean-only and per-token (last layer). Prints residues/s,
the ratio HTTP / gRPC, and the CPU milliseconds per request of the HTTP process and
of the gRPC frontend (a gateway in front of gRPC would spend both, plus its own gRPC
client). Then the memory check: the HTTP process's peak RSS while several of the
largest responses it allows are asked for at once. Writes bench/results/http.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from bench.corpus import CACHE_DIR, ensure_checkpoint, load_corpora, random_sequence
from bench.procfs import cpu_seconds, status_bytes
from bench.report import RESULTS_DIR, machine_info
from bench.service import ServiceProcesses
from bench.timing import Contender, time_rounds
from esm2_service.client import Esm2Client

BATCH = 8
IN_FLIGHT = 8
MODES = {"mean": ["mean"], "per_token": ["per_token"]}
# The memory check: requests of 8 x 2,048 residues, per-token embeddings of 3 layers
# (15.7 M floats, 236 MB of JSON by the door's own estimate: just under its 256 MB
# limit), this many at once, each read by a client that takes its time.
MEMORY_REQUESTS = 6
MEMORY_LAYERS = [-1, -2, -3]
MEMORY_RESIDUES = 2048
FLOAT32_BYTES = 4
JSON_BYTES_PER_FLOAT = 15  # the door's estimate: server.http_results.MAX_BYTES_PER_FLOAT


def batches(sequences: list[str]) -> list[list[str]]:
    return [sequences[i : i + BATCH] for i in range(0, len(sequences), BATCH)]


class HttpPasses:
    def __init__(self, base: str, sequences: list[str], include: list[str]):
        self.url = f"{base}/api/v3/esm2-8m/encode/"
        self.bodies = [
            json.dumps({"items": [{"sequence": s} for s in part], "params": {"include": include}})
            for part in batches(sequences)
        ]
        self.session = requests.Session()
        self.pool = ThreadPoolExecutor(IN_FLIGHT)

    def _post(self, body: str) -> int:
        response = self.session.post(self.url, data=body, timeout=600)
        response.raise_for_status()
        return len(response.json()["results"])  # parsed, as a client would

    def run_pass(self) -> None:
        list(self.pool.map(self._post, self.bodies))


class GrpcPasses:
    def __init__(self, client: Esm2Client, sequences: list[str], include: list[str]):
        self.client, self.sequences, self.include = client, sequences, include

    def run_pass(self) -> None:
        self.client.encode(self.sequences, include=self.include, repr_layers=[-1])


def memory_check(base: str, http_pid: int) -> dict:
    """Peak RSS of the HTTP process while MEMORY_REQUESTS of the largest responses it
    allows are gathered and streamed at once; the clients read at 64 MB/s each."""
    rng = np.random.default_rng(2048)
    body = json.dumps(
        {
            "items": [{"sequence": random_sequence(rng, MEMORY_RESIDUES)} for _ in range(BATCH)],
            "params": {"include": ["per_token"], "repr_layers": MEMORY_LAYERS},
        }
    )
    floats = BATCH * MEMORY_RESIDUES * 320 * len(MEMORY_LAYERS)
    url = f"{base}/api/v3/esm2-8m/encode/"

    def read_slowly(_: int) -> int:
        received = 0
        with requests.post(
            url, data=body, stream=True, timeout=1200, headers={"Accept-Encoding": "identity"}
        ) as response:
            response.raise_for_status()
            for piece in response.iter_content(1 << 20):
                received += len(piece)
                time.sleep(len(piece) / 64e6)
        return received

    before = status_bytes(http_pid, "VmRSS")
    started = time.perf_counter()
    with ThreadPoolExecutor(MEMORY_REQUESTS) as pool:
        received = list(pool.map(read_slowly, range(MEMORY_REQUESTS)))
    budget_floats = 2 * 256 * 2**20 // JSON_BYTES_PER_FLOAT  # esm2 http's defaults
    return {
        "requests": f"{MEMORY_REQUESTS} at once, each {BATCH} x {MEMORY_RESIDUES} residues, "
        f"per_token for layers {MEMORY_LAYERS}",
        "json_bytes_per_response": received[0],
        "all_responses_complete": len(set(received)) == 1,
        "seconds": round(time.perf_counter() - started, 1),
        "rss_before_bytes": before,
        "peak_rss_bytes": status_bytes(http_pid, "VmHWM"),
        "float32_bytes_per_response": floats * FLOAT32_BYTES,
        "budget_float32_bytes": budget_floats * FLOAT32_BYTES,
        "unbounded_float32_bytes": MEMORY_REQUESTS * floats * FLOAT32_BYTES,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--corpus", choices=("lognormal", "real"), default="lognormal")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--memory-only", action="store_true", help="only the memory check, not the rounds"
    )
    args = parser.parse_args(argv)
    corpus = load_corpora(args.corpus)[0]
    checkpoint = ensure_checkpoint()
    report = {"machine": machine_info(), "corpus": args.corpus, "residues": corpus.residues}
    with ServiceProcesses(checkpoint, args.threads, CACHE_DIR / "logs") as service:
        service.start_worker("bench-http-0")
        service.wait_serving()
        base = service.start_http()
        # First, while the HTTP process's peak RSS is its own start-up's.
        report["memory"] = memory_check(base, service.http.pid)
        if not args.memory_only:
            report["rows"] = throughput_rows(service, base, corpus, args.repeats)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "http.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = markdown(report)
    (args.output / "http.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def throughput_rows(service: ServiceProcesses, base: str, corpus, repeats: int) -> list[dict]:
    pids = {"http": service.http.pid, "frontend": service.frontend.pid}
    requests_per_pass = len(batches(corpus.sequences))
    cpu_s: dict[str, dict[str, float]] = {}
    passes_run: dict[str, int] = {}

    def counted(name: str, run_pass):
        """`run_pass`, adding the HTTP process's and the frontend's CPU to cpu_s[name]."""

        def run() -> None:
            before = {role: cpu_seconds(pid) for role, pid in pids.items()}
            run_pass()
            for role, pid in pids.items():
                cpu_s[name][role] += cpu_seconds(pid) - before[role]
            passes_run[name] += 1

        cpu_s[name], passes_run[name] = dict.fromkeys(pids, 0.0), 0
        return run

    with Esm2Client(service.target, timeout_s=600) as client:
        contenders = {}
        for mode, include in MODES.items():
            for door, passes in (
                ("grpc", GrpcPasses(client, corpus.sequences, include)),
                ("http", HttpPasses(base, corpus.sequences, include)),
            ):
                passes.run_pass()  # warm-up
                name = f"{door} {mode}"
                run = counted(name, passes.run_pass)
                contenders[name] = Contender(name, run, tuple(service.pids().values()))
        # One pass of each in turn per round, so a slow minute hits them all alike.
        timed = time_rounds(contenders, repeats, corpus.residues)
    cpu = {
        name: {
            role: round(1000 * s / (requests_per_pass * passes_run[name]), 2)
            for role, s in roles.items()
        }
        for name, roles in cpu_s.items()
    }
    rows = []
    for mode in MODES:
        grpc_tps, http_tps = timed[f"grpc {mode}"].tokens_per_s, timed[f"http {mode}"].tokens_per_s
        rows.append(
            {
                "mode": mode,
                "grpc_residues_per_s": round(grpc_tps),
                "http_residues_per_s": round(http_tps),
                "http_over_grpc": round(http_tps / grpc_tps, 3),
                "http_process_cpu_ms_per_request": cpu[f"http {mode}"]["http"],
                "grpc_frontend_cpu_ms_per_request": cpu[f"grpc {mode}"]["frontend"],
            }
        )
    return rows


def markdown(report: dict) -> list[str]:
    lines = []
    if "rows" in report:
        lines += [
            f"HTTP/JSON vs gRPC, corpus {report['corpus']} ({report['residues']:,} residues), "
            f"requests of {BATCH}, {IN_FLIGHT} in flight",
            "",
            "| outputs | gRPC residues/s | HTTP residues/s | HTTP / gRPC "
            "| HTTP process CPU ms/request | gRPC frontend CPU ms/request |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in report["rows"]:
            lines.append(
                f"| {row['mode']} | {row['grpc_residues_per_s']:,} | "
                f"{row['http_residues_per_s']:,} | {row['http_over_grpc']:.2f} | "
                f"{row['http_process_cpu_ms_per_request']} | "
                f"{row['grpc_frontend_cpu_ms_per_request']} |"
            )
        lines.append("")
    m = report["memory"]
    mb = 1e6
    lines += [
        f"HTTP process memory: {m['requests']} ({m['json_bytes_per_response'] / mb:,.0f} MB of "
        f"JSON each; all complete: {m['all_responses_complete']}; {m['seconds']} s)",
        "",
        "| RSS before | peak RSS | one response as float32 | budget (float32) "
        "| all responses as float32 |",
        "|---:|---:|---:|---:|---:|",
        f"| {m['rss_before_bytes'] / mb:,.0f} MB | {m['peak_rss_bytes'] / mb:,.0f} MB | "
        f"{m['float32_bytes_per_response'] / mb:,.0f} MB | "
        f"{m['budget_float32_bytes'] / mb:,.0f} MB | {m['unbounded_float32_bytes'] / mb:,.0f} MB |",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
