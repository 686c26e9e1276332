"""`python -m bench.experiments.attention16`: a hand-written attention for 16-wide heads,
inside OpenVINO.

The one lead issue 12 left for bf16 throughput: OpenVINO's fused attention subgraphs
spend a third of a sequence's time at 302 residues on a small share of its arithmetic.
This compiles `bench/experiments/attention16.cpp` (g++, AVX512-BF16; refused elsewhere), puts it in
place of each of the six attentions of the worker's exported graph (`SequenceEsm2`) as an
OpenVINO custom operation, checks that graph's hidden states against OpenVINO's own, and
times the two on one thread, in alternated calls: alone per layer, whole sequences of
several lengths, and the lognormal corpus one sequence at a time. Over the corpus it
gained a few percent here, so the worker does not use it (docs/performance.md). Writes
bench/results/attention16-PRECISION.{md,json}.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.baselines import COMPUTE_DTYPES, build_engine, work_item
from bench.corpus import CACHE_DIR, ensure_checkpoint, lognormal_corpus
from bench.report import RESULTS_DIR, machine_info
from esm2_service.worker import openvino_backend
from esm2_service.worker.checkpoint import load_checkpoint

SOURCE = Path(__file__).with_suffix(".cpp")
LENGTHS = (50, 100, 302, 700, 1022)
HEADS, HEAD_DIM = 20, 16


class KernelUnavailable(RuntimeError):
    """No g++, or a CPU without AVX512-BF16."""


def build_kernel(cache_dir: Path = CACHE_DIR) -> ctypes.CDLL:
    """The kernel, compiled once per source change into `cache_dir`."""
    if shutil.which("g++") is None:
        raise KernelUnavailable("python -m bench.experiments.attention16 needs g++")
    library = cache_dir / f"attention16-{int(SOURCE.stat().st_mtime)}.so"
    if not library.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        command = ["g++", "-O3", "-shared", "-fPIC", "-o", str(library), str(SOURCE)]
        subprocess.run(command, check=True)
    kernel = ctypes.CDLL(str(library))
    kernel.esm_attention.argtypes = [ctypes.c_void_p] * 4 + [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
        ctypes.c_long,
        ctypes.c_float,
        ctypes.c_int,
    ]
    if not kernel.esm_attention_supported():
        raise KernelUnavailable(
            "python -m bench.experiments.attention16 needs a CPU with AVX512-BF16"
        )
    return kernel


def attention_op(kernel: ctypes.CDLL, scale: float, bf16: bool):
    """An OpenVINO operation class: scaled dot-product attention of (H, T, 16) q, k, v."""
    from openvino import Op

    class Attention16(Op):
        def __init__(self, inputs=None):
            super().__init__(self, inputs)

        def validate_and_infer_types(self):
            self.set_output_type(0, self.get_input_element_type(0), self.get_input_partial_shape(0))

        def clone_with_new_inputs(self, new_inputs):
            return Attention16(new_inputs)

        def visit_attributes(self, visitor):
            return True

        def has_evaluate(self):
            return True

        def evaluate(self, outputs, inputs):
            q, k, v = (np.ascontiguousarray(tensor.data) for tensor in inputs)
            heads, tokens, width = q.shape
            outputs[0].shape = q.shape
            out = outputs[0].data
            pointers = (array.ctypes.data for array in (q, k, v, out))
            kernel.esm_attention(*pointers, tokens, heads, width, tokens * width, scale, bf16)
            return True

    return Attention16


def with_kernel(converted, op_class) -> int:
    """Replaces every ScaledDotProductAttention of `converted` by `op_class`; the count.
    ValueError for heads of another width than the kernel's 16."""
    replaced = 0
    for node in converted.get_ordered_ops():
        if node.get_type_name() == "ScaledDotProductAttention":
            inputs = [node.input_value(i) for i in range(3)]
            width = inputs[0].get_partial_shape()[-1]
            if width.is_dynamic or width.get_length() != HEAD_DIM:
                raise ValueError(f"the kernel takes heads {HEAD_DIM} wide, not {width}")
            node.output(0).replace(op_class(inputs).output(0))
            replaced += 1
    converted.validate_nodes_and_infer_types()
    return replaced


def median_ms(calls: dict, inputs, repeats: int) -> dict[str, float]:
    """Median ms of each call on `inputs`, the calls alternated."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call(inputs)
            times[name].append(1000 * (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.experiments.attention16", description=__doc__
    )
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bf16 = args.precision == "bf16"
    try:
        kernel = build_kernel()
    except KernelUnavailable as error:
        sys.exit(str(error))

    engine = build_engine(load_checkpoint(ensure_checkpoint()), "cpu", "fp32")
    scale = engine.model.layers[0].scaling
    own = openvino_backend.convert(engine.model)
    custom = openvino_backend.convert(engine.model)
    replaced = with_kernel(custom, attention_op(kernel, scale, bf16))
    dtype = COMPUTE_DTYPES[args.precision]
    graphs = {"OpenVINO": own, "with the kernel": custom}
    requests = {
        name: openvino_backend.compile_for_cpu(graph, dtype, 1).create_infer_request()
        for name, graph in graphs.items()
    }
    calls = {name: request.infer for name, request in requests.items()}

    lines = [
        f"ESM-2 8M with a hand-written attention for its 16-wide heads inside OpenVINO's graph "
        f"({replaced} attentions replaced), against OpenVINO's own graph; {args.precision}, one "
        f"thread, median ms of {args.repeats} alternated calls; {machine_info()['cpu_model']}, "
        f"{machine_info()['date'][:10]}:",
        "",
        "| residues | attention alone, OpenVINO | attention alone, kernel | whole sequence, "
        "OpenVINO | whole sequence, with the kernel | speedup | max diff |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    results = {"machine": machine_info(), "settings": vars(args), "lengths": {}}
    alone = attention_alone(kernel, scale, bf16, dtype)
    rng = np.random.default_rng(0)
    for length in LENGTHS:
        ids = np.concatenate([[0], rng.integers(4, 24, length), [2]])[None].astype(np.int64)
        outputs = [request.infer([ids])[0].copy() for request in requests.values()]
        diff = float(np.abs(outputs[0] - outputs[1]).max())
        ms = median_ms(calls, [ids], args.repeats)
        layer = median_ms(alone, length + 2, args.repeats)
        speedup = ms["OpenVINO"] / ms["with the kernel"]
        lines.append(
            f"| {length} | {layer['OpenVINO']:.2f} | {layer['kernel']:.2f} | "
            f"{ms['OpenVINO']:.2f} | {ms['with the kernel']:.2f} | {speedup:.2f}x | {diff:.1e} |"
        )
        results["lengths"][length] = {"attention": layer, "sequence": ms, "max_diff": diff}

    corpus = lognormal_corpus()
    token_ids = [[np.array([work_item(s).token_ids], dtype=np.int64)] for s in corpus.sequences]
    passes = median_ms({name: _all(call) for name, call in calls.items()}, token_ids, 3)
    rates = {name: corpus.residues / (ms / 1000) for name, ms in passes.items()}
    lines += [
        "",
        f"{corpus.describe()}, one sequence at a time: OpenVINO {rates['OpenVINO']:,.0f}, with "
        f"the kernel {rates['with the kernel']:,.0f} residues/s "
        f"({rates['with the kernel'] / rates['OpenVINO']:.2f}x).",
    ]
    results["corpus_residues_per_s"] = rates
    text = "\n".join(lines) + "\n"
    print(text)
    stem = RESULTS_DIR / f"attention16-{args.precision}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


def attention_alone(kernel, scale: float, bf16: bool, dtype: torch.dtype) -> dict:
    """One layer's attention alone, (H, T, 16) q, k, v of a given T: OpenVINO's compiled
    SDPA and the kernel, each a call taking T."""
    import openvino as ov

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

    example = tuple(torch.randn(HEADS, 8, HEAD_DIM) for _ in range(3))
    compiled = openvino_backend.compile_for_cpu(
        ov.convert_model(Attention(), example_input=example), dtype, 1
    )
    request = compiled.create_infer_request()
    rng = np.random.default_rng(1)
    tensors: dict[int, list[np.ndarray]] = {}

    def inputs(tokens: int) -> list[np.ndarray]:
        if tokens not in tensors:
            shape = (HEADS, tokens, HEAD_DIM)
            tensors[tokens] = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]
        return tensors[tokens]

    def openvino(tokens: int) -> None:
        request.infer(inputs(tokens)[:3])

    def hand_written(tokens: int) -> None:
        q, k, v, out = inputs(tokens)
        pointers = (array.ctypes.data for array in (q, k, v, out))
        kernel.esm_attention(*pointers, tokens, HEADS, HEAD_DIM, tokens * HEAD_DIM, scale, bf16)

    return {"OpenVINO": openvino, "kernel": hand_written}


def _all(call):
    def run(token_ids) -> None:
        for ids in token_ids:
            call(ids)

    return run


if __name__ == "__main__":
    sys.exit(main())
