"""How the `esm2` command line lays results out: npz arrays and JSON documents."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .results import EncodeResult, PredictResult

NPZ_LAYOUT = """\
output npz layout (ID is the first word of a FASTA header, L a resolved layer 0-6):
  ids                  [n] str     the record ids, in FASTA order
  vocab_tokens         [33] str    the ESM alphabet, in logits column order
  ID/mean/layerL       [320]       mean over residues          (--include mean)
  ID/per_token/layerL  [len, 320]  one row per residue         (--include per_token)
  ID/bos/layerL        [320]       the <cls> position          (--include bos)
  ID/contacts          [len, len]                              (--include contacts)
  ID/logits            [len, 33]                               (--include logits)
  ID/attentions        [20, len, len]  last layer              (--include attentions)
arrays are float32, or float16 with --dtype float16.
read with: data = numpy.load(OUT); data[f"{data['ids'][0]}/mean/layer6"]"""

_LAYERED = (("mean", "embeddings"), ("per_token", "per_token"), ("bos", "bos"))
_SINGLE = ("contacts", "logits", "attentions")


def npz_arrays(record_id: str, result: EncodeResult) -> dict[str, np.ndarray]:
    """The arrays of one record, named as `NPZ_LAYOUT` describes."""
    arrays: dict[str, np.ndarray] = {}
    for name, attribute in _LAYERED:
        for layer, array in getattr(result, attribute).items():
            arrays[f"{record_id}/{name}/layer{layer}"] = array
    for name in _SINGLE:
        array = getattr(result, name)
        if array is not None:
            arrays[f"{record_id}/{name}"] = array
    return arrays


def string_array(values: list[str]) -> np.ndarray:
    """A numpy unicode array, loadable without pickle."""
    return np.array(values, dtype=np.str_)


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
