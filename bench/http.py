"""`python -m bench.http`: the HTTP/JSON door against gRPC, end to end, in one run.

One Redis, one worker, the gRPC frontend and `esm2 http` over the same queue. Each
round times one pass of the corpus through each contender in turn (requests of 8,
8 in flight): gRPC and HTTP, mean-only and per-token (last layer). Prints residues/s,
the ratio HTTP / gRPC, and the CPU milliseconds per request of the HTTP process and
of the gRPC frontend (a gateway in front of gRPC would spend both, plus its own gRPC
client). Writes bench/results/http.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench.corpus import CACHE_DIR, ensure_checkpoint, load_corpora
from bench.procfs import cpu_seconds
from bench.report import RESULTS_DIR, machine_info
from bench.service import ServiceProcesses
from bench.timing import Contender, time_rounds
from esm2_service.client import Esm2Client

BATCH = 8
IN_FLIGHT = 8
MODES = {"mean": ["mean"], "per_token": ["per_token"]}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--corpus", choices=("lognormal", "real"), default="lognormal")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    corpus = load_corpora(args.corpus)[0]
    checkpoint = ensure_checkpoint()
    with ServiceProcesses(checkpoint, args.threads, CACHE_DIR / "logs") as service:
        service.start_worker("bench-http-0")
        service.wait_serving()
        base = service.start_http()
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
            timed = time_rounds(contenders, args.repeats, corpus.residues)
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
    report = {
        "machine": machine_info(),
        "corpus": args.corpus,
        "residues": corpus.residues,
        "rows": rows,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "http.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        f"HTTP/JSON vs gRPC, corpus {args.corpus} ({corpus.residues:,} residues), "
        f"requests of {BATCH}, {IN_FLIGHT} in flight",
        "",
        "| outputs | gRPC residues/s | HTTP residues/s | HTTP / gRPC "
        "| HTTP process CPU ms/request | gRPC frontend CPU ms/request |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['grpc_residues_per_s']:,} | {row['http_residues_per_s']:,} | "
            f"{row['http_over_grpc']:.2f} | {row['http_process_cpu_ms_per_request']} | "
            f"{row['grpc_frontend_cpu_ms_per_request']} |"
        )
    (args.output / "http.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
