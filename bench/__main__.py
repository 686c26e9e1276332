"""`python -m bench`: fair-esm, HF transformers, our engine and our service on one corpus.

Run from the repository root (`make bench ARGS="--corpus all"`). Prints a table,
writes bench/results/latest.json and latest.md. Child processes (Redis, frontend,
workers) are stopped on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from esm2_service.worker.openmp import configure_openmp_wait

# The same OpenMP wait as the worker (esm2 worker sets it), before torch loads: the
# in-process timings are then comparable, and this process's idle threads do not
# spin on the cores the worker needs.
configure_openmp_wait()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.corpus import (  # noqa: E402
    CACHE_DIR,
    REPO_ROOT,
    Corpus,
    ensure_checkpoint,
    load_corpora,
    random_sequence,
)
from bench.report import machine_info, ratios, render_table, write_results  # noqa: E402

STAGES = ("reference", "hf", "engine", "service")
LATENCY_RESIDUES = 100
LATENCY_TARGET_MS = 3.0
LATENCY_WARMUP = 10
MIXED_LONG_ITEMS = 64  # eight requests of 8
MIXED_LONG_RESIDUES = 1100
MIXED_SHORT_CALLS = 5
_started = time.monotonic()


def progress(message: str) -> None:
    """A progress line on stderr, so stdout holds only the table."""
    print(f"[bench {time.monotonic() - _started:6.1f} s] {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", choices=("lognormal", "real", "all"), default="lognormal")
    parser.add_argument(
        "--only",
        action="append",
        choices=STAGES,
        help="run only this throughput stage (repeatable; default: all). Latency and "
        "memory run with the service stage.",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads here and in the worker (default 2)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed passes per throughput; the fastest counts (default 3)",
    )
    parser.add_argument(
        "--latency-calls", type=int, default=50, help="timed calls per latency (default 50)"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda or cuda:N for fair-esm, HF, our engine and the worker (default cpu)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="our engine's and the worker's compute precision; fair-esm and HF stay fp32",
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-mixed", action="store_true")
    return parser


def run_in_process(args, stages, corpus: Corpus, checkpoint, engine) -> dict:
    """Throughputs of the in-process stages on `corpus`, by stage name."""
    from bench import baselines

    measured = {}
    if "reference" in stages:
        progress(f"fair-esm on {corpus.name} (slow: tens of seconds per pass)")
        measured["reference"] = baselines.fair_esm_throughput(
            checkpoint, corpus, args.repeats, args.device
        )
    if "hf" in stages:
        progress(f"HF transformers EsmModel (sdpa) on {corpus.name}")
        measured["hf"] = baselines.hf_throughput(corpus, args.repeats, args.device)
    if "engine" in stages:
        progress(f"our engine in-process on {corpus.name}")
        measured["engine"] = baselines.engine_throughput(engine, corpus, args.repeats)
    return measured


def run_service(args, checkpoint_path, corpora, results, engine) -> None:
    """Starts Redis, the frontend and one worker; runs the service throughput per
    corpus, the latency and the memory check; stops every process it started."""
    from bench.baselines import engine_call
    from bench.memory import memory_check
    from bench.service import ServiceProcesses, latency_pair, mixed_traffic, service_throughput

    progress("starting redis-server, the frontend and worker bench-0")
    placement = ["--device", args.device, "--precision", args.precision]
    logs = CACHE_DIR / "logs"
    with ServiceProcesses(checkpoint_path, args.threads, logs, placement) as service:
        service.start_worker("bench-0")
        service.wait_serving()
        for corpus in corpora:
            progress(f"service end to end on {corpus.name}")
            throughput, busy = service_throughput(service, corpus, args.repeats, "bench-0")
            results["corpora"][corpus.name]["throughput"]["service"] = throughput.to_json()
            results["corpora"][corpus.name]["service_worker"] = busy
        if not args.skip_latency:
            progress(f"latency: {args.latency_calls} in-process and service calls, alternated")
            sequence = latency_sequence()
            calls = (LATENCY_WARMUP, args.latency_calls)
            local, served, breakdown = latency_pair(
                service, engine_call(engine, sequence), sequence, calls, "bench-0"
            )
            results["latency"] = latency_result(local, served) | breakdown
        if not args.skip_mixed:
            progress(f"mixed traffic: short requests behind {MIXED_LONG_ITEMS} long items")
            results["mixed"] = mixed_traffic(
                service,
                latency_sequence(),
                mixed_long_sequences(),
                MIXED_SHORT_CALLS,
                "bench-0",
            )
        if not args.skip_memory:
            progress("memory check: fresh worker, 8 x 2048 residues, every output")
            results["memory"] = memory_check(service)
    progress("service stopped")


def mixed_long_sequences() -> list[str]:
    """The backlog of the mixed-traffic check: long sequences of the long lane."""
    rng = np.random.default_rng(1000)
    return [random_sequence(rng, MIXED_LONG_RESIDUES) for _ in range(MIXED_LONG_ITEMS)]


def latency_sequence() -> str:
    """The fixed random 100-residue sequence of the latency checks."""
    return random_sequence(np.random.default_rng(100), LATENCY_RESIDUES)


def latency_result(engine, service) -> dict:
    overhead = service.p50 - engine.p50
    return {
        "residues": LATENCY_RESIDUES,
        "engine": engine.to_json(),
        "service": service.to_json(),
        "p50_overhead_ms": round(overhead, 3),
        "target_ms": LATENCY_TARGET_MS,
        "pass": overhead <= LATENCY_TARGET_MS,
    }


def _raise_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `finally`, stopping children


def run(args) -> dict:
    """Every selected measurement; returns the results dict."""
    from bench import baselines
    from esm2_service.worker.checkpoint import load_checkpoint

    stages = set(args.only or STAGES)
    with_service = "service" in stages
    corpora = load_corpora(args.corpus)
    checkpoint_path = ensure_checkpoint()
    checkpoint = load_checkpoint(checkpoint_path)
    engine = baselines.build_engine(checkpoint, args.device, args.precision)
    results = {"machine": machine_info(args.device), "settings": vars(args) | {"batch_size": 8}}
    relative = checkpoint_path.relative_to(REPO_ROOT)
    results["checkpoint"] = {"path": str(relative), "random_weights": True}
    results["corpora"] = {}
    for corpus in corpora:
        for record_id, reason in corpus.skipped:
            progress(f"skipping {record_id} of corpus {corpus.name}: {reason}")
        progress(corpus.describe())
        measured = run_in_process(args, stages, corpus, checkpoint, engine)
        throughput = {key: value.to_json() for key, value in measured.items()}
        results["corpora"][corpus.name] = {"corpus": corpus.summary(), "throughput": throughput}
    if with_service:
        run_service(args, checkpoint_path, corpora, results, engine)
    for result in results["corpora"].values():
        result["ratios"] = ratios(result["throughput"])
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.latency_calls < 1:
        build_parser().error("--threads, --repeats and --latency-calls must be at least 1")
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    torch.set_num_threads(args.threads)
    results = run(args)
    print(render_table(results), flush=True)
    json_path, markdown_path = write_results(results)
    progress(f"wrote {json_path} and {markdown_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
