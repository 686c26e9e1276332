"""Property tests of the HTTP door's gzip request bodies (no network).

A body is one or more gzip members, then perhaps cut short or followed by other bytes.
`read_body` either returns what Python's own gzip reads from it (every member) or
refuses it as the client's error, 400 or 413, never another exception (a 500). Runs
are derandomized, so a failure reproduces exactly.
"""

from __future__ import annotations

import gzip
import json
import zlib

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esm2_service.server.errors import PayloadTooLarge
from esm2_service.server.http_requests import read_body
from esm2_service.validation import InvalidRequest

PROPERTIES = settings(
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=400,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LIMIT = 4096

documents = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children)
    ),
    max_leaves=30,
)


@st.composite
def gzip_members(draw) -> tuple[bytes, bytes]:
    """(JSON text, the gzip body of it in 1 to 4 members, some maybe empty)."""
    text = json.dumps(draw(documents)).encode()
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=3)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    level = draw(st.integers(0, 9))
    return text, b"".join(gzip.compress(piece, compresslevel=level) for piece in pieces)


def outcome(body: bytes):
    """The document, or the type of error the door answers with."""
    try:
        return read_body(body, "gzip", LIMIT)
    except (InvalidRequest, PayloadTooLarge) as error:
        return type(error)


def python_reads(body: bytes) -> bytes | None:
    try:
        return gzip.decompress(body)
    except (OSError, EOFError, zlib.error):
        return None


@PROPERTIES
@given(gzip_members())
def test_concatenated_members_read_as_one_body(members):
    text, body = members
    expected = orjson.loads(text) if len(text) <= LIMIT else PayloadTooLarge
    assert outcome(body) == expected


@PROPERTIES
@given(gzip_members(), st.data())
def test_a_cut_or_extended_body_is_read_as_python_reads_it_or_refused(members, data):
    _, body = members
    kind = data.draw(st.sampled_from(["cut", "garbage", "zeros", "part of a member"]))
    if kind == "cut":
        mangled = body[: data.draw(st.integers(0, len(body) - 1))]
    elif kind == "garbage":
        mangled = body + data.draw(st.binary(min_size=1, max_size=40))
    elif kind == "zeros":
        mangled = body + b"\0" * data.draw(st.integers(1, 16))
    else:
        member = gzip.compress(data.draw(st.binary(max_size=20)))
        mangled = body + member[: data.draw(st.integers(1, len(member) - 1))]
    result = outcome(mangled)
    if result not in (InvalidRequest, PayloadTooLarge):
        # Accepted only when it is, after all, whole members (a cut at a member's end).
        assert result == orjson.loads(python_reads(mangled))


@pytest.mark.parametrize(
    "trailer", [b"garbage", b"\0" * 8, b"\x1f\x8b", gzip.compress(b"[]")[:-1]], ids=repr
)
def test_a_member_followed_by_anything_but_members_is_refused(trailer):
    error = pytest.raises(InvalidRequest, read_body, gzip.compress(b"{}") + trailer, "gzip", LIMIT)
    assert [v.field for v in error.value.violations] == ["body"]


def test_members_inflating_past_the_limit_together_are_too_large():
    half = gzip.compress(b" " * (LIMIT // 2 + 1))
    assert read_body(gzip.compress(b"{}") + half, "gzip", LIMIT) == {}
    with pytest.raises(PayloadTooLarge):
        read_body(gzip.compress(b"{}") + half + half, "gzip", LIMIT)
