"""Result types and the assembly of response streams into numpy arrays.

A response stream carries, for each item of a request, zero or more
`TensorChunk` messages and then one `ItemComplete`. Chunks of different items
may interleave and the chunks of one tensor may arrive in any order; a tensor
is named by (kind, layer) within its item. `StreamAssembler` rebuilds every
tensor with `TensorAssembler` and checks that nothing is missing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError

from esm2_service.alphabet import MASK_TOKEN, STANDARD_RESIDUES
from esm2_service.chunk_reader import ChunkView, read_chunk, read_packed
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.tensors import TensorAssembler

# The tensors kept once per layer; the others come once per item.
LAYERED_KINDS = frozenset({pb.INCLUDE_MEAN, pb.INCLUDE_PER_TOKEN, pb.INCLUDE_BOS})
# Layers 0 (embeddings) to 6; a negative layer counts from the end (-1 is 6).
NUM_LAYERS = 7

TensorKey = tuple[int, int]  # (Include kind, layer)
# Protobuf parses a small message faster than `read_chunk`; from about this size on, its
# copies of the tensor bytes cost more (measured: level at 64 KiB; at 435 KiB, in a stream
# of per-token outputs, read_chunk decodes twice as fast).
READ_IN_PLACE_BYTES = 64 << 10


class ResultStreamError(RuntimeError):
    """The server's response stream broke the contract of `esm2.v1.EncodeResponse` /
    `PredictResponse`."""


class IncompleteResultError(ResultStreamError):
    """An item ended (or the stream did) before all of its data had arrived."""


@dataclass(frozen=True)
class ModelInfo:
    """The model that computed a result, as the worker reported it."""

    name: str
    checkpoint_sha256: str
    random_weights: bool
    device: str

    @classmethod
    def from_pb(cls, message: pb.ModelInfo) -> ModelInfo:
        return cls(
            name=message.name,
            checkpoint_sha256=message.checkpoint_sha256,
            random_weights=message.random_weights,
            device=message.device,
        )


@dataclass
class EncodeResult:
    """What Encode returned for one sequence.

    Arrays are float32, or float16 when float16 was requested. Per-layer dicts are
    keyed by the resolved layer (0 to 6) and hold only the layers and kinds asked for.
    """

    sequence_index: int  # position in the caller's list of sequences
    embeddings: dict[int, np.ndarray] = field(default_factory=dict)  # mean, layer -> [320]
    per_token: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [L, 320]
    bos: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [320]
    contacts: np.ndarray | None = None  # [L, L]
    logits: np.ndarray | None = None  # [L, 33], columns in `vocab_tokens` order
    attentions: np.ndarray | None = None  # [20, L, L], last layer
    vocab_tokens: list[str] = field(default_factory=list)
    model: ModelInfo | None = None


@dataclass
class PredictResult:
    """What Predict returned for one sequence: logits at its `<mask>` positions."""

    sequence_index: int  # position in the caller's list of sequences
    logits: np.ndarray  # [n_masked, 33], columns in `vocab_tokens` order
    sequence_tokens: list[str]  # the tokenized input, `<mask>` as one token
    vocab_tokens: list[str]
    model: ModelInfo

    @property
    def mask_positions(self) -> list[int]:
        """Indices into `sequence_tokens` of the masks, in `logits` row order."""
        return [i for i, token in enumerate(self.sequence_tokens) if token == MASK_TOKEN]

    @property
    def predicted_tokens(self) -> list[str]:
        """The predicted residue at each mask: the top-scoring of the 20 standard amino
        acids (ACDEFGHIKLMNPQRSTVWY). Special tokens (`<cls>`, `<eos>`, `<pad>`, ...),
        X, B, U, Z, O, "." and "-" never count, whatever their score."""
        columns = [i for i, token in enumerate(self.vocab_tokens) if token in STANDARD_RESIDUES]
        best = np.argmax(self.logits[:, columns], axis=1)
        return [self.vocab_tokens[columns[i]] for i in best]


@dataclass
class CompletedItem:
    """One item's decoded tensors and its closing `ItemComplete` message."""

    index: int  # position in the request
    tensors: dict[TensorKey, np.ndarray]
    complete: pb.ItemComplete


def kind_name(kind: int) -> str:
    """`pb.INCLUDE_MEAN` -> "mean"; an unknown value -> its number."""
    try:
        return pb.Include.Name(kind).removeprefix("INCLUDE_").lower()
    except ValueError:
        return str(kind)


class StreamAssembler:
    """Rebuilds the items of one response stream from its EncodeResponse or
    PredictResponse messages (the two have the same fields)."""

    def __init__(self, n_items: int):
        self._n_items = n_items
        self._pending: dict[int, dict[TensorKey, TensorAssembler]] = {}
        self._done: dict[int, CompletedItem] = {}

    def add(self, raw: bytes | memoryview) -> None:
        """Takes one serialized message; raises `ResultStreamError` if it breaks the
        contract. A large chunk's tensor bytes are copied once, into their tensor."""
        chunk = read_chunk(raw) if len(raw) >= READ_IN_PLACE_BYTES else None
        if chunk is not None:
            self._check_index(chunk.sequence_index)
            self._add_chunk(chunk)
            return
        try:
            message = pb.EncodeResponse.FromString(raw)
        except DecodeError as error:
            raise ResultStreamError(f"a response that does not parse: {error}") from None
        self._add_message(message)

    def add_packed(self, raw: bytes) -> None:
        """Takes one serialized EncodePackedResponse or PredictPackedResponse: its
        responses, in order, as `add` takes them."""
        responses = read_packed(raw) if len(raw) >= READ_IN_PLACE_BYTES else None
        if responses is not None:
            for response in responses:
                self.add(response)
            return
        try:  # small: protobuf's C parser reads the whole message at once
            packed = pb.EncodePackedResponse.FromString(raw)
        except DecodeError as error:
            raise ResultStreamError(f"a packed response that does not parse: {error}") from None
        for message in packed.responses:
            self._add_message(message)

    def _add_message(self, message: pb.EncodeResponse) -> None:
        index = message.sequence_index
        self._check_index(index)
        payload = message.WhichOneof("payload")
        if payload == "chunk":
            tensor = message.chunk.tensor
            self._add_chunk(
                ChunkView(
                    index,
                    message.chunk.kind,
                    message.chunk.layer,
                    message.chunk.offset,
                    tensor.dtype,
                    tuple(tensor.shape),
                    tensor.data,
                )
            )
        elif payload == "complete":
            self._complete(index, message.complete)
        else:
            raise ResultStreamError(f"item {index}: a response with neither chunk nor complete")

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self._n_items:
            raise ResultStreamError(
                f"sequence_index {index} outside the request's {self._n_items} items"
            )
        if index in self._done:
            raise ResultStreamError(f"item {index}: message after its ItemComplete")

    def finish(self) -> list[CompletedItem]:
        """The items in request order, once the stream has ended."""
        missing = [i for i in range(self._n_items) if i not in self._done]
        if missing:
            raise IncompleteResultError(f"stream ended before items {missing} were complete")
        return [self._done[i] for i in range(self._n_items)]

    def _add_chunk(self, chunk: ChunkView) -> None:
        key = (chunk.kind, chunk.layer)
        tensors = self._pending.setdefault(chunk.sequence_index, {})
        try:
            if key not in tensors:
                tensors[key] = TensorAssembler(chunk.dtype, chunk.shape)
            tensors[key].add_part(chunk.offset, chunk.dtype, chunk.shape, chunk.data)
        except (KeyError, ValueError) as error:
            where = f"item {chunk.sequence_index} {kind_name(chunk.kind)} layer {chunk.layer}"
            raise ResultStreamError(f"{where}: bad chunk: {error}") from error

    def _complete(self, index: int, complete: pb.ItemComplete) -> None:
        tensors = self._pending.pop(index, {})
        for (kind, layer), assembler in tensors.items():
            if not assembler.complete:
                raise IncompleteResultError(
                    f"item {index}: {kind_name(kind)} layer {layer} incomplete at the "
                    f"item's ItemComplete (of {assembler.nbytes} bytes)"
                )
        arrays = {key: assembler.array() for key, assembler in tensors.items()}
        self._done[index] = CompletedItem(index, arrays, complete)


def resolve_layer(layer: int) -> int:
    """A requested layer as the server names it: -1 -> 6, -7 -> 0."""
    return layer + NUM_LAYERS if layer < 0 else layer


def _require(item: CompletedItem, include: Iterable[int], layers: set[int]) -> None:
    """Raises `IncompleteResultError` unless every requested tensor is in `item`."""
    kinds = {kind for kind, _ in item.tensors}
    for kind in include:
        if kind not in LAYERED_KINDS:
            if kind not in kinds:
                raise IncompleteResultError(f"item {item.index}: no {kind_name(kind)} tensor")
            continue
        for layer in sorted(layers):
            if (kind, layer) not in item.tensors:
                raise IncompleteResultError(
                    f"item {item.index}: no {kind_name(kind)} tensor for layer {layer}"
                )


def _single(item: CompletedItem, kind: int) -> np.ndarray | None:
    arrays = [array for (k, _), array in item.tensors.items() if k == kind]
    if len(arrays) > 1:
        raise ResultStreamError(f"item {item.index}: {len(arrays)} {kind_name(kind)} tensors")
    return arrays[0] if arrays else None


def encode_result(
    item: CompletedItem, sequence_index: int, include: Iterable[int], layers: Iterable[int]
) -> EncodeResult:
    """An `EncodeResult`, checking that every requested (kind, layer) arrived.

    `include` holds `pb.Include` values and `layers` the requested layers, which may
    be negative.
    """
    _require(item, include, {resolve_layer(layer) for layer in layers})

    def by_layer(kind: int) -> dict[int, np.ndarray]:
        found = {layer: array for (k, layer), array in item.tensors.items() if k == kind}
        return dict(sorted(found.items()))

    return EncodeResult(
        sequence_index=sequence_index,
        embeddings=by_layer(pb.INCLUDE_MEAN),
        per_token=by_layer(pb.INCLUDE_PER_TOKEN),
        bos=by_layer(pb.INCLUDE_BOS),
        contacts=_single(item, pb.INCLUDE_CONTACTS),
        logits=_single(item, pb.INCLUDE_LOGITS),
        attentions=_single(item, pb.INCLUDE_ATTENTIONS),
        vocab_tokens=list(item.complete.vocab_tokens),
        model=ModelInfo.from_pb(item.complete.model),
    )


def predict_result(item: CompletedItem, sequence_index: int) -> PredictResult:
    """A `PredictResult`; the item must hold exactly one logits tensor."""
    logits = _single(item, pb.INCLUDE_LOGITS)
    if logits is None:
        raise IncompleteResultError(f"item {item.index}: no logits tensor")
    return PredictResult(
        sequence_index=sequence_index,
        logits=logits,
        sequence_tokens=list(item.complete.sequence_tokens),
        vocab_tokens=list(item.complete.vocab_tokens),
        model=ModelInfo.from_pb(item.complete.model),
    )
