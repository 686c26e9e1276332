"""Score requests and results: strategy names, and the assembly of a Score stream."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.tensors import TensorAssembler
from esm2_service.variants import STRATEGY_NAMES

from .results import ModelInfo, ResultStreamError

STRATEGY_VALUES: dict[str, int] = {name: value for value, name in STRATEGY_NAMES.items()}


def strategy_values(names: Iterable[str] | str) -> list[int]:
    """`["masked_marginal"]` -> `[pb.SCORING_STRATEGY_MASKED_MARGINAL]`; ValueError
    naming the valid names for an unknown one."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [name for name in names if name not in STRATEGY_VALUES]
    if unknown:
        valid = ", ".join(STRATEGY_VALUES)
        raise ValueError(f"unknown strategy {unknown[0]!r}; valid: {valid}")
    return [STRATEGY_VALUES[name] for name in names]


def score_request(
    wild_type: str, variants: Iterable[str] | None, scan: bool, strategies: Iterable[str] | str
) -> pb.ScoreRequest:
    if isinstance(variants, str):
        raise TypeError("variants must be a list of strings, not one string")
    return pb.ScoreRequest(
        wild_type=wild_type,
        variants=list(variants or ()),
        scan=scan,
        strategies=strategy_values(strategies),
    )


@dataclass
class ScoreResult:
    """What Score returned.

    `scores[strategy]` holds one score per variant, in `mutants` order (the request's
    order, or the scan's: position by position, mutants in `amino_acids` order).
    `log_probs[strategy]` is [len(positions), 20]: log p(amino acid) at each mutated
    position (1-based `positions`), columns in `amino_acids` order, for
    masked_marginal and wt_marginal.
    """

    mutants: list[str]
    scores: dict[str, np.ndarray]
    positions: list[int] = field(default_factory=list)
    log_probs: dict[str, np.ndarray] = field(default_factory=dict)
    amino_acids: str = ""
    forward_passes: int = 0
    model: ModelInfo | None = None


class ScoreAssembler:
    """Rebuilds a ScoreResult from the messages of one Score stream."""

    def __init__(self, mutants: list[str] | None):
        self._mutants: dict[int, str] = dict(enumerate(mutants or ()))
        self._scores: dict[int, dict[int, float]] = {}
        self._positions: list[int] = []
        self._log_probs: dict[str, np.ndarray] = {}
        self._complete: pb.ScoreComplete | None = None

    def add(self, message: pb.ScoreResponse) -> int:
        """Takes one message; returns how many scores it carried."""
        if self._complete is not None:
            raise ResultStreamError("a Score message after its ScoreComplete")
        payload = message.WhichOneof("payload")
        if payload == "scores":
            return self._add_scores(message.scores)
        if payload == "log_probs":
            self._add_log_probs(message.log_probs)
        elif payload == "complete":
            self._complete = message.complete
        else:
            raise ResultStreamError("a Score message with no payload")
        return 0

    def _add_scores(self, scores: pb.VariantScores) -> int:
        by_variant = self._scores.setdefault(scores.strategy, {})
        for index, mutant, score in zip(
            scores.variant_indices, scores.mutants, scores.scores, strict=True
        ):
            if index in by_variant:
                raise ResultStreamError(f"variant {index} scored twice")
            by_variant[index] = score
            self._mutants.setdefault(index, mutant)
        return len(scores.scores)

    def _add_log_probs(self, log_probs: pb.PositionLogProbs) -> None:
        tensor = log_probs.log_probs
        assembler = TensorAssembler(tensor.dtype, tuple(tensor.shape))
        assembler.add(pb.TensorChunk(tensor=tensor))
        self._positions = list(log_probs.positions)
        self._log_probs[STRATEGY_NAMES.get(log_probs.strategy, str(log_probs.strategy))] = (
            assembler.array()
        )

    def finish(self) -> ScoreResult:
        complete = self._complete
        if complete is None:
            raise ResultStreamError("the Score stream ended before its ScoreComplete")
        count = complete.variant_count
        scores = {}
        for strategy in complete.strategies:
            found = self._scores.get(strategy, {})
            if sorted(found) != list(range(count)):
                raise ResultStreamError(
                    f"{STRATEGY_NAMES.get(strategy, strategy)}: {len(found)} of {count} scores"
                )
            scores[STRATEGY_NAMES[strategy]] = np.array([found[i] for i in range(count)])
        return ScoreResult(
            mutants=[self._mutants[i] for i in range(count)],
            scores=scores,
            positions=self._positions,
            log_probs=self._log_probs,
            amino_acids=complete.amino_acids,
            forward_passes=complete.forward_passes,
            model=ModelInfo.from_pb(complete.model),
        )
