"""Results -> BioLM's esm2-8m response JSON, written fast and in pieces.

Floats are formatted by orjson straight from the float32 arrays (the shortest text
that reads back as the same float32, about 17x faster than `json.dumps` over
Python lists), a block of rows at a time, so no response is ever one huge string.

BioLM's JSON has 20 logits columns, not the 33 of the ESM alphabet: the standard
amino acids in the alphabet's order (`L A G V S E R T I D P K Q N F Y M H W C`),
which are columns 4 to 23 of the gRPC API's `vocab_tokens`. Its `log_prob` is the
sum, over the residues that are standard amino acids, of each residue's
log-probability under a log-softmax over those 20 columns of one unmasked pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import orjson

from esm2_service.alphabet import STANDARD_RESIDUES, VOCAB_TOKENS, split_tokens
from esm2_service.client.results import EncodeResult, PredictResult
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.validation import ValidRequest

# Columns of the 33-token alphabet that BioLM's JSON keeps: the 20 standard amino acids.
AMINO_ACID_COLUMNS = tuple(i for i, token in enumerate(VOCAB_TOKENS) if token in STANDARD_RESIDUES)
AMINO_ACID_TOKENS = [VOCAB_TOKENS[i] for i in AMINO_ACID_COLUMNS]
_COLUMN_OF = {token: n for n, token in enumerate(AMINO_ACID_TOKENS)}

# ESM-2 8M's width and heads: the sizes a response's size is estimated from.
HIDDEN, HEADS = 320, 20
# The longest float32 text orjson writes ("-1.2345678e-38") and its comma.
MAX_BYTES_PER_FLOAT = 15
ROWS_PER_PIECE = 256

_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def response_floats(request: ValidRequest, action: str) -> int:
    """How many floats the JSON response to `request` holds (the 8M model's sizes)."""
    if action == "log_prob":
        return len(request.sequences)
    if action == "predict":
        return sum(split_tokens(s).count("<mask>") * 20 for s in request.sequences)
    total = 0
    for length in request.token_counts:
        per_layer = {
            pb.INCLUDE_MEAN: HIDDEN,
            pb.INCLUDE_BOS: HIDDEN,
            pb.INCLUDE_PER_TOKEN: length * HIDDEN,
        }
        once = {
            pb.INCLUDE_CONTACTS: length * length,
            pb.INCLUDE_LOGITS: length * 20,
            pb.INCLUDE_ATTENTIONS: HEADS * length * length,
        }
        for kind in request.include:
            total += per_layer[kind] * len(request.repr_layers) if kind in per_layer else once[kind]
    return total


def encode_json(results: Iterable[EncodeResult]) -> Iterator[bytes]:
    yield b'{"results":['
    for n, result in enumerate(results):
        yield b"," if n else b""
        yield from _encode_result(result)
    yield b"]}"


def predict_json(results: Iterable[PredictResult]) -> Iterator[bytes]:
    yield b'{"results":['
    for n, result in enumerate(results):
        yield b',{"logits":' if n else b'{"logits":'
        yield from _array(amino_acid_logits(result.logits))
        yield b',"sequence_tokens":' + orjson.dumps(result.sequence_tokens)
        yield b',"vocab_tokens":' + orjson.dumps(AMINO_ACID_TOKENS) + b"}"
    yield b"]}"


def log_prob_json(results: Iterable[EncodeResult], sequences: Iterable[str]) -> Iterator[bytes]:
    values = [
        {"log_prob": log_prob(result.logits, sequence)}
        for result, sequence in zip(results, sequences, strict=True)
    ]
    yield orjson.dumps({"results": values})


def amino_acid_logits(logits: np.ndarray) -> np.ndarray:
    """[rows, 33] logits -> the [rows, 20] columns of the standard amino acids."""
    return np.ascontiguousarray(logits[:, AMINO_ACID_COLUMNS], dtype=np.float32)


def log_prob(logits: np.ndarray, sequence: str) -> float:
    """Sum of log p(residue) over the sequence's standard residues, each from a
    log-softmax over the 20 amino-acid columns of its row (float64 arithmetic)."""
    scores = amino_acid_logits(logits).astype(np.float64)
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = [
        (row, _COLUMN_OF[token])
        for row, token in enumerate(split_tokens(sequence))
        if token in _COLUMN_OF
    ]
    return float(sum(log_probs[row, column] for row, column in rows))


def _encode_result(result: EncodeResult) -> Iterator[bytes]:
    yield b'{"sequence_index":' + str(result.sequence_index).encode()
    for key, field, by_layer in (
        ("embeddings", "embedding", result.embeddings),
        ("bos_embeddings", "embedding", result.bos),
        ("per_token_embeddings", "embeddings", result.per_token),
    ):
        if by_layer:
            yield from _layers(key, field, by_layer)
    for key, array in (("contacts", result.contacts), ("attentions", result.attentions)):
        if array is not None:
            yield f',"{key}":'.encode()
            yield from _array(array)
    if result.logits is not None:
        yield b',"logits":'
        yield from _array(amino_acid_logits(result.logits))
        yield b',"vocab_tokens":' + orjson.dumps(AMINO_ACID_TOKENS)
    yield b"}"


def _layers(key: str, field: str, by_layer: dict[int, np.ndarray]) -> Iterator[bytes]:
    yield f',"{key}":['.encode()
    for n, (layer, array) in enumerate(sorted(by_layer.items())):
        yield f'{"," if n else ""}{{"layer":{layer},"{field}":'.encode()
        yield from _array(array)
        yield b"}"
    yield b"]"


def _array(array: np.ndarray) -> Iterator[bytes]:
    """A float32 array as nested JSON lists, at most ROWS_PER_PIECE rows a piece."""
    if array.ndim > 2:  # attentions [heads, L, L]: one head after another
        yield b"["
        for n, part in enumerate(array):
            yield b"," if n else b""
            yield from _array(part)
        yield b"]"
    elif array.ndim <= 1 or len(array) <= ROWS_PER_PIECE:
        yield orjson.dumps(np.ascontiguousarray(array), option=_NUMPY)
    else:
        yield b"["
        for start in range(0, len(array), ROWS_PER_PIECE):
            rows = orjson.dumps(
                np.ascontiguousarray(array[start : start + ROWS_PER_PIECE]), option=_NUMPY
            )
            yield (b"," if start else b"") + rows[1:-1]  # the rows, without their outer brackets
        yield b"]"
