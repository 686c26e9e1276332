from esm2_service.worker.batching import plan_batches


def test_batches_are_shortest_first_and_within_the_token_budget():
    lengths = [900, 12, 300, 50, 2050, 40]
    batches = plan_batches(lengths, max_batch_tokens=1000)
    assert batches == [[1, 5, 3, 2], [0], [4]]
    for batch in batches[:-1]:
        assert sum(lengths[i] for i in batch) <= 1000


def test_an_item_longer_than_the_budget_runs_alone_and_nothing_is_dropped():
    batches = plan_batches([5000, 10, 10], max_batch_tokens=100)
    assert batches == [[1, 2], [0]]
    assert plan_batches([], 100) == []
