"""Exported-model contenders: OpenVINO (fp32 and its bf16) and ONNX Runtime.

Both run HF's `EsmModel` with the benchmark checkpoint's weights (`hf_esm_model`),
exported once: OpenVINO converts the torch module itself (SDPA stays one fused op);
ONNX Runtime runs torch's opset-23 export, where SDPA becomes ONNX's `Attention` op.
Batches of 8 sorted by length, padded, mean of the last layer per sequence: the job
every contender is timed on. Neither package is a dependency of the service: install
them with `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.baselines import chunked, hf_esm_model, padded_tokens
from bench.corpus import Corpus
from bench.timing import Contender
from esm2_service.worker.checkpoint import Checkpoint

OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
ONNX_OPSET = 23


class LastHiddenState(torch.nn.Module):
    """`EsmModel` returning only its last hidden state: one output to export. Positions
    are given per row: ONNX's RotaryEmbedding op wants cos/sin tables of the batch's
    shape, not broadcast from one row."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        positions = positions.unsqueeze(0).expand(input_ids.shape[0], -1)
        states = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions
        )
        return states.last_hidden_state


def _example() -> tuple[torch.Tensor, torch.Tensor]:
    return padded_tokens(["MKTAYIAKQRQISFVKSHFSRQ", "MKVLA"])


def openvino_model(checkpoint: Checkpoint, precision: str, threads: int):
    """The checkpoint's ESM-2 compiled by OpenVINO for this CPU; `precision` is
    OpenVINO's inference precision hint (bf16 is its default on CPUs that have it)."""
    import openvino as ov

    module = LastHiddenState(hf_esm_model(checkpoint))
    with torch.inference_mode():
        converted = ov.convert_model(module, example_input=_example())
    config = {
        "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
        "INFERENCE_NUM_THREADS": threads,
    }
    return ov.Core().compile_model(converted, "CPU", config)


def openvino_precision(compiled) -> str:
    """The precision OpenVINO actually runs in: bf16 only where the CPU has it."""
    return str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())


def onnx_session(checkpoint: Checkpoint, threads: int):
    """The checkpoint's ESM-2 exported by torch at opset 23 and loaded by ONNX Runtime."""
    import onnxruntime

    module = LastHiddenState(hf_esm_model(checkpoint))
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    shapes = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "esm2.onnx"
        with torch.inference_mode():
            torch.onnx.export(
                module,
                _example(),
                str(path),
                input_names=["input_ids", "attention_mask"],
                output_names=["last_hidden_state"],
                opset_version=ONNX_OPSET,
                dynamo=True,
                dynamic_shapes=shapes,
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def mean_embeddings(run, sequences: list[str]) -> list[np.ndarray]:
    """Last-layer mean embedding of each of `sequences` (a padded batch) through `run`,
    which maps (ids, mask) int64 arrays to (batch, tokens, E) hidden states."""
    ids, mask = padded_tokens(sequences)
    states = run(ids.numpy(), mask.numpy())
    return [states[i, 1 : len(s) + 1].mean(0) for i, s in enumerate(sequences)]


def openvino_runner(compiled):
    request = compiled.create_infer_request()
    return lambda ids, mask: request.infer([ids, mask])[0]


def onnx_runner(session):
    return lambda ids, mask: session.run(None, {"input_ids": ids, "attention_mask": mask})[0]


def max_difference(checkpoint: Checkpoint, run) -> float:
    """Largest absolute difference between `run`'s last-layer mean embeddings and
    fair-esm's on the same weights, over a few random sequences of different lengths."""
    import esm

    from bench.corpus import random_sequence
    from esm2_service.worker.checkpoint import build_fair_esm_model

    rng = np.random.default_rng(7)
    sequences = [random_sequence(rng, length) for length in (30, 100, 257, 600)]
    model = build_fair_esm_model(checkpoint)
    convert = esm.data.Alphabet.from_architecture("ESM-1b").get_batch_converter()
    _, _, tokens = convert([(str(i), s) for i, s in enumerate(sequences)])
    last = model.num_layers
    with torch.inference_mode():
        states = model(tokens, repr_layers=[last])["representations"][last]
    expected = [states[i, 1 : len(s) + 1].mean(0).numpy() for i, s in enumerate(sequences)]
    got = mean_embeddings(run, sequences)
    return max(float(np.abs(a - b).max()) for a, b in zip(got, expected, strict=True))


def exported_contender(label: str, run, corpus: Corpus) -> Contender:
    """`run` over `corpus` in length-sorted batches of 8; warmed up with one pass."""
    batches = chunked(sorted(corpus.sequences, key=len))

    def run_pass() -> None:
        for batch in batches:
            mean_embeddings(run, batch)

    run_pass()
    return Contender(label, run_pass)
