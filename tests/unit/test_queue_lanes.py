from esm2_service import queue
from esm2_service.validation import MAX_TOKENS


def test_each_length_has_one_lane_and_the_bounds_double_up_to_the_limit():
    lengths = (1, 128, 129, 256, 257, 512, 513, 1024, 1025, MAX_TOKENS)
    assert [queue.lane_index(n) for n in lengths] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert len(queue.QUEUE_LANES) == len(set(queue.QUEUE_LANES)) == len(queue.LANE_NAMES)
    bounds = (*queue.LANE_MAX_TOKENS, MAX_TOKENS)
    assert all(upper <= 2 * lower for lower, upper in zip(bounds[:-1], bounds[1:], strict=True))
    assert queue.QUEUE_LANES[0] == "esm2:v1:queue:to128"
    assert queue.QUEUE_LANES[-1] == "esm2:v1:queue:over1024"
