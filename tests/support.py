"""Test helpers: fair-esm's reference outputs, the real FASTA data, comparisons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from esm2_service.alphabet import MASK_INDEX, encode_tokens, split_tokens

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "tests" / "data"  # real sequences from fair-esm (see its README)


def fair_esm_outputs(model, sequence: str, layers=(0, 1, 2, 3, 4, 5, 6)) -> dict:
    """Every output kind the service returns, computed by fair-esm's ESM2.forward
    on `sequence` alone, sliced the way the service slices it."""
    tokens = torch.tensor([encode_tokens(split_tokens(sequence))])
    with torch.no_grad():
        out = model(tokens, repr_layers=list(layers), need_head_weights=True, return_contacts=True)
    length = tokens.shape[1] - 2
    result = {"mean": {}, "per_token": {}, "bos": {}}
    for layer in layers:
        states = out["representations"][layer][0]
        result["per_token"][layer] = states[1 : length + 1].numpy()
        result["mean"][layer] = states[1 : length + 1].mean(0).numpy()
        result["bos"][layer] = states[0].numpy()
    result["contacts"] = out["contacts"][0].numpy()
    result["logits"] = out["logits"][0, 1 : length + 1].numpy()
    result["attentions"] = out["attentions"][0, -1, :, 1 : length + 1, 1 : length + 1].numpy()
    result["mask_logits"] = out["logits"][0][tokens[0] == MASK_INDEX].numpy()
    return result


def assert_close(actual, expected, atol: float = 1e-4, what: str = "") -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected))) if actual.size else 0.0
    assert diff <= atol, f"{what}: max |diff| {diff:.3g} > {atol}"


def read_fasta_records(name: str) -> list[tuple[str, str]]:
    """(id, sequence) records of one of the real FASTA files in tests/data."""
    records, header, parts = [], None, []
    for line in (DATA_DIR / name).read_text().splitlines():
        if line.startswith(">"):
            if header is not None:
                records.append((header, "".join(parts)))
            header, parts = line[1:].split()[0], []
        elif line.strip():
            parts.append(line.strip())
    if header is not None:
        records.append((header, "".join(parts)))
    return records
