"""How the `esm2` command line lays results out: arrays by name, and JSON documents."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .results import EncodeResult, PredictResult

_LAYERED = (("mean", "embeddings"), ("per_token", "per_token"), ("bos", "bos"))
_SINGLE = ("contacts", "logits", "attentions")


def record_arrays(result: EncodeResult) -> dict[str, np.ndarray]:
    """One record's arrays by name: "mean/layer6", "per_token/layer0", "contacts", ..."""
    arrays: dict[str, np.ndarray] = {}
    for name, attribute in _LAYERED:
        for layer, array in getattr(result, attribute).items():
            arrays[f"{name}/layer{layer}"] = array
    for name in _SINGLE:
        array = getattr(result, name)
        if array is not None:
            arrays[name] = array
    return arrays


def predict_document(vocab_tokens: list[str], results: list[dict[str, Any]]) -> str:
    """`{"vocab_tokens": [...], "results": [...]}` as JSON text, one line per result."""
    lines = ",\n    ".join(json.dumps(result) for result in results)
    return (
        f'{{\n  "vocab_tokens": {json.dumps(vocab_tokens)},\n  "results": [\n    {lines}\n  ]\n}}'
    )


def predict_json(record_id: str, result: PredictResult) -> dict[str, Any]:
    """One sequence's Predict result as plain JSON types.

    `mask_positions` index `sequence_tokens` (from 0); `logits[i]` and
    `predicted_tokens[i]` belong to mask i, columns in `vocab_tokens` order.
    """
    return {
        "id": record_id,
        "sequence_tokens": result.sequence_tokens,
        "mask_positions": result.mask_positions,
        "predicted_tokens": result.predicted_tokens,
        "logits": [[_shortest_float(value) for value in row] for row in result.logits],
    }


def _shortest_float(value: np.floating) -> float:
    """The float whose repr is the shortest that round-trips `value`'s own precision."""
    return float(str(value))
