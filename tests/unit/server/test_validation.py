from __future__ import annotations

import pytest

from esm2_service.esm2.internal.v1 import queue_pb2 as qpb
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.server.http_requests import parse_request
from esm2_service.validation import (
    MAX_ECHOED_CHARACTERS,
    MAX_REPORTED_VIOLATIONS,
    FieldViolation,
    InvalidRequest,
    Violations,
    clip,
    left_out_count,
    resolve_layers,
    validate_encode,
    validate_predict,
)
from esm2_service.variants import validate_score


def encode(*sequences, **params) -> pb.EncodeRequest:
    return pb.EncodeRequest(
        items=[pb.Item(sequence=s) for s in sequences], params=pb.EncodeParams(**params)
    )


def predict(*sequences, **params) -> pb.PredictRequest:
    return pb.PredictRequest(
        items=[pb.Item(sequence=s) for s in sequences], params=pb.PredictParams(**params)
    )


def violations(validate, request) -> list[tuple[str, str]]:
    with pytest.raises(InvalidRequest) as raised:
        validate(request)
    return [(v.field, v.description) for v in raised.value.violations]


def test_encode_defaults_resolve_to_mean_of_the_last_layer_in_float32():
    valid = validate_encode(encode("MKTAYIAK", "ACDEFGHIKLMNPQRSTVWYXBUZO-"))
    assert valid.task == qpb.TASK_ENCODE
    assert valid.sequences == ("MKTAYIAK", "ACDEFGHIKLMNPQRSTVWYXBUZO-")
    assert valid.repr_layers == (6,)
    assert valid.include == (pb.INCLUDE_MEAN,)
    assert valid.dtype == pb.DTYPE_FLOAT32


def test_layers_resolve_negative_indices_and_deduplicate():
    assert resolve_layers([-1, 6, 0, -7, -3]) == (0, 4, 6)
    valid = validate_encode(
        encode(
            "MK", repr_layers=[-1, 6, 0], include=[pb.INCLUDE_BOS, pb.INCLUDE_MEAN, pb.INCLUDE_BOS]
        )
    )
    assert valid.repr_layers == (0, 6)
    assert valid.include == (pb.INCLUDE_MEAN, pb.INCLUDE_BOS)


def test_every_violation_is_reported_at_once_with_field_and_position():
    request = encode(
        "MKj", "", "M K", repr_layers=[7, -8, 3], include=[pb.INCLUDE_MEAN, 42], dtype=9
    )
    found = violations(validate_encode, request)
    fields = [field for field, _ in found]
    assert fields == [
        "items[0].sequence",
        "items[1].sequence",
        "items[2].sequence",
        "params.repr_layers[0]",
        "params.repr_layers[1]",
        "params.include[1]",
        "params.dtype",
    ]
    assert "character 'j' at position 3" in found[0][1]
    assert "empty" in found[1][1]
    assert "character ' ' at position 2" in found[2][1]
    assert found[3][1] == "layer 7 is outside -7..6"
    assert found[4][1] == "layer -8 is outside -7..6"
    assert "unknown output 42" in found[5][1]
    assert "unknown dtype 9" in found[6][1]


@pytest.mark.parametrize(
    "bad", ["j", "1", " ", "\n", "*", ".", "<cls>", "<unk>", "J", "é", "ı", "ß", "<MASK>"]
)
def test_characters_outside_the_alphabet_are_rejected_never_turned_into_unk(bad):
    found = violations(validate_encode, encode(f"MK{bad}A"))
    assert found[0][0] == "items[0].sequence"
    assert f"character {bad[0]!r} at position 3" in found[0][1]


def test_mask_is_for_predict_only():
    found = violations(validate_encode, encode("MK<mask>A"))
    assert found == [("items[0].sequence", "<mask> at position 3: only Predict accepts <mask>")]


def test_too_many_items_and_too_long_sequences():
    found = violations(validate_encode, encode(*["M"] * 9))
    assert found == [("items", "9 items; the limit is 8")]
    found = violations(validate_encode, encode("A" * 2049))
    assert found == [("items[0].sequence", "2,049 tokens; the limit is 2,048")]
    assert validate_encode(encode("A" * 2048)).sequences == ("A" * 2048,)
    assert violations(validate_encode, encode()) == [("items", "no items; send 1 to 8")]


def test_mask_counts_as_one_token_toward_the_limit():
    assert validate_predict(predict("<mask>" * 2048)).sequences[0] == "<mask>" * 2048
    found = violations(validate_predict, predict("<mask>" * 2049))
    assert found == [("items[0].sequence", "2,049 tokens; the limit is 2,048")]


def test_predict_needs_a_mask_in_every_item():
    found = violations(validate_predict, predict("MK<mask>", "MKV"))
    assert found == [("items[1].sequence", "no <mask>; Predict needs at least one per item")]
    valid = validate_predict(predict("A<mask>C<mask>", dtype=pb.DTYPE_FLOAT16))
    assert valid.task == qpb.TASK_PREDICT
    assert valid.dtype == pb.DTYPE_FLOAT16


def test_a_long_run_of_bad_characters_is_summarised():
    found = violations(validate_encode, encode("M" + "j" * 50))
    assert len(found) == 11
    assert found[-1] == ("items[0].sequence", "40 more characters not accepted")
    assert "position 11" in found[9][1]


def test_error_message_names_fields():
    with pytest.raises(InvalidRequest, match=r"items\[0\].sequence: character '1' at position 1"):
        validate_encode(encode("1"))


def test_residues_are_accepted_in_either_case_and_sent_on_uppercased():
    valid = validate_encode(encode("mktayiak", "MkTa-xbuzo"))
    assert valid.sequences == ("MKTAYIAK", "MKTA-XBUZO")
    assert validate_predict(predict("mk<mask>ay<mask>")).sequences == ("MK<mask>AY<mask>",)


def test_score_and_the_http_door_take_lowercase_residues_too():
    valid = validate_score(pb.ScoreRequest(wild_type="mktay", variants=["K2G", "T3A"]))
    assert valid.wild_type == "MKTAY"
    assert valid.mutated_sequence(valid.variants[0]) == "MGTAY"
    parsed = parse_request("predict", {"items": [{"sequence": "mk<mask>ay"}]})
    assert parsed.valid.sequences == ("MK<mask>AY",)


def test_a_lowercase_character_outside_the_alphabet_is_quoted_as_written():
    found = violations(validate_encode, encode("mkjay"))
    assert found == [
        (
            "items[0].sequence",
            "character 'j' at position 3 is not accepted "
            "(accepted: ACDEFGHIKLMNPQRSTVWY, XBUZO, '-')",
        )
    ]


def test_clip_keeps_short_text_and_cuts_long_text_to_a_prefix_and_its_length():
    assert clip("") == ""
    assert clip("x" * MAX_ECHOED_CHARACTERS) == "x" * MAX_ECHOED_CHARACTERS
    long = "ab" * 500_000
    assert clip(long) == long[:MAX_ECHOED_CHARACTERS] + "…(1,000,000 characters)"
    assert len(clip(long)) < 2 * MAX_ECHOED_CHARACTERS


def test_past_the_bound_violations_are_counted_not_described():
    described = []

    def describe(index: int) -> FieldViolation:
        described.append(index)
        return FieldViolation(f"params.include[{index}]", "unknown")

    found = Violations()
    found.add("items", "too many")
    found.add_each(((i,) for i in range(500_000)), describe)
    assert len(described) == MAX_REPORTED_VIOLATIONS - 1
    assert (len(found.listed), found.left_out, found.total) == (100, 500_001 - 100, 500_001)
    *listed, last = found
    assert listed == found.listed
    assert (last.field, last.description) == ("request", "and 499,901 more violations, not listed")
    assert left_out_count(last.field, last.description) == 499_901
    assert left_out_count("items", "too many") == 0


def test_an_invalid_request_lists_each_fields_first_violation_and_counts_the_rest():
    request = encode(*["MK" + "!" * 11] * 10, include=[0] * 1_000)
    with pytest.raises(InvalidRequest) as raised:
        validate_encode(request)
    error = raised.value
    total = 1 + 10 * 11 + 1_000  # 10 items, 11 bad characters each, 1,000 unknown outputs
    assert error.found.total == total
    assert len(error.violations) == MAX_REPORTED_VIOLATIONS + 1
    assert error.violations[0] == FieldViolation("items", "10 items; the limit is 8")
    # Each broken field's first violation is listed before any field's second.
    fields = [v.field for v in error.violations[:-1]]
    assert fields == ["items", *(f"items[{i}].sequence" for i in range(10))] + [
        f"params.include[{i}]" for i in range(89)
    ]
    assert error.violations[-1] == FieldViolation(
        "request", f"and {total - MAX_REPORTED_VIOLATIONS:,} more violations, not listed"
    )
    assert str(error).endswith(f"(and {total - 5:,} more)")
