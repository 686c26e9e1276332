"""Test helpers: fair-esm's reference outputs, the real FASTA data, comparisons, ports."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from esm2_service.alphabet import MASK_INDEX, MASK_TOKEN, TOKEN_INDEX, token_ids

ESM2 = [sys.executable, "-m", "esm2_service.client.cli"]


def free_ports(count: int) -> list[int]:
    """`count` consecutive loopback ports nothing holds now: `esm2 serve` listens on the
    ports after --metrics-port too, so separately chosen free ports can collide."""
    for _ in range(200):
        start = random.randrange(10000, 32000)  # below Linux's ephemeral ports (32768 up)
        ports = list(range(start, start + count))
        if all(map(_bindable, ports)):
            return ports
    raise RuntimeError(f"found no {count} consecutive free ports")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def esm2(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*ESM2, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "tests" / "data"  # real sequences from fair-esm (see its README)


def fair_esm_outputs(model, sequence: str, layers=(0, 1, 2, 3, 4, 5, 6)) -> dict:
    """Every output kind the service returns, computed by fair-esm's ESM2.forward
    on `sequence` alone, sliced the way the service slices it."""
    tokens = torch.tensor([list(token_ids(sequence))])
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


def bad_request_fields(error) -> list[tuple[str, str]]:
    """(field, description) of every violation in an INVALID_ARGUMENT error's BadRequest."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    (detail,) = status.details
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad)
    return [(v.field, v.description) for v in bad.field_violations]


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


def tem1_variants() -> tuple[str, list[tuple[str, float]]]:
    """TEM-1 beta-lactamase (P62593): its wild type and single mutants with measured
    fitness, from the headers of tests/data/P62593_tem1_variants.fasta
    (`>index|beta-lactamase_P20P|fitness`, positions 1-based in the sequence)."""
    wild_type = None
    variants = []
    for header, sequence in read_fasta_records("P62593_tem1_variants.fasta"):
        _, name, fitness = header.split("|")
        mutant = name.rsplit("_", 1)[1]
        wt, position, mt = mutant[0], int(mutant[1:-1]), mutant[-1]
        assert sequence[position - 1] == mt, header
        reverted = sequence[: position - 1] + wt + sequence[position:]
        assert wild_type in (None, reverted), header
        wild_type = reverted
        variants.append((mutant, float(fitness)))
    return wild_type, variants


# Variant scores computed directly with fair-esm's forward, one pass at a time.


def log_probs(model, sequence: str) -> np.ndarray:
    """fair-esm's log-softmax over the vocabulary, [tokens, 33], BOS and EOS dropped."""
    tokens = torch.tensor([list(token_ids(sequence))])
    with torch.no_grad():
        logits = model(tokens)["logits"][0, 1:-1]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def parse_mutant(mutant: str) -> list[tuple[str, int, str]]:
    return [(part[0], int(part[1:-1]), part[-1]) for part in mutant.split(":")]


def reference_masked_marginal(model, wild_type: str, mutant: str) -> float:
    total = 0.0
    for wt, position, mt in parse_mutant(mutant):
        masked = wild_type[: position - 1] + MASK_TOKEN + wild_type[position:]
        row = log_probs(model, masked)[position - 1]
        total += row[TOKEN_INDEX[mt]] - row[TOKEN_INDEX[wt]]
    return total


def reference_wt_marginal(model, wild_type: str, mutant: str) -> float:
    rows = log_probs(model, wild_type)
    return sum(
        rows[p - 1][TOKEN_INDEX[mt]] - rows[p - 1][TOKEN_INDEX[wt]]
        for wt, p, mt in parse_mutant(mutant)
    )


def reference_pll(model, wild_type: str, mutant: str) -> float:
    residues = list(wild_type)
    for _, position, mt in parse_mutant(mutant):
        residues[position - 1] = mt
    sequence = "".join(residues)
    total = 0.0
    for position in range(1, len(sequence) + 1):
        masked = sequence[: position - 1] + MASK_TOKEN + sequence[position:]
        total += log_probs(model, masked)[position - 1][TOKEN_INDEX[sequence[position - 1]]]
    return total
