"""`python -m bench.precision`: each compute precision's error, for every output kind.

Runs our engine in fp32, bf16 and fp16 (on the CPU these two are emulated where the
CPU lacks the instructions: slow, but the arithmetic is the same as on a GPU or a
bf16 CPU) on the real proteins of tests/data with the full-shape benchmark
checkpoint, and compares every output with fair-esm's `ESM2.forward` in fp32 on
the same weights. Prints, per precision and output kind, the largest absolute
difference and that difference relative to the output's largest magnitude.
Writes bench/results/precision.{json,md}: the README's precision table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from bench.corpus import REPO_ROOT, ensure_checkpoint
from bench.report import RESULTS_DIR, machine_info
from esm2_service.alphabet import token_ids
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.worker.checkpoint import build_fair_esm_model, load_checkpoint
from esm2_service.worker.engine import Engine
from esm2_service.worker.model import Esm2
from esm2_service.worker.work import TensorOutput, WorkItem

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KINDS = {
    pb.INCLUDE_MEAN: "mean",
    pb.INCLUDE_PER_TOKEN: "per_token",
    pb.INCLUDE_BOS: "bos",
    pb.INCLUDE_CONTACTS: "contacts",
    pb.INCLUDE_LOGITS: "logits",
    pb.INCLUDE_ATTENTIONS: "attentions",
}
LAYERS = (0, 3, 6)
FASTA = REPO_ROOT / "tests" / "data" / "few_proteins.fasta"


def read_sequences(path: Path = FASTA) -> list[str]:
    records = path.read_text().split(">")[1:]
    return ["".join(record.splitlines()[1:]) for record in records]


def engine_outputs(runner, sequences: list[str], kinds=frozenset(KINDS)) -> dict:
    """(item, kind name, layer) => float32 array of every output of one batch."""
    items = [WorkItem(token_ids(s), kinds, LAYERS) for s in sequences]
    buffers: dict[tuple, tuple[bytearray, tuple]] = {}

    def emit(output: TensorOutput) -> None:
        key = (output.item, KINDS[output.kind], output.layer)
        size = 4 * int(np.prod(output.shape))
        buffer, _ = buffers.setdefault(key, (bytearray(size), output.shape))
        buffer[output.offset : output.offset + len(output.data)] = output.data

    runner.run(items, emit)
    return {
        key: np.frombuffer(bytes(buffer), dtype="<f4").reshape(shape)
        for key, (buffer, shape) in buffers.items()
    }


def fair_esm_outputs(model, sequence: str) -> dict[tuple[str, int], np.ndarray]:
    """(kind name, layer) => fair-esm's output, sliced as the service slices it."""
    tokens = torch.tensor([list(token_ids(sequence))])
    with torch.inference_mode():
        out = model(tokens, repr_layers=list(LAYERS), need_head_weights=True, return_contacts=True)
    length = len(sequence)
    found = {}
    for layer in LAYERS:
        states = out["representations"][layer][0]
        found[("per_token", layer)] = states[1 : length + 1].numpy()
        found[("mean", layer)] = states[1 : length + 1].mean(0).numpy()
        found[("bos", layer)] = states[0].numpy()
    last = model.num_layers
    found[("contacts", 0)] = out["contacts"][0].numpy()
    found[("logits", 0)] = out["logits"][0, 1 : length + 1].numpy()
    found[("attentions", last)] = out["attentions"][0, -1, :, 1 : length + 1, 1 : length + 1]
    found[("attentions", last)] = found[("attentions", last)].numpy()
    return found


def runners(checkpoint, device: str = "cpu"):
    """(row name, runner, output kinds it serves): the torch engine in each precision
    on `device`, then, on a CPU, OpenVINO in fp32 and bf16 as CPU workers run it
    (embeddings and logits: contacts and attentions are the engine's)."""
    from esm2_service.worker.openvino_backend import (
        PRECISION_HINTS,
        OpenVinoRunner,
        openvino_available,
    )

    for name, dtype in PRECISIONS.items():
        yield name, Engine(Esm2.from_checkpoint(checkpoint), device, dtype), frozenset(KINDS)
    if device != "cpu" or not openvino_available():
        return
    served = frozenset(KINDS) - {pb.INCLUDE_CONTACTS, pb.INCLUDE_ATTENTIONS}
    for name, dtype in PRECISIONS.items():
        if dtype in PRECISION_HINTS:
            engine = Engine(Esm2.from_checkpoint(checkpoint), "cpu", dtype)
            yield f"{name}, OpenVINO", OpenVinoRunner.for_engine(engine, dtype, 2), served


def errors(
    checkpoint_path: Path, sequences: list[str], device: str = "cpu"
) -> dict[str, dict[str, dict]]:
    """precision => kind => {max_abs, max_relative}: the worst over items and layers of
    our engine on `device` against fair-esm fp32 on the CPU."""
    checkpoint = load_checkpoint(checkpoint_path)
    reference = build_fair_esm_model(checkpoint).eval()
    expected = [fair_esm_outputs(reference, s) for s in sequences]
    table: dict[str, dict[str, dict]] = {}
    for name, runner, kinds in runners(checkpoint, device):
        got = engine_outputs(runner, sequences, kinds)
        rows: dict[str, dict] = {}
        for (item, kind, layer), actual in got.items():
            want = expected[item][(kind, layer)]
            absolute = float(np.abs(actual.astype(np.float64) - want).max())
            relative = absolute / float(np.abs(want).max())
            row = rows.setdefault(kind, {"max_abs": 0.0, "max_relative": 0.0})
            row["max_abs"] = max(row["max_abs"], absolute)
            row["max_relative"] = max(row["max_relative"], relative)
        table[name] = rows
    return table


def markdown(table: dict, sequences: list[str]) -> list[str]:
    kinds = list(KINDS.values())
    lines = [
        f"Largest |ours - fair-esm fp32| over {len(sequences)} real proteins "
        f"({min(map(len, sequences))} to {max(map(len, sequences))} residues), layers "
        f"{', '.join(map(str, LAYERS))}; in brackets, relative to the output's largest "
        "magnitude:",
        "",
        "| precision | " + " | ".join(kinds) + " |",
        "|---|" + "---:|" * len(kinds),
    ]
    for name, rows in table.items():
        cells = [
            f"{rows[k]['max_abs']:.1e} ({rows[k]['max_relative']:.1e})" if k in rows else "-"
            for k in kinds
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    sequences = read_sequences()
    table = errors(ensure_checkpoint(), sequences)
    report = {"machine": machine_info(), "layers": list(LAYERS), "errors": table}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "precision.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = markdown(table, sequences)
    (args.output / "precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
