"""bench.gpu's batching of the in-process contenders."""

from __future__ import annotations

import sys

from support import ROOT

sys.path.insert(0, str(ROOT))
from bench.gpu import budget_batches  # noqa: E402

sys.path.pop(0)


def test_padded_batches_count_every_row_at_the_longest_length():
    sequences = ["A" * 8, "A" * 8, "A" * 18, "A" * 38]  # 10, 10, 20, 40 tokens
    assert budget_batches(sequences, 40, padded=True) == [[0, 1], [2], [3]]
    assert budget_batches(sequences, 60, padded=True) == [[0, 1, 2], [3]]


def test_packed_batches_count_tokens_only_and_a_long_sequence_runs_alone():
    sequences = ["A" * 8, "A" * 8, "A" * 18, "A" * 98, "A" * 8]  # 10, 10, 20, 100, 10 tokens
    assert budget_batches(sequences, 40, padded=False) == [[0, 1, 2], [3], [4]]
    assert [i for batch in budget_batches(sequences, 1, padded=False) for i in batch] == list(
        range(5)
    )
