"""`python -m bench.batches`: what the size of a worker's batches costs the OpenVINO runner.

A worker takes what is queued as soon as it is free and never mixes queue lanes in a
batch, so a corpus sent through the service runs as batches of 1 to 8 (one lognormal
pass of 48 sequences ran as 9 batches: 5, 1, 8, 5, 8, 8, 1, 8, 4 items). This times, in
interleaved rounds on the lognormal corpus, the worker's `OpenVinoRunner` in-process on
length-sorted batches of each size in BATCH_SIZES, beside OpenVINO as a user would run
it (padded length-sorted batches of 8, as in `python -m bench`), at one precision.
Writes bench/results/batches-PRECISION.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from bench import exported
from bench.baselines import COMPUTE_DTYPES, build_engine, runner_contender
from bench.corpus import ensure_checkpoint, lognormal_corpus
from bench.report import RESULTS_DIR, machine_info
from bench.timing import time_rounds
from esm2_service.worker.checkpoint import load_checkpoint
from esm2_service.worker.openvino_backend import OpenVinoRunner

BATCH_SIZES = (1, 2, 3, 5, 8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batches", description=__doc__)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    checkpoint = load_checkpoint(ensure_checkpoint())
    engine = build_engine(checkpoint, "cpu", args.precision)
    dtype = COMPUTE_DTYPES[args.precision]
    runner = OpenVinoRunner.for_engine(engine, dtype, args.threads)
    runner.warm_up()
    corpus = lognormal_corpus()
    compiled = exported.openvino_model(checkpoint, args.precision, args.threads)
    label = f"OpenVINO {args.precision} hint, padded batches of 8, length-sorted"
    contenders = {
        "openvino": exported.exported_contender(label, exported.openvino_runner(compiled), corpus)
    }
    last = engine.model.num_layers
    for size in BATCH_SIZES:
        label = f"OpenVinoRunner, batches of {size}, length-sorted"
        contenders[f"runner, batches of {size}"] = runner_contender(
            label, runner, corpus, last, size
        )
    timed = time_rounds(contenders, args.repeats, corpus.residues)

    baseline = timed["openvino"].tokens_per_s
    lines = [
        f"OpenVINO runner in-process by batch size ({args.precision}, {args.threads} threads, "
        f"{corpus.describe()}; {machine_info()['cpu_model']}, {machine_info()['date'][:10]}):",
        "",
        "| contender | residues/s | / OpenVINO, padded batches of 8 |",
        "|---|---:|---:|",
    ]
    for name, throughput in timed.items():
        rate = throughput.tokens_per_s
        lines.append(f"| {name} | {rate:,.0f} | {rate / baseline:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    stem = RESULTS_DIR / f"batches-{args.precision}"
    stem.with_suffix(".md").write_text(text)
    results = {"machine": machine_info(), "settings": vars(args)}
    results["throughput"] = {name: t.to_json() for name, t in timed.items()}
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
