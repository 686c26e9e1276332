"""Score: a variant-scoring request run as forward passes through the ordinary queue.

The frontend turns one Score request into model passes that are ordinary queue items
(Predict items with one `<mask>`, or one Encode item for the unmasked wild type's
logits), so they share the workers, batching, deadlines, cancellation and queue bound
of every other request. A request keeps at most `window` passes queued or running at
once and tops the window up as passes complete, so a long scan never holds more than
about one batch ahead of a request that arrives after it on the same queue lane.
Scores are log-softmax log-odds computed here, with numpy, from the logits the
workers return.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import numpy as np

from esm2_service.alphabet import MASK_TOKEN, STANDARD_RESIDUES, TOKEN_INDEX
from esm2_service.esm2.internal.v1 import queue_pb2 as qpb
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.server.broker import Broker
from esm2_service.server.errors import QueueFull
from esm2_service.tensors import TensorAssembler, to_wire_bytes
from esm2_service.variants import ValidScoreRequest

MM = pb.SCORING_STRATEGY_MASKED_MARGINAL
WT = pb.SCORING_STRATEGY_WT_MARGINAL
PLL = pb.SCORING_STRATEGY_PSEUDO_LOG_LIKELIHOOD
# Keeps every VariantScores message far below gRPC's 4 MiB limit, whatever the names.
SCORES_PER_MESSAGE = 1024
_AMINO_ACID_COLUMNS = [TOKEN_INDEX[residue] for residue in STANDARD_RESIDUES]


@dataclass(frozen=True)
class Pass:
    """One forward pass: what to run, and which scores its output feeds."""

    strategy: int
    sequence: str
    position: int = 0  # 1-based masked position; 0 for the unmasked wild type
    variant: int = -1  # pseudo_log_likelihood: the variant whose sequence this is

    @property
    def tokens(self) -> int:
        return len(self.sequence) - (len(MASK_TOKEN) - 1 if self.position else 0)

    def queue_item(self, request_id: str, index: int, deadline: float, now: float):
        task = qpb.TASK_ENCODE if self.strategy == WT else qpb.TASK_PREDICT
        return qpb.QueueItem(
            request_id=request_id,
            sequence_index=index,
            task=task,
            sequence=self.sequence,
            include=[pb.INCLUDE_LOGITS] if task == qpb.TASK_ENCODE else [],
            dtype=pb.DTYPE_FLOAT32,
            deadline_unix_s=deadline,
            enqueued_unix_s=now,
        )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax over the whole vocabulary, in float64."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def masked(sequence: str, position: int) -> str:
    return sequence[: position - 1] + MASK_TOKEN + sequence[position:]


def plan_passes(request: ValidScoreRequest) -> list[Pass]:
    """Every pass the request needs: the wild type's first, then masked positions, then
    each variant's pseudo-log-likelihood passes, variant by variant."""
    passes: list[Pass] = []
    if WT in request.strategies:
        passes.append(Pass(WT, request.wild_type))
    if MM in request.strategies:
        passes += [Pass(MM, masked(request.wild_type, p), p) for p in request.positions]
    if PLL in request.strategies:
        for index, variant in enumerate(request.variants):
            sequence = request.mutated_sequence(variant)
            passes += [
                Pass(PLL, masked(sequence, p), p, index) for p in range(1, len(sequence) + 1)
            ]
    return passes


class Scores:
    """What the completed passes have produced: log-probabilities and variant scores."""

    def __init__(self, request: ValidScoreRequest):
        self.request = request
        self.log_probs: dict[int, dict[int, np.ndarray]] = {MM: {}, WT: {}}  # position -> [33]
        self._waiting_on: dict[int, list[int]] = defaultdict(list)  # position -> MM variants
        self._positions_left = [len(variant) for variant in request.variants]
        for index, variant in enumerate(request.variants):
            for substitution in variant:
                self._waiting_on[substitution.position].append(index)
        self._pll = np.zeros(len(request.variants))
        self._pll_left = [len(request.wild_type)] * len(request.variants)

    def add(self, done: Pass, logits: np.ndarray) -> dict[int, list[tuple[int, float]]]:
        """Takes one pass's logits; returns the (variant, score) pairs it completed."""
        rows = log_softmax(logits)
        if done.strategy == WT:
            self.log_probs[WT] = {p: rows[p - 1] for p in self.request.positions}
            return {WT: [(i, self._log_odds(WT, i)) for i in range(len(self.request.variants))]}
        if done.strategy == MM:
            self.log_probs[MM][done.position] = rows[0]
            completed = []
            for index in self._waiting_on.pop(done.position):
                self._positions_left[index] -= 1
                if not self._positions_left[index]:
                    completed.append((index, self._log_odds(MM, index)))
            return {MM: completed}
        residue = self.request.mutated_sequence(self.request.variants[done.variant])
        self._pll[done.variant] += rows[0, TOKEN_INDEX[residue[done.position - 1]]]
        self._pll_left[done.variant] -= 1
        if self._pll_left[done.variant]:
            return {}
        return {PLL: [(done.variant, float(self._pll[done.variant]))]}

    def _log_odds(self, strategy: int, index: int) -> float:
        rows = self.log_probs[strategy]
        return float(
            sum(
                rows[s.position][TOKEN_INDEX[s.mutant]] - rows[s.position][TOKEN_INDEX[s.wild_type]]
                for s in self.request.variants[index]
            )
        )

    def landscapes(self) -> Iterable[pb.PositionLogProbs]:
        """log p(amino acid) [positions, 20] for each strategy that has them."""
        for strategy in (MM, WT):
            if strategy in self.request.strategies:
                positions = self.request.positions
                table = np.stack([self.log_probs[strategy][p] for p in positions])
                table = table[:, _AMINO_ACID_COLUMNS].astype(np.float32)
                yield pb.PositionLogProbs(
                    strategy=strategy,
                    positions=positions,
                    log_probs=pb.Tensor(
                        dtype=pb.DTYPE_FLOAT32,
                        shape=table.shape,
                        data=to_wire_bytes(table, pb.DTYPE_FLOAT32),
                    ),
                )


class ScoreRun:
    """Runs one validated Score request through the broker, yielding response messages."""

    def __init__(
        self,
        broker: Broker,
        request: ValidScoreRequest,
        request_id: str,
        deadline: float,
        window: int,
    ):
        self.broker, self.request, self.request_id = broker, request, request_id
        self.deadline, self.window = deadline, window
        self.passes = plan_passes(request)
        self.scores = Scores(request)
        self.model: pb.ModelInfo | None = None
        self._submitted = self._completed = 0
        self._tensors: dict[int, TensorAssembler] = {}
        self._logits: dict[int, np.ndarray] = {}

    async def responses(self) -> AsyncIterator[pb.ScoreResponse]:
        """Raises QueueFull if the queue cannot take the first passes; afterwards a full
        queue only slows the run down (passes are topped up as room appears)."""
        await self._top_up(first=True)
        async with contextlib.aclosing(self.broker.replies(self.request_id, self.deadline)) as rx:
            async for batch in rx:
                for piece in batch:
                    self._take(piece.message)
                for response in self._completed_scores():
                    yield response
                if self._completed == len(self.passes):
                    break
                await self._top_up()
        for landscape in self.scores.landscapes():
            yield pb.ScoreResponse(log_probs=landscape)
        yield pb.ScoreResponse(
            complete=pb.ScoreComplete(
                strategies=self.request.strategies,
                amino_acids=STANDARD_RESIDUES,
                variant_count=len(self.request.variants),
                forward_passes=len(self.passes),
                model=self.model,
            )
        )

    async def _top_up(self, first: bool = False) -> None:
        room = self.window - (self._submitted - self._completed)
        todo = self.passes[self._submitted : self._submitted + max(room, 0)]
        if not todo:
            return
        now = time.time()
        items = [
            task.queue_item(self.request_id, self._submitted + i, self.deadline, now)
            for i, task in enumerate(todo)
        ]
        try:
            tokens = [task.tokens for task in todo]
            await self.broker.enqueue(self.request_id, items, tokens, self.deadline)
        except QueueFull:
            if first:
                raise
            return  # retried after the next read: a pass completes, or a read times out
        self._submitted += len(todo)

    def _take(self, message: pb.EncodeResponse) -> None:
        index = message.sequence_index
        if message.HasField("chunk"):
            chunk = message.chunk
            if index not in self._tensors:
                self._tensors[index] = TensorAssembler(chunk.tensor.dtype, chunk.tensor.shape)
            self._tensors[index].add(chunk)
            return
        self._logits[index] = self._tensors.pop(index).array()
        self.model = self.model or message.complete.model

    def _completed_scores(self) -> Iterable[pb.ScoreResponse]:
        completed: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for index, logits in self._logits.items():
            for strategy, pairs in self.scores.add(self.passes[index], logits).items():
                completed[strategy] += pairs
        self._completed += len(self._logits)
        self._logits.clear()
        for strategy in sorted(completed):
            pairs = completed[strategy]
            for start in range(0, len(pairs), SCORES_PER_MESSAGE):
                part = pairs[start : start + SCORES_PER_MESSAGE]
                yield pb.ScoreResponse(
                    scores=pb.VariantScores(
                        strategy=strategy,
                        variant_indices=[index for index, _ in part],
                        mutants=[self.request.mutants[index] for index, _ in part],
                        scores=[score for _, score in part],
                    )
                )
