from hypothesis import given
from hypothesis import strategies as st

from esm2_service.worker.batching import plan_batches


def test_batches_are_shortest_first_and_within_the_token_budget():
    lengths = [900, 12, 300, 50, 2050, 40]
    batches = plan_batches(lengths, [0] * len(lengths), max_batch_tokens=1000)
    assert batches == [[1, 5, 3, 2], [0], [4]]
    for batch in batches[:-1]:
        assert sum(lengths[i] for i in batch) <= 1000


def test_an_item_longer_than_the_budget_runs_alone_and_nothing_is_dropped():
    batches = plan_batches([5000, 10, 10], [0, 0, 0], max_batch_tokens=100)
    assert batches == [[1, 2], [0]]
    assert plan_batches([], [], 100) == []


def test_batches_never_mix_lanes_and_run_shortest_lane_first():
    lengths = [300, 20, 1100, 400, 30]
    lanes = [1, 0, 2, 1, 0]
    assert plan_batches(lengths, lanes, 8192) == [[1, 4], [0, 3], [2]]


def test_a_promoted_lane_runs_first():
    lengths = [300, 20, 1100, 400, 30]
    lanes = [1, 0, 2, 1, 0]
    assert plan_batches(lengths, lanes, 8192, first_lane=2) == [[2], [1, 4], [0, 3]]


@given(
    st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 2)), max_size=20),
    st.integers(1, 9000),
    st.none() | st.integers(0, 2),
)
def test_every_item_runs_once_in_one_lane_batches_within_budget(items, budget, first_lane):
    lengths = [length for length, _ in items]
    lanes = [lane for _, lane in items]
    batches = plan_batches(lengths, lanes, budget, first_lane)
    assert sorted(i for batch in batches for i in batch) == list(range(len(items)))
    for batch in batches:
        assert len({lanes[i] for i in batch}) == 1
        assert len(batch) == 1 or sum(lengths[i] for i in batch) <= budget
    if batches and first_lane in lanes:
        assert lanes[batches[0][0]] == first_lane
