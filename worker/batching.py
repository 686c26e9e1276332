"""Batch planning: a pure function from item lengths and lanes to the order they run in."""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(
    lengths: Sequence[int],
    lanes: Sequence[int],
    max_batch_tokens: int,
    first_lane: int | None = None,
) -> list[list[int]]:
    """Groups item indices into packed batches of at most `max_batch_tokens` tokens (an
    item longer than that runs alone). A batch holds items of one queue lane only, so a
    short item never waits for a long one computed beside it. Lanes run shortest first
    (`first_lane`, when given, goes before all others), and items shortest first within
    a lane."""

    def order(i: int) -> tuple[bool, int, int]:
        return lanes[i] != first_lane, lanes[i], lengths[i]

    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for index in sorted(range(len(lengths)), key=order):
        full = tokens + lengths[index] > max_batch_tokens
        if current and (full or lanes[index] != lanes[current[0]]):
            batches.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += lengths[index]
    if current:
        batches.append(current)
    return batches
