"""Score end to end: every strategy against the same computation done with fair-esm's
forward on the same weights, the streaming contract, limits and precise errors."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from support import (
    bad_request_fields,
    log_probs,
    parse_mutant,
    reference_masked_marginal,
    reference_pll,
    reference_wt_marginal,
    tem1_variants,
)

from esm2_service.alphabet import MASK_TOKEN, STANDARD_RESIDUES, TOKEN_INDEX
from esm2_service.client import Esm2Client, InvalidArgumentError
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.esm2.v1 import esm2_pb2_grpc
from esm2_service.variants import MAX_FORWARD_PASSES, MAX_VARIANTS

WILD_TYPE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQ"


@pytest.fixture(scope="module")
def client(service):
    with Esm2Client(service.target, timeout_s=300) as client:
        yield client


def test_every_strategy_equals_fair_esm_on_the_same_weights(client, tiny_reference):
    triple = f"{WILD_TYPE[80]}81C:{WILD_TYPE[81]}82Y:{WILD_TYPE[79]}80A"
    variants = ["A4G", "K2P:Q9W", "M1M", triple]
    strategies = ["masked_marginal", "wt_marginal", "pseudo_log_likelihood"]

    result = client.score(WILD_TYPE, variants, strategies=strategies)

    assert result.mutants == variants
    assert sorted(result.scores) == sorted(strategies)
    references = {
        "masked_marginal": reference_masked_marginal,
        "wt_marginal": reference_wt_marginal,
        "pseudo_log_likelihood": reference_pll,
    }
    for name, reference in references.items():
        expected = [reference(tiny_reference, WILD_TYPE, v) for v in variants]
        np.testing.assert_allclose(result.scores[name], expected, atol=1e-4, err_msg=name)
    assert result.scores["masked_marginal"][2] == 0.0  # a synonymous variant
    passes = 7 + 1 + 4 * len(WILD_TYPE)  # distinct positions, the wild type, L per variant
    assert result.forward_passes == passes


def test_landscape_holds_log_probs_of_the_20_amino_acids_at_each_mutated_position(
    client, tiny_reference
):
    result = client.score(WILD_TYPE, ["A4G", "Q9W"], strategies=["masked_marginal", "wt_marginal"])

    assert result.amino_acids == STANDARD_RESIDUES
    assert result.positions == [4, 9]
    columns = [TOKEN_INDEX[aa] for aa in STANDARD_RESIDUES]
    unmasked = log_probs(tiny_reference, WILD_TYPE)
    np.testing.assert_allclose(
        result.log_probs["wt_marginal"], unmasked[[3, 8]][:, columns], atol=1e-5
    )
    for row, position in zip(result.log_probs["masked_marginal"], result.positions, strict=True):
        masked = WILD_TYPE[: position - 1] + MASK_TOKEN + WILD_TYPE[position:]
        expected = log_probs(tiny_reference, masked)[position - 1][columns]
        np.testing.assert_allclose(row, expected, atol=1e-5)


def test_scan_scores_every_single_substitution_from_one_pass_per_position(client, tiny_reference):
    wild_type = WILD_TYPE[:30]
    result = client.score(wild_type, scan=True)

    assert len(result.mutants) == 19 * len(wild_type)
    assert result.mutants[:3] == ["M1A", "M1C", "M1D"]
    assert result.forward_passes == len(wild_type)
    landscape = result.log_probs["masked_marginal"]
    assert landscape.shape == (30, 20)
    # each score is the landscape's log-odds against the wild-type residue
    for index in (0, 100, 569):
        wt, position, mt = parse_mutant(result.mutants[index])[0]
        row = landscape[position - 1]
        expected = row[STANDARD_RESIDUES.index(mt)] - row[STANDARD_RESIDUES.index(wt)]
        assert result.scores["masked_marginal"][index] == pytest.approx(expected, abs=1e-5)
    expected = reference_masked_marginal(tiny_reference, wild_type, result.mutants[569])
    assert result.scores["masked_marginal"][569] == pytest.approx(expected, abs=1e-4)


def test_tem1_single_mutants_score_like_fair_esm(client, tiny_reference):
    wild_type, variants = tem1_variants()
    sample = [mutant for mutant, _ in variants[::250]]

    result = client.score(wild_type, sample)

    expected = [reference_masked_marginal(tiny_reference, wild_type, m) for m in sample]
    np.testing.assert_allclose(result.scores["masked_marginal"], expected, atol=1e-4)


def test_scores_stream_as_their_positions_complete(service):
    with grpc.insecure_channel(service.target) as channel:
        stub = esm2_pb2_grpc.Esm2ServiceStub(channel)
        request = pb.ScoreRequest(wild_type=WILD_TYPE, scan=True)
        messages = list(stub.Score(request, timeout=120))

    kinds = [message.WhichOneof("payload") for message in messages]
    assert kinds[-2:] == ["log_probs", "complete"]
    assert kinds.count("scores") > 1, "scores came in one piece, not as passes completed"
    complete = messages[-1].complete
    assert list(complete.strategies) == [pb.SCORING_STRATEGY_MASKED_MARGINAL]
    assert complete.variant_count == 19 * len(WILD_TYPE)
    assert complete.model.name
    scored = [i for m in messages if m.HasField("scores") for i in m.scores.variant_indices]
    assert sorted(scored) == list(range(complete.variant_count))


def test_a_wild_type_mismatch_is_named_by_variant_before_anything_is_sent(client):
    with pytest.raises(InvalidArgumentError) as raised:
        client.score(WILD_TYPE, ["A4G", "G4A", "K2P:K2A", "A999G", "A4Z", "4G", f"A{'9' * 5000}G"])

    assert raised.value.violations == [
        ("variants[1]", "G4A: the wild type has 'A' at position 4, not 'G'"),
        ("variants[2]", "K2A: position 2 is mutated twice"),
        ("variants[3]", f"A999G: position 999 is outside the wild type (1..{len(WILD_TYPE)})"),
        (
            "variants[4]",
            "A4Z: mutant residue 'Z' is not one of the 20 amino acids ACDEFGHIKLMNPQRSTVWY",
        ),
        (
            "variants[5]",
            "'4G' is not a substitution like A42G (wild-type residue, 1-based position, "
            "mutant residue; join several with ':')",
        ),
        (
            "variants[6]",
            f"A{'9' * 39}…(5,002 characters): position {'9' * 40}…(5,000 characters) "
            f"is outside the wild type (1..{len(WILD_TYPE)})",
        ),
    ]


@pytest.mark.parametrize(
    ("request_fields", "expected"),
    [
        (
            {"wild_type": WILD_TYPE, "variants": ["A4G"], "scan": True},
            [("scan", "give variants or set scan, not both")],
        ),
        (
            {"wild_type": WILD_TYPE},
            [("variants", f"no variants; give 1 to {MAX_VARIANTS:,}, or set scan")],
        ),
        (
            {"wild_type": "MKTJ", "scan": True},
            [
                (
                    "wild_type",
                    "character 'J' at position 4 is not accepted "
                    "(accepted: ACDEFGHIKLMNPQRSTVWY, XBUZO, '-')",
                )
            ],
        ),
        (
            {"wild_type": WILD_TYPE, "scan": True, "strategies": [7]},
            [
                (
                    "strategies[0]",
                    "unknown strategy 7; valid: SCORING_STRATEGY_MASKED_MARGINAL, "
                    "SCORING_STRATEGY_WT_MARGINAL, SCORING_STRATEGY_PSEUDO_LOG_LIKELIHOOD",
                )
            ],
        ),
    ],
)
def test_the_server_refuses_bad_requests_with_field_violations(service, request_fields, expected):
    with grpc.insecure_channel(service.target) as channel:
        stub = esm2_pb2_grpc.Esm2ServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Score(pb.ScoreRequest(**request_fields), timeout=30))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(raised.value) == expected


def test_pseudo_log_likelihood_beyond_the_pass_limit_is_refused_with_the_count(service):
    variants = [f"A4{aa}" for aa in "CDEFGHIKLMNPQRSTVWY"] * 11  # 209 variants x 83 passes
    with grpc.insecure_channel(service.target) as channel:
        stub = esm2_pb2_grpc.Esm2ServiceStub(channel)
        request = pb.ScoreRequest(
            wild_type=WILD_TYPE,
            variants=variants,
            strategies=[pb.SCORING_STRATEGY_PSEUDO_LOG_LIKELIHOOD],
        )
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Score(request, timeout=30))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ((field, description),) = bad_request_fields(raised.value)
    assert field == "strategies"
    assert f"{209 * len(WILD_TYPE):,} forward passes" in description
    assert f"the limit is {MAX_FORWARD_PASSES:,} per request" in description


def test_a_scan_keeps_a_bounded_window_queued_and_short_requests_pass_it(service, redis_server):
    """Polls the queue while a scan runs: the scan never holds more than its window of
    passes, and an Encode sent mid-scan finishes before the scan does."""
    import redis

    from esm2_service import queue

    wild_type = (WILD_TYPE * 4)[:286]
    db = redis.Redis.from_url(redis_server.url_for_db(0))
    depths: list[int] = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            depths.append(sum(db.xlen(lane) for lane in queue.QUEUE_LANES))

    poller = threading.Thread(target=poll)
    poller.start()
    finished: list[str] = []
    with Esm2Client(service.target, timeout_s=300) as scan_client:
        scan = threading.Thread(
            target=lambda: (scan_client.score(wild_type, scan=True), finished.append("scan"))
        )
        scan.start()
        waited = threading.Event()
        while not any(depths) and scan.is_alive():
            waited.wait(0.001)
        scan_client.encode([wild_type[:270]])  # the scan's queue lane: 257 to 512 tokens
        finished.append("encode")
        scan.join()
    done.set()
    poller.join()
    db.close()

    assert finished == ["encode", "scan"]
    # a batch per live worker (one here), plus the Encode's item
    assert 0 < max(depths) <= 8 + 1


def test_the_client_splits_a_list_beyond_one_request_and_merges_in_order(client, tiny_reference):
    rng = np.random.default_rng(5)
    positions = rng.integers(1, len(WILD_TYPE) + 1, size=(60_000, 2))
    mutants = [
        ":".join(
            f"{WILD_TYPE[p - 1]}{p}{STANDARD_RESIDUES[(p * 7 + i) % 20]}"
            for i, p in enumerate(pair)
        )
        for pair in positions
        if pair[0] != pair[1]
    ]
    scored: list[int] = []

    result = client.score(WILD_TYPE, mutants, on_scores=scored.append)

    assert result.mutants == mutants
    assert sum(scored) == len(mutants)
    assert result.forward_passes > len(WILD_TYPE)  # several requests, each its own passes
    assert result.positions == list(range(1, len(WILD_TYPE) + 1))
    landscape = result.log_probs["masked_marginal"]
    for index in (0, 17_000, len(mutants) - 1):
        expected = sum(
            landscape[p - 1][STANDARD_RESIDUES.index(mt)]
            - landscape[p - 1][STANDARD_RESIDUES.index(wt)]
            for wt, p, mt in parse_mutant(mutants[index])
        )
        assert result.scores["masked_marginal"][index] == pytest.approx(expected, abs=1e-5)
    reference = reference_masked_marginal(tiny_reference, WILD_TYPE, mutants[-1])
    assert result.scores["masked_marginal"][-1] == pytest.approx(reference, abs=1e-4)


def test_a_cancelled_scan_stops_queueing_and_its_passes_leave_the_queue(service, redis_server):
    import time

    import redis

    from esm2_service import queue

    db = redis.Redis.from_url(redis_server.url_for_db(0))
    with grpc.insecure_channel(service.target) as channel:
        stub = esm2_pb2_grpc.Esm2ServiceStub(channel)
        call = stub.Score(pb.ScoreRequest(wild_type=(WILD_TYPE * 12)[:900], scan=True), timeout=120)
        first = next(call)
        call.cancel()
    assert first.HasField("scores")

    def depth() -> int:
        return sum(db.xlen(lane) for lane in queue.QUEUE_LANES)

    deadline = time.monotonic() + 10
    while depth() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert depth() == 0, "the cancelled scan's passes are still queued"
    time.sleep(1.0)
    assert depth() == 0, "the cancelled scan kept queueing passes"
    db.close()
