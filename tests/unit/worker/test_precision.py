"""Half-precision compute (a GPU option) stays within 1e-2 of fp32, relative to each
output's scale. Run here on the CPU, which executes the same code path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esm2_service.alphabet import token_ids
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.worker.checkpoint import load_checkpoint
from esm2_service.worker.engine import Engine
from esm2_service.worker.model import Esm2
from esm2_service.worker.settings import WorkerSettings
from esm2_service.worker.work import WorkItem

EVERYTHING = frozenset(pb.Include.values()) - {pb.INCLUDE_UNSPECIFIED}
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ" * 3, "ACDEFGHIKLMNPQRSTVWY"]


def outputs(checkpoint, dtype) -> dict:
    engine = Engine(Esm2.from_checkpoint(checkpoint), "cpu", dtype)
    items = [WorkItem(token_ids(s), EVERYTHING, (0, 3, 6)) for s in SEQUENCES]
    found = {}

    def emit(output):
        found[(output.item, output.kind, output.layer, output.offset)] = np.frombuffer(
            output.data, np.float32
        )

    engine.run(items, emit)
    return found


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_compute_is_close_to_fp32(full_checkpoint, dtype, relative=1e-2):
    checkpoint = load_checkpoint(full_checkpoint)
    exact, half = outputs(checkpoint, torch.float32), outputs(checkpoint, dtype)
    assert half.keys() == exact.keys() and len(exact) == 2 * (3 * 3 + 3)
    for key, value in exact.items():
        error = np.abs(half[key] - value).max() / np.abs(value).max()
        assert error < relative, (key, error)


def test_half_precision_on_cpu_only_where_it_helps(monkeypatch):
    from esm2_service.worker import settings

    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        WorkerSettings(precision="fp16")
    monkeypatch.setattr(settings, "cpu_has_bf16", lambda: False)
    with pytest.raises(ValueError, match="bf16 on CPU needs AVX512-BF16 or AMX"):
        WorkerSettings(precision="bf16")
    monkeypatch.setattr(settings, "cpu_has_bf16", lambda: True)
    assert WorkerSettings(precision="bf16").precision == "bf16"
    with pytest.raises(ValueError, match="precision 'fp8'"):
        WorkerSettings(precision="fp8", device="cuda")
    assert WorkerSettings(precision="bf16", device="cuda:1").precision == "bf16"
