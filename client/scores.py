"""Score requests and results: strategy names, and the assembly of a Score stream."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.tensors import TensorAssembler
from esm2_service.variants import (
    MAX_FORWARD_PASSES,
    MAX_VARIANTS,
    STRATEGY_NAMES,
    forward_passes,
    parse_variant,
    resolve_strategies,
    scan_variants,
)

from .results import ModelInfo, ResultStreamError

# The variants' share of a request: the service takes requests of at most 256 KiB.
MAX_REQUEST_VARIANT_BYTES = 192 * 1024
MASKED_MARGINAL = pb.SCORING_STRATEGY_MASKED_MARGINAL
WT_MARGINAL = pb.SCORING_STRATEGY_WT_MARGINAL
PSEUDO_LOG_LIKELIHOOD = pb.SCORING_STRATEGY_PSEUDO_LOG_LIKELIHOOD
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


def plan_requests(request: pb.ScoreRequest) -> list[tuple[int, pb.ScoreRequest]]:
    """(offset of its first variant, request) for each request a (valid) Score of any
    size needs: consecutive slices within the service's limits on variants, request bytes
    and forward passes. A scan the service can take in one request stays one; a larger
    one is sent as its variants."""
    strategies = resolve_strategies(request.strategies)
    wild_type = request.wild_type
    if request.scan:
        mutants, variants = scan_variants(wild_type)
        if forward_passes(strategies, wild_type, list(variants)) <= MAX_FORWARD_PASSES:
            return [(0, request)]
        mutants = list(mutants)
    else:
        mutants = list(request.variants)
    plans, start = [], 0
    while start < len(mutants):
        end = _slice_end(mutants, start, wild_type, strategies)
        plans.append(
            (
                start,
                pb.ScoreRequest(
                    wild_type=wild_type, variants=mutants[start:end], strategies=strategies
                ),
            )
        )
        start = end
    return plans


def _slice_end(mutants: list[str], start: int, wild_type: str, strategies) -> int:
    """Where the request that starts at `start` must end to stay within every limit."""
    per_variant = len(wild_type) if PSEUDO_LOG_LIKELIHOOD in strategies else 0
    fixed = int(WT_MARGINAL in strategies)
    masked = MASKED_MARGINAL in strategies
    positions: set[int] = set()
    end, size = start, 0
    while end < len(mutants) and end - start < MAX_VARIANTS:
        variant_positions = {s.position for s in parse_variant(mutants[end], wild_type)[0]}
        size += len(mutants[end]) + 4  # protobuf's tag and length
        count = end - start + 1
        passes = fixed + per_variant * count + masked * len(positions | variant_positions)
        if end > start and (size > MAX_REQUEST_VARIANT_BYTES or passes > MAX_FORWARD_PASSES):
            break
        positions |= variant_positions
        end += 1
    return end


def merge_results(parts: list[ScoreResult]) -> ScoreResult:
    """One result from those of consecutive slices of the variants."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    checkpoints = {part.model.checkpoint_sha256 for part in parts if part.model}
    if len(checkpoints) > 1:
        raise ResultStreamError("the service's weights changed between the requests of one score")
    rows: dict[str, dict[int, np.ndarray]] = {}
    for part in parts:
        for name, table in part.log_probs.items():
            rows.setdefault(name, {}).update(zip(part.positions, table, strict=True))
    positions = sorted({p for part in parts for p in part.positions})
    return ScoreResult(
        mutants=[mutant for part in parts for mutant in part.mutants],
        scores={
            name: np.concatenate([part.scores[name] for part in parts]) for name in first.scores
        },
        positions=positions,
        log_probs={name: np.stack([by[p] for p in positions]) for name, by in rows.items()},
        amino_acids=first.amino_acids,
        forward_passes=sum(part.forward_passes for part in parts),
        model=first.model,
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
