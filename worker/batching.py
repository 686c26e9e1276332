"""Batch planning: a pure function from item lengths to the order they run in."""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Groups item indices into packed batches of at most `max_batch_tokens` tokens
    (an item longer than that runs alone), shortest items first, so short requests
    finish in the first batch rather than behind long ones."""
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if current and tokens + lengths[index] > max_batch_tokens:
            batches.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += lengths[index]
    if current:
        batches.append(current)
    return batches
