"""What the queue loop and the engine exchange: plain data, no torch, no Redis."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from esm2_service.esm2.v1 import esm2_pb2 as pb


@dataclass(frozen=True)
class WorkItem:
    """One sequence to run and what to return for it."""

    token_ids: tuple[int, ...]  # <cls> ... <eos>
    include: frozenset[int]  # pb.INCLUDE_*; ignored for Predict
    repr_layers: tuple[int, ...] = ()  # resolved, 0..num_layers
    dtype: int = pb.DTYPE_FLOAT32
    predict: bool = False  # return logits at the <mask> positions only

    @property
    def residues(self) -> int:
        return len(self.token_ids) - 2


@dataclass(frozen=True)
class TensorOutput:
    """Bytes [offset, offset + len(data)) of one output tensor of one item."""

    item: int  # position of the item in the list given to `Runner.run`
    kind: int  # pb.INCLUDE_*
    layer: int
    shape: tuple[int, ...]
    data: bytes
    offset: int = 0


Emit = Callable[[TensorOutput], None]


class Runner(Protocol):
    """Runs items through a model; the engine implements it."""

    def run(self, items: Sequence[WorkItem], emit: Emit) -> None: ...
