"""Property tests of the pure request validators (no network, no Redis).

Every request the generators can build (arbitrary unicode, 0 to 12 items, any
int32 layer, any enum int) is checked against the rules as `fuzz.spec` reads
them from the issue. Runs are derandomized, so a failure reproduces exactly.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from unittest import mock

import pytest
from fuzz import spec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from esm2_service import validation
from esm2_service.client.params import INCLUDE_NAMES
from esm2_service.esm2.internal.v1 import queue_pb2 as qpb
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.server.handlers import _decoder
from esm2_service.server.http_requests import ACTIONS, parse_request
from esm2_service.validation import (
    MAX_CHARACTER_VIOLATIONS,
    MAX_REPORTED_VIOLATIONS,
    FieldViolation,
    InvalidRequest,
    Undecodable,
    ValidRequest,
    left_out_violation,
    resolve_layers,
    validate_encode,
    validate_predict,
)
from esm2_service.variants import validate_score

PROPERTIES = settings(
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=400,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

INT32 = st.integers(-(2**31), 2**31 - 1)
ACCEPTED_TOKENS = sorted(spec.ACCEPTED_ANY_CASE)
# Characters and tags that look close to accepted ones but are not.
NEAR_MISSES = [
    *"jJ", "ı", "ſ", "\u212a", *"0123456789", " ", "\t", "\n", "\r", ".", "*", "_", "<", ">", "/",
    "<cls>", "<eos>", "<pad>", "<unk>", "<null_1>", "<MASK>", "<mask", "mask>", "< mask>",
    "\x00", "\x7f", "\u00a0", "\u200b", "\u0301", "é", "Å", "Ａ", "Ｍ", "ß", "µ", "😀",
    "\U0010ffff",
]  # fmt: skip

residues = st.text(alphabet=st.sampled_from(ACCEPTED_TOKENS), min_size=1, max_size=60)
mixed_tokens = st.lists(
    st.one_of(
        st.sampled_from(ACCEPTED_TOKENS),
        st.just(spec.MASK),
        st.sampled_from(NEAR_MISSES),
        st.characters(codec="utf-8"),
    ),
    max_size=40,
).map("".join)
long_sequences = st.builds(
    lambda unit, count: unit * count,
    st.sampled_from(["A", "MK", spec.MASK, "A<mask>", "a", "j", "1-"]),
    st.integers(1020, 2060),
)
sequences = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=40), mixed_tokens, residues, long_sequences
)
masked_residues = st.builds(lambda a, b: a + spec.MASK + b, residues, residues)
# Mostly arbitrary items; sometimes only accepted ones, so that the params decide.
items = st.one_of(
    st.lists(sequences, max_size=12),
    st.lists(st.one_of(residues, masked_residues), min_size=1, max_size=spec.MAX_ITEMS),
)
layers = st.lists(st.one_of(st.integers(-9, 8), INT32), max_size=10)
includes = st.lists(st.one_of(st.integers(-1, 8), INT32), max_size=8)
dtypes = st.one_of(st.integers(-1, 5), INT32)


@st.composite
def encode_requests(draw) -> pb.EncodeRequest:
    return pb.EncodeRequest(
        items=[pb.Item(sequence=s) for s in draw(items)],
        params=pb.EncodeParams(
            repr_layers=draw(layers), include=draw(includes), dtype=draw(dtypes)
        ),
    )


@st.composite
def predict_requests(draw) -> pb.PredictRequest:
    return pb.PredictRequest(
        items=[pb.Item(sequence=s) for s in draw(items)],
        params=pb.PredictParams(dtype=draw(dtypes)),
    )


def outcome(method: str, request) -> ValidRequest | InvalidRequest:
    """The validator's answer; anything but ValidRequest or InvalidRequest fails the test."""
    validate = validate_encode if method == "Encode" else validate_predict
    try:
        valid = validate(request)
    except InvalidRequest as error:
        return error
    assert isinstance(valid, ValidRequest)
    return valid


@contextlib.contextmanager
def unbounded():
    """Validation that lists every violation, to compare the bounded lists with."""
    with mock.patch.object(validation, "MAX_REPORTED_VIOLATIONS", sys.maxsize):
        yield


def check_against_rules(method: str, request) -> None:
    with unbounded():
        result = outcome(method, request)
    check_the_bound(lambda: outcome(method, request))
    want = spec.expected(method, request)
    if want.valid:
        assert isinstance(result, ValidRequest), f"valid request refused: {result}"
        assert result.sequences == tuple(spec.uppercased(item.sequence) for item in request.items)
        return
    assert isinstance(result, InvalidRequest), f"invalid request accepted: {want.fields}"
    violations = result.violations
    assert violations, "InvalidRequest without violations"
    for violation in violations:
        assert spec.field_is_legal(violation.field, method, request), violation
        assert violation.description, violation
    # Every broken field is named, and nothing else.
    assert {v.field for v in violations} == want.fields
    check_character_reports(method, request, violations)
    check_bounds(method, request, violations)


def check_character_reports(method: str, request, violations) -> None:
    """The first MAX_CHARACTER_VIOLATIONS bad characters of each sequence are reported
    with their 1-based position and repr; the rest are summarised by their count."""
    allow_mask = method == "Predict"
    for i, item in enumerate(request.items):
        name = f"items[{i}].sequence"
        descriptions = [v.description for v in violations if v.field == name]
        bad = spec.bad_characters(item.sequence, allow_mask)
        positional = [d for d in descriptions if " at position " in d]
        assert len(positional) == min(len(bad), MAX_CHARACTER_VIOLATIONS), descriptions
        for (position, token), description in zip(bad, positional, strict=False):
            assert f"position {position}" in description, (position, token, description)
            shown = (repr(token), token) if token == spec.MASK else (repr(token),)
            assert any(s in description for s in shown), (token, description)
        if len(bad) > MAX_CHARACTER_VIOLATIONS:
            rest = str(len(bad) - MAX_CHARACTER_VIOLATIONS)
            summaries = [d for d in descriptions if d not in positional]
            assert any(d.startswith(rest + " ") for d in summaries), descriptions


def check_bounds(method: str, request, violations) -> None:
    """One violation per bad layer/include/dtype/items; per sequence at most
    MAX_CHARACTER_VIOLATIONS + summary + length + missing <mask>."""
    counts: dict[str, int] = {}
    for violation in violations:
        counts[violation.field] = counts.get(violation.field, 0) + 1
    per_sequence = MAX_CHARACTER_VIOLATIONS + (3 if method == "Predict" else 2)
    for name, count in counts.items():
        limit = per_sequence if name.startswith("items[") else 1
        assert count <= limit, (name, count)
    params = request.params
    extra = len(params.repr_layers) + len(params.include) if method == "Encode" else 0
    assert len(violations) <= 2 + per_sequence * len(request.items) + extra


@PROPERTIES
@given(encode_requests())
def test_encode_validation_follows_the_rules(message):
    check_against_rules("Encode", message)


@PROPERTIES
@given(predict_requests())
def test_predict_validation_follows_the_rules(message):
    check_against_rules("Predict", message)


def reported(check: Callable) -> list[FieldViolation]:
    """The violations of the InvalidRequest `check()` raises or returns; [] for none."""
    try:
        result = check()
    except InvalidRequest as error:
        result = error
    return result.violations if isinstance(result, InvalidRequest) else []


def check_the_bound(check: Callable) -> None:
    """At most MAX_REPORTED_VIOLATIONS are listed, then one violation with the exact count
    of the rest: each broken field's first (of as many fields as fit), then the earliest
    others, in request order."""
    listed = reported(check)
    with unbounded():
        every = reported(check)
    assert len(listed) <= MAX_REPORTED_VIOLATIONS + 1
    event("past the bound" if len(every) > MAX_REPORTED_VIOLATIONS else "within the bound")
    if len(every) <= MAX_REPORTED_VIOLATIONS:
        assert listed == every
    else:
        rest = left_out_violation(len(every) - MAX_REPORTED_VIOLATIONS)
        assert listed == first_of_each_field_then_earliest(every) + [rest]


def first_of_each_field_then_earliest(every: list[FieldViolation]) -> list[FieldViolation]:
    first_of_field: dict[str, int] = {}
    for index, violation in enumerate(every):
        first_of_field.setdefault(violation.field, index)
    firsts = set(first_of_field.values())
    keep = set(sorted(firsts)[:MAX_REPORTED_VIOLATIONS])
    repeats = [i for i in range(len(every)) if i not in firsts]
    keep |= set(repeats[: MAX_REPORTED_VIOLATIONS - len(keep)])
    return [every[i] for i in sorted(keep)]


def few_or_many(element, many: int = 250) -> st.SearchStrategy[list]:
    """A short list of `element`s, or one drawn element repeated up to `many` times: most
    requests built from these break a rule more often than MAX_REPORTED_VIOLATIONS."""
    repeated = st.builds(lambda value, count: [value] * count, element, st.integers(1, many))
    return st.one_of(st.lists(element, max_size=10), repeated)


bad_runs = st.text(st.sampled_from("ab!1 <>"), min_size=1, max_size=30)
many_items = few_or_many(st.one_of(sequences, bad_runs), many=40)
many_layers = few_or_many(st.one_of(st.integers(-9, 8), INT32))
many_includes = few_or_many(st.one_of(st.integers(-1, 8), INT32))
many_variants = few_or_many(st.one_of(st.just("M1A"), bad_runs, st.text(max_size=12)))


@st.composite
def large_requests(draw) -> tuple[Callable, object]:
    method = draw(st.sampled_from(["Encode", "Predict", "Score"]))
    if method == "Score":
        request = pb.ScoreRequest(
            wild_type=draw(st.one_of(residues, bad_runs)),
            variants=draw(many_variants),
            strategies=draw(few_or_many(st.integers(-1, 5))),
        )
        return validate_score, request
    items = [pb.Item(sequence=s) for s in draw(many_items)]
    if method == "Predict":
        return validate_predict, pb.PredictRequest(items=items)
    params = pb.EncodeParams(
        repr_layers=draw(many_layers), include=draw(many_includes), dtype=draw(dtypes)
    )
    return validate_encode, pb.EncodeRequest(items=items, params=params)


@settings(PROPERTIES, max_examples=200)
@given(large_requests())
def test_no_request_gets_more_violations_than_the_bound_plus_the_count(validate_and_request):
    validate, request = validate_and_request
    check_the_bound(lambda: validate(request))


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
extra_keys = st.one_of(
    st.just({}),
    st.dictionaries(st.text(max_size=60), json_scalars, max_size=4),
    st.builds(lambda count: {f"k{i}": i for i in range(count)}, st.integers(1, 250)),
)
json_items = few_or_many(
    st.one_of(
        json_values,
        st.builds(lambda sequence, extra: {**extra, "sequence": sequence}, sequences, extra_keys),
        st.builds(lambda sequence: {"sequence": sequence}, bad_runs),
    ),
    many=40,
)
json_params = st.fixed_dictionaries(
    {},
    optional={
        "repr_layers": few_or_many(st.one_of(st.integers(-9, 8), json_scalars)),
        "include": few_or_many(st.one_of(st.sampled_from([*INCLUDE_NAMES, "x"]), json_scalars)),
    },
)
json_documents = st.builds(
    lambda items, params, extra: {**extra, "items": items, "params": params},
    json_items,
    st.one_of(json_params, json_values),
    st.one_of(st.just({}), extra_keys),
)


@settings(PROPERTIES, max_examples=200)
@given(st.sampled_from(ACTIONS), st.one_of(json_documents, json_values))
def test_no_http_body_gets_more_violations_than_the_bound_plus_the_count(action, document):
    check_the_bound(lambda: parse_request(action, document))


@st.composite
def accepted_sequences(draw, allow_mask: bool) -> str:
    """1..2048 accepted tokens (mostly short); with a <mask> somewhere for Predict.
    Long ones repeat a short drawn unit, which keeps generation fast."""
    pool = ACCEPTED_TOKENS + ([spec.MASK] if allow_mask else [])
    unit = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=40))
    size = draw(st.one_of(st.integers(1, 40), st.integers(2000, spec.MAX_TOKENS), st.just(2048)))
    toks = (unit * (size // len(unit) + 1))[:size]
    if allow_mask and spec.MASK not in toks:
        toks[draw(st.integers(0, size - 1))] = spec.MASK
    return "".join(toks)


@PROPERTIES
@given(st.data(), st.sampled_from(["Encode", "Predict"]), st.integers(1, spec.MAX_ITEMS))
def test_accepted_sequences_pass_and_round_trip_unchanged(data, method, count):
    seqs = [data.draw(accepted_sequences(method == "Predict")) for _ in range(count)]
    if method == "Encode":
        request = pb.EncodeRequest(items=[pb.Item(sequence=s) for s in seqs])
        valid = validate_encode(request)
        assert valid.task == qpb.TASK_ENCODE
    else:
        request = pb.PredictRequest(items=[pb.Item(sequence=s) for s in seqs])
        valid = validate_predict(request)
        assert valid.task == qpb.TASK_PREDICT
    assert valid.sequences == tuple(map(spec.uppercased, seqs))
    assert valid.token_counts == tuple(len(spec.tokens(s)) for s in seqs)
    assert valid.dtype == pb.DTYPE_FLOAT32


def is_refused(character: str) -> bool:
    return character not in spec.ACCEPTED_ANY_CASE


@PROPERTIES
@given(
    st.data(),
    st.sampled_from(["Encode", "Predict"]),
    st.characters(codec="utf-8").filter(is_refused),
)
def test_one_bad_character_is_reported_at_its_1_based_position(data, method, bad):
    allow_mask = method == "Predict"
    pool = ACCEPTED_TOKENS + ([spec.MASK] if allow_mask else [])
    toks = data.draw(st.lists(st.sampled_from(pool), max_size=50))
    if allow_mask:
        toks.append(spec.MASK)  # Predict needs one, so the bad character is the only problem
    at = data.draw(st.integers(0, len(toks)), label="token index")
    p = sum(len(t) for t in toks[:at])  # 0-based character position of the insertion
    sequence = "".join(toks[:at]) + bad + "".join(toks[at:])
    assert sequence[p] == bad
    make = pb.EncodeRequest if method == "Encode" else pb.PredictRequest
    first = "MK<mask>V" if allow_mask else "MKV"
    result = outcome(method, make(items=[pb.Item(sequence=first), pb.Item(sequence=sequence)]))
    assert isinstance(result, InvalidRequest)
    (violation,) = result.violations
    assert violation.field == "items[1].sequence"
    assert f"position {p + 1}" in violation.description, violation
    assert repr(bad) in violation.description, violation


@PROPERTIES
@given(
    st.lists(st.integers(-7, 6), max_size=20),
    st.lists(st.integers(1, 6), max_size=8),
    st.integers(0, 3),
)
def test_valid_params_resolve_sorted_unique_and_in_range(layer_list, include_list, dtype):
    request = pb.EncodeRequest(
        items=[pb.Item(sequence="MKTAYIAK")],
        params=pb.EncodeParams(repr_layers=layer_list, include=include_list, dtype=dtype),
    )
    valid = validate_encode(request)
    want = {layer % 7 for layer in (layer_list or [-1])}
    assert valid.repr_layers == tuple(sorted(want)) == spec.resolved_layers(layer_list)
    assert all(0 <= layer <= 6 for layer in valid.repr_layers)
    assert list(valid.repr_layers) == sorted(set(valid.repr_layers))
    assert valid.include == tuple(sorted(set(include_list or [pb.INCLUDE_MEAN])))
    assert valid.dtype == (dtype or pb.DTYPE_FLOAT32)


@PROPERTIES
@given(st.lists(st.integers(-7, 6), max_size=30))
def test_resolve_layers_is_modulo_seven(layer_list):
    resolved = resolve_layers(layer_list)
    assert resolved == tuple(sorted({layer % 7 for layer in layer_list or [-1]}))
    assert resolved == spec.resolved_layers(layer_list)


@settings(PROPERTIES, max_examples=500)
@given(st.sampled_from(["Encode", "Predict", "GetStatus"]), st.binary(max_size=200))
def test_any_request_bytes_decode_to_a_message_or_an_invalid_request(method, body):
    """The handlers' decoder never raises; what it cannot parse is one `request` violation."""
    decoded = _decoder(spec.REQUEST_TYPES[method])(body)
    if isinstance(decoded, Undecodable):
        for validate in (validate_encode, validate_predict):
            with pytest.raises(InvalidRequest) as raised:
                validate(decoded)
            ((field, description),) = [(v.field, v.description) for v in raised.value.violations]
            assert field == "request"
            name = spec.REQUEST_TYPES[method].DESCRIPTOR.full_name
            assert description.startswith(f"not a valid {name} message")
        return
    assert isinstance(decoded, spec.REQUEST_TYPES[method])
    if method != "GetStatus":
        check_against_rules(method, decoded)


def test_long_runs_of_bad_characters_are_summarised():
    sequence = "j" * (MAX_CHARACTER_VIOLATIONS + 5)
    with pytest.raises(InvalidRequest) as raised:
        validate_encode(pb.EncodeRequest(items=[pb.Item(sequence=sequence)]))
    assert len(raised.value.violations) == MAX_CHARACTER_VIOLATIONS + 1
    assert raised.value.violations[-1].description.startswith("5 ")
    assert "15 tokens" not in str(raised.value)  # 15 characters is within the length limit
