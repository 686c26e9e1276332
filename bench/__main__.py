"""`python -m bench`: fair-esm, HF transformers, our engine and our service on one corpus.

Run from the repository root (`make bench ARGS="--corpus all"`). Prints a table,
writes bench/results/latest.json and latest.md. Child processes (Redis, frontend,
workers) are stopped on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from pathlib import Path

from esm2_service.worker.openmp import configure_openmp_wait

# The same OpenMP wait as the worker (esm2 worker sets it), before torch loads: the
# in-process timings are then comparable, and this process's idle threads do not
# spin on the cores the worker needs.
configure_openmp_wait()

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import redis  # noqa: E402
import torch  # noqa: E402

from bench.corpus import (  # noqa: E402
    CACHE_DIR,
    REPO_ROOT,
    Corpus,
    ensure_checkpoint,
    load_corpora,
    random_sequence,
)
from bench.report import (  # noqa: E402
    RESULTS_DIR,
    machine_info,
    ratios,
    render_table,
    write_results,
)

STAGES = (
    "reference",
    "hf",
    "openvino",
    "openvino-bf16",
    "onnxruntime",
    "engine",
    "runner",
    "service",
)
LATENCY_RESIDUES = 100
LATENCY_TARGET_MS = 3.0
LATENCY_WARMUP = 10
MIXED_LONG_ITEMS = 64  # eight requests of 8
MIXED_LONG_RESIDUES = 1100
MIXED_SHORT_CALLS = 5
WORKER_ID = "bench-0"
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
        help="rounds of one timed pass per stage, run in turn; each stage's fastest pass "
        "counts (default 3)",
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
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS_DIR,
        help="folder for latest.json and latest.md (default bench/results, the figures the "
        "README quotes; point partial or experimental runs elsewhere)",
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-idle", action="store_true", help="no latency-after-idle table")
    parser.add_argument("--skip-mixed", action="store_true")
    return parser


def in_process_contenders(
    args, stages, corpus: Corpus, checkpoint, engine, runners, worker_runner
) -> dict:
    """The warmed-up in-process contenders of `stages` on `corpus`, by stage name."""
    from bench import baselines

    contenders = {}
    if "reference" in stages:
        progress(f"loading fair-esm (slow: tens of seconds per pass on {corpus.name})")
        contenders["reference"] = baselines.fair_esm_contender(checkpoint, corpus, args.device)
    if "hf" in stages:
        progress("loading HF transformers EsmModel (sdpa)")
        contenders["hf"] = baselines.hf_contender(checkpoint, corpus, args.device)
    for stage, (label, runner, _) in runners.items():
        from bench.exported import exported_contender

        contenders[stage] = exported_contender(label, runner, corpus)
    if "engine" in stages:
        contenders["engine"] = baselines.engine_contender(engine, corpus)
    if worker_runner is not None:
        contenders["runner"] = baselines.worker_runner_contender(worker_runner, corpus)
    return contenders


def build_worker_runner(args, stages, engine):
    """The worker's own OpenVINO runner at the worker's precision, if selected and the
    service's CPU path runs on OpenVINO: the service's arithmetic without the service,
    so `service / runner` is what the queue, gRPC and the other processes cost."""
    from bench import baselines
    from esm2_service.worker.openvino_backend import OpenVinoRunner, openvino_available

    if "runner" not in stages or args.device != "cpu" or args.precision == "fp16":
        return None
    if not openvino_available():
        progress("skipping runner: openvino is not installed (pip install -e '.[bench]')")
        return None
    progress("compiling the worker's OpenVINO runner (tens of seconds)")
    dtype = baselines.COMPUTE_DTYPES[args.precision]
    runner = OpenVinoRunner.for_engine(engine, dtype, args.threads)
    runner.warm_up()
    return runner


def exported_runners(args, stages, checkpoint) -> dict:
    """OpenVINO (fp32, and its bf16 hint) and ONNX Runtime, exported once, if selected
    and installed (`pip install -e '.[bench]'`): stage => (label, runner, max abs
    difference of mean embeddings from fair-esm's)."""
    from bench import exported

    wanted = [stage for stage in ("openvino", "openvino-bf16", "onnxruntime") if stage in stages]
    if not wanted or args.device != "cpu":
        return {}
    runners = {}
    for stage in wanted:
        module = "onnxruntime" if stage == "onnxruntime" else "openvino"
        try:
            __import__(module)
        except ImportError:
            progress(f"skipping {stage}: {module} is not installed (pip install -e '.[bench]')")
            continue
        progress(f"exporting {stage} (tens of seconds)")
        if stage == "onnxruntime":
            runner = exported.onnx_runner(exported.onnx_session(checkpoint, args.threads))
            label = f"ONNX Runtime (opset {exported.ONNX_OPSET}), sorted"
        else:
            precision = "bf16" if stage.endswith("bf16") else "fp32"
            compiled = exported.openvino_model(checkpoint, precision, args.threads)
            runner = exported.openvino_runner(compiled)
            runs = exported.openvino_precision(compiled)
            label = f"OpenVINO {precision} hint (runs {runs}), sorted"
        runners[stage] = (label, runner, exported.max_difference(checkpoint, runner))
    return runners


def start_service(args, checkpoint_path, stack: contextlib.ExitStack):
    """Redis, the frontend and worker bench-0 as child processes, stopped when `stack`
    closes."""
    from bench.service import ServiceProcesses

    progress("starting redis-server, the frontend and worker bench-0")
    placement = ["--device", args.device, "--precision", args.precision]
    service = ServiceProcesses(checkpoint_path, args.threads, CACHE_DIR / "logs", placement)
    stack.enter_context(service)
    service.start_worker(WORKER_ID)
    service.wait_serving()
    return service


def time_corpus(
    args, stages, corpus: Corpus, checkpoint, engine, service, runners, worker_runner
) -> dict:
    """Every selected stage's throughput on `corpus`, timed in interleaved rounds,
    and (with the service) where the service's time went."""
    from bench.service import ServicePasses
    from bench.timing import time_rounds
    from esm2_service.client import Esm2Client

    contenders = in_process_contenders(
        args, stages, corpus, checkpoint, engine, runners, worker_runner
    )
    service_passes = None
    with contextlib.ExitStack() as stack:
        if service is not None:
            client = stack.enter_context(Esm2Client(service.target, timeout_s=600))
            service_passes = ServicePasses(service, client, corpus, WORKER_ID)
            contenders["service"] = service_passes.contender()
        rounds = f"{args.repeats} rounds of one pass each of {', '.join(contenders)}"
        progress(f"{rounds} on {corpus.name}")
        measured = time_rounds(contenders, args.repeats, corpus.residues)
    result = {"throughput": {key: value.to_json() for key, value in measured.items()}}
    if service_passes is not None:
        result["service_worker"] = service_passes.profile()
    return result


def service_checks(args, service, engine, runners, worker_runner, results) -> None:
    """The latency, latency-after-idle, mixed-traffic and memory checks, as selected."""
    from bench.baselines import engine_call
    from bench.memory import memory_check
    from bench.service import latency_pair, mixed_traffic

    if not args.skip_latency:
        progress(f"latency: {args.latency_calls} in-process and service calls, alternated")
        sequence = latency_sequence()
        calls = (LATENCY_WARMUP, args.latency_calls)
        local, served, breakdown = latency_pair(
            service, engine_call(engine, sequence), sequence, calls, WORKER_ID
        )
        results["latency"] = latency_result(local, served) | breakdown
    if not args.skip_idle:
        progress("latency after idle: pauses of 0, 0.15, 1 and 10 s (about 3 minutes)")
        results["idle"] = idle_check(service, engine, runners, worker_runner, args.precision)
    if not args.skip_mixed:
        progress(f"mixed traffic: short requests behind {MIXED_LONG_ITEMS} long items")
        results["mixed"] = mixed_traffic(
            service, latency_sequence(), mixed_long_sequences(), MIXED_SHORT_CALLS, WORKER_ID
        )
    if not args.skip_memory:
        progress("memory check: fresh worker, 8 x 2048 residues, every output")
        results["memory"] = memory_check(service)


def idle_check(service, engine, runners, worker_runner, precision: str) -> dict:
    """One 100-residue request through the service, our engine, the worker's runner and
    OpenVINO (those timed) after each pause of bench.idle.IDLE_GAPS_S."""
    from bench.baselines import engine_call, runner_call
    from bench.exported import mean_embeddings
    from bench.idle import WORKER_RUNNER, idle_latency, python_work
    from bench.service import health_check_call
    from esm2_service.client import Esm2Client

    sequence = latency_sequence()
    with (
        Esm2Client(service.target, timeout_s=60) as client,
        grpc.insecure_channel(service.target) as channel,
        redis.Redis.from_url(service.redis.url) as queue,
    ):
        calls = {
            "service e2e": lambda: client.encode([sequence], include=["mean"], repr_layers=[-1]),
            "gRPC floor: health check": health_check_call(channel),
            # A request crosses Redis four times (enqueue, the worker's take and write,
            # the frontend's read): what one round trip costs after the same pause.
            "Redis floor: PING": queue.ping,
            "CPU floor: 0.3 ms of Python here": python_work,
            "engine in-process": engine_call(engine, sequence),
        }
        if worker_runner is not None:
            last = engine.model.num_layers
            calls[WORKER_RUNNER] = runner_call(worker_runner, sequence, last)
        for stage in ("openvino", "openvino-bf16"):
            if stage in runners:
                runner = runners[stage][1]
                calls[f"{stage} in-process"] = lambda r=runner: mean_embeddings(r, [sequence])
        result = idle_latency(calls, service.workers[WORKER_ID].pid)
    same_precision = "openvino-bf16" if precision == "bf16" else "openvino"
    result["openvino_at_service_precision"] = f"{same_precision} in-process"
    return result


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
    corpora = load_corpora(args.corpus)
    checkpoint_path = ensure_checkpoint()
    checkpoint = load_checkpoint(checkpoint_path)
    engine = baselines.build_engine(checkpoint, args.device, args.precision)
    settings = vars(args) | {"batch_size": 8, "output": str(args.output)}
    results = {"machine": machine_info(args.device), "settings": settings}
    relative = checkpoint_path.relative_to(REPO_ROOT)
    results["checkpoint"] = {"path": str(relative), "random_weights": True}
    results["corpora"] = {}
    runners = exported_runners(args, stages, checkpoint)
    worker_runner = build_worker_runner(args, stages, engine)
    if runners:
        results["max_difference_from_fair_esm"] = {
            stage: float(difference) for stage, (_, _, difference) in runners.items()
        }
    with contextlib.ExitStack() as stack:
        service = start_service(args, checkpoint_path, stack) if "service" in stages else None
        for corpus in corpora:
            for record_id, reason in corpus.skipped:
                progress(f"skipping {record_id} of corpus {corpus.name}: {reason}")
            progress(corpus.describe())
            timed = time_corpus(
                args, stages, corpus, checkpoint, engine, service, runners, worker_runner
            )
            results["corpora"][corpus.name] = {"corpus": corpus.summary(), **timed}
        if service is not None:
            service_checks(args, service, engine, runners, worker_runner, results)
    if "service" in stages:
        progress("redis-server, the frontend and the workers are stopped")
    for result in results["corpora"].values():
        result["ratios"] = ratios(result["throughput"], args.precision)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.latency_calls < 1:
        build_parser().error("--threads, --repeats and --latency-calls must be at least 1")
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    torch.set_num_threads(args.threads)
    results = run(args)
    print(render_table(results), flush=True)
    json_path, markdown_path = write_results(results, args.output)
    progress(f"wrote {json_path} and {markdown_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
