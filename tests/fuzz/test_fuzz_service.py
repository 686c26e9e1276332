"""Fuzzing the live service: >10,000 generated requests over real gRPC, Redis and a worker.

A seeded generator builds valid and invalid Encode/Predict requests of every kind,
random and mutated bytes, messages with unknown fields, truncated messages and a
few bodies over the 256 KiB receive limit. Each request's expected outcome comes
from its bytes alone: decoded here with protobuf, then judged by `fuzz.spec` (an
independent reading of the rules). The requests go out concurrently over one
channel; every answer is checked, then the service must still be healthy, and
Redis must have queued exactly the items of the valid requests.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import random
import time

import grpc
import pytest
import redis
from fuzz import spec
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from queue_helpers import last_generated_ids, pending_count, queue_length

from esm2_service import queue
from esm2_service.client import Esm2Client
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.worker.checkpoint import TINY_SHAPE

SEED = 20_261_125
TOTAL_REQUESTS = 10_400
THREADS = 12
CALL_TIMEOUT_S = 60.0
# A server may summarise a very long list of broken fields (so that its error still
# fits gRPC's metadata limits); up to this many, every broken field must be named.
ALL_FIELDS_NAMED_UP_TO = 20
FORBIDDEN_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}
EMBED_DIM = TINY_SHAPE["embed_dim"]
HEADS = TINY_SHAPE["attention_heads"]
VOCAB_SIZE = 33
LAYERED = {pb.INCLUDE_MEAN, pb.INCLUDE_PER_TOKEN, pb.INCLUDE_BOS}
ELEMENT_SIZE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2}

ACCEPTED = sorted(spec.ACCEPTED_ANY_CASE)
BAD_TOKENS = [
    *"jJ", "ı", "ſ", "\u212a", *"0123456789", " ", "\t", "\n", "\r", ".", "*", "_", "<", ">",
    "<cls>", "<eos>", "<pad>", "<unk>", "<null_1>", "<MASK>", "<mask", "mask>", "\x00", "\x7f",
    "\u00a0", "\u200b", "\u0301", "é", "Ａ", "ß", "😀", "\U0010ffff", "\ufeff", "\u2028",
]  # fmt: skip


# --- generation -------------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


def unknown_field(rng: random.Random, first_unknown: int) -> bytes:
    """One field the message does not define, of any wire type (groups included)."""
    number = rng.choice(
        [rng.randint(first_unknown, 15), rng.randint(16, 2047), rng.randint(2048, 2**29 - 1)]
    )
    wire_type = rng.choice([0, 1, 2, 3, 5])
    if wire_type == 0:
        return tag(number, 0) + varint(rng.getrandbits(rng.choice([1, 7, 32, 64])))
    if wire_type == 1:
        return tag(number, 1) + rng.randbytes(8)
    if wire_type == 5:
        return tag(number, 5) + rng.randbytes(4)
    if wire_type == 2:
        return length_delimited(number, rng.randbytes(rng.randint(0, 40)))
    inner = tag(rng.randint(1, 100), 0) + varint(rng.getrandbits(20))
    return tag(number, 3) + inner + tag(number, 4)


def residues(rng: random.Random, low: int = 1, high: int = 30) -> str:
    return "".join(rng.choices(ACCEPTED, k=rng.randint(low, high)))


def masked(rng: random.Random, low: int = 1, high: int = 30) -> str:
    toks = list(residues(rng, low, high))
    for _ in range(rng.randint(1, 3)):
        toks.insert(rng.randint(0, len(toks)), spec.MASK)
    return "".join(toks)


def bad_token(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return rng.choice(BAD_TOKENS)
    while True:  # any code point but a surrogate (protobuf strings are UTF-8)
        character = chr(rng.randint(0, 0x10FFFF))
        if not 0xD800 <= ord(character) <= 0xDFFF and character not in spec.ACCEPTED_ANY_CASE:
            return character


def with_bad_characters(rng: random.Random, sequence: str, count: int) -> str:
    toks = spec.tokens(sequence)
    for _ in range(count):
        toks.insert(rng.randint(0, len(toks)), bad_token(rng))
    return "".join(toks)


def valid_encode_params(rng: random.Random) -> pb.EncodeParams:
    return pb.EncodeParams(
        repr_layers=[rng.randint(-7, 6) for _ in range(rng.choice([0, 0, 1, 2, 3]))],
        include=[rng.randint(1, 6) for _ in range(rng.choice([0, 0, 1, 2, 3]))],
        dtype=rng.randint(0, 3),
    )


def valid_request(rng: random.Random, method: str, max_items: int = 4):
    count = rng.randint(1, max_items) if rng.random() < 0.9 else rng.randint(1, spec.MAX_ITEMS)
    if method == "Encode":
        items = [pb.Item(sequence=residues(rng)) for _ in range(count)]
        return pb.EncodeRequest(items=items, params=valid_encode_params(rng))
    items = [pb.Item(sequence=masked(rng)) for _ in range(count)]
    return pb.PredictRequest(items=items, params=pb.PredictParams(dtype=rng.randint(0, 3)))


def out_of_range_int(rng: random.Random, valid: range) -> int:
    return rng.choice(
        [valid.start - 1, valid.stop, valid.stop + 1, rng.randint(-(2**31), valid.start - 1)]
        + [rng.randint(valid.stop, 2**31 - 1)]
    )


def some_item(rng: random.Random, method: str, request) -> pb.Item:
    if not request.items:
        request.items.add(sequence=masked(rng) if method == "Predict" else residues(rng))
    return request.items[rng.randrange(len(request.items))]


def too_long(rng: random.Random, method: str) -> str:
    unit = rng.choice(["A", "MKV", spec.MASK + "A"] if method == "Predict" else ["A", "MKV"])
    count = rng.randint(spec.MAX_TOKENS + 1, spec.MAX_TOKENS + 50)
    toks = spec.tokens(unit * count)[:count]
    if method == "Predict":
        toks[0] = spec.MASK
    return "".join(toks)


def add_items(rng: random.Random, request) -> None:
    while len(request.items) <= spec.MAX_ITEMS + rng.randint(0, 3):
        request.items.add(sequence=request.items[-1].sequence if request.items else "M")


def add_bad_layer(rng: random.Random, layers) -> None:
    layers.insert(rng.randint(0, len(layers)), out_of_range_int(rng, spec.LAYER_RANGE))


def insert_mask(rng: random.Random, sequence: str) -> str:
    toks = spec.tokens(sequence)
    toks.insert(rng.randint(0, len(toks)), spec.MASK)
    return "".join(toks)


def set_sequence(make):
    """A breaker that replaces one item's sequence with `make(rng, method, sequence)`."""

    def breaker(rng: random.Random, method: str, request) -> None:
        item = some_item(rng, method, request)
        item.sequence = make(rng, method, item.sequence)

    return breaker


# Each way to break one rule of a request, in place.
BREAKERS = {
    "bad_character": set_sequence(lambda r, m, s: with_bad_characters(r, s, r.randint(1, 3))),
    "many_bad_characters": set_sequence(
        lambda r, m, s: with_bad_characters(r, s, r.randint(11, 40))
    ),
    "empty_sequence": set_sequence(lambda r, m, s: ""),
    "too_long": set_sequence(lambda r, m, s: too_long(r, m)),
    "too_many_items": lambda r, m, request: add_items(r, request),
    "no_items": lambda r, m, request: request.ClearField("items"),
    "bad_dtype": lambda r, m, request: setattr(
        request.params, "dtype", out_of_range_int(r, range(0, 4))
    ),
    "bad_layer": lambda r, m, request: add_bad_layer(r, request.params.repr_layers),
    "bad_include": lambda r, m, request: request.params.include.append(
        r.choice([0, out_of_range_int(r, range(1, 7))])
    ),
    "encode_mask": set_sequence(lambda r, m, s: insert_mask(r, s)),
    "no_mask": set_sequence(lambda r, m, s: s.replace(spec.MASK, "") or "M"),
}
ENCODE_ONLY = {"bad_layer", "bad_include", "encode_mask"}
PREDICT_ONLY = {"no_mask"}


def break_request(rng: random.Random, method: str, request) -> str:
    """Breaks one rule of a request in place; returns which."""
    skip = PREDICT_ONLY if method == "Encode" else ENCODE_ONLY
    kind = rng.choice([name for name in BREAKERS if name not in skip])
    BREAKERS[kind](rng, method, request)
    return kind


def invalid_request(rng: random.Random, method: str):
    request = valid_request(rng, method)
    kinds = [break_request(rng, method, request) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    return ("invalid:" + kinds[0]) if len(kinds) == 1 else "invalid:several", request


def many_violations(rng: random.Random, method: str):
    """Requests whose error names a great many problems (a long BadRequest)."""
    kind = rng.choice(["8_j_items", "12_bad_items", "bad_layers", "bad_includes"])
    if method == "Predict" and kind in ("bad_layers", "bad_includes"):
        kind = "8_j_items"
    if kind == "8_j_items":  # J is no residue, in either case
        items = [pb.Item(sequence="jJ" * rng.randint(6, 15)) for _ in range(8)]
    elif kind == "12_bad_items":
        items = [pb.Item(sequence=with_bad_characters(rng, "M", 12)) for _ in range(12)]
    else:
        items = [pb.Item(sequence="MKV")]
    if method == "Predict":
        return f"many_violations:{kind}", pb.PredictRequest(items=items)
    params = pb.EncodeParams()
    if kind == "bad_layers":
        params.repr_layers.extend(rng.randint(7, 2**31 - 1) for _ in range(rng.randint(50, 400)))
    elif kind == "bad_includes":
        params.include.extend(rng.randint(7, 2**31 - 1) for _ in range(rng.randint(50, 400)))
    return f"many_violations:{kind}", pb.EncodeRequest(items=items, params=params)


def with_unknown_fields(rng: random.Random, method: str, request) -> bytes:
    """The request's wire bytes with unknown fields at the top, in items and in params,
    its fields in a shuffled (still valid) order."""
    fields = []
    for item in request.items:
        payload = item.SerializeToString()
        if rng.random() < 0.5:
            payload += unknown_field(rng, first_unknown=2)
        fields.append(length_delimited(1, payload))
    params = request.params.SerializeToString()
    if rng.random() < 0.5:
        params += unknown_field(rng, first_unknown=4 if method == "Encode" else 2)
    if params or rng.random() < 0.5:
        fields.append(length_delimited(2, params))
    fields += [unknown_field(rng, first_unknown=3) for _ in range(rng.randint(1, 3))]
    rng.shuffle(fields)  # items keep their order only among themselves
    return b"".join(fields)


def mutate(rng: random.Random, body: bytes) -> bytes:
    data = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.4 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif choice < 0.7:
            data.insert(rng.randint(0, len(data)), rng.randrange(256))
        elif data:
            del data[rng.randrange(len(data))]
    return bytes(data)


def oversized_bodies(rng: random.Random) -> list[tuple[str, str, bytes]]:
    """Bodies exactly at and just over the 256 KiB receive limit, and much larger ones."""
    limit = spec.MAX_REQUEST_BYTES

    def padded(sequence: str, size: int) -> bytes:
        """One item, then an unknown length-delimited field that fills the body to `size`."""
        head = length_delimited(1, pb.Item(sequence=sequence).SerializeToString())
        for varint_size in range(1, 6):
            pad = size - len(head) - len(tag(1000, 2)) - varint_size
            body = head + length_delimited(1000, b"\x00" * pad)
            if len(body) == size:
                return body
        raise AssertionError(size)

    return [
        ("boundary:at_limit_valid", "Encode", padded("MKV", limit)),
        ("boundary:at_limit_invalid", "Predict", padded("MKV", limit)),
        ("oversized:limit_plus_1", "Encode", padded("MKV", limit + 1)),
        ("oversized:limit_plus_1", "Predict", padded("M<mask>", limit + 1)),
        ("oversized:limit_plus_1", "GetStatus", padded("", limit + 1)),
        ("oversized:random_1MiB", "Encode", rng.randbytes(1 << 20)),
        ("oversized:random_300KiB", "Predict", rng.randbytes(300 * 1024)),
        ("oversized:long_sequence", "Encode", encode_bytes("A" * (limit + 10))),
    ]


def from_valid(rng: random.Random, method: str) -> tuple[str, str, bytes]:
    return "valid", method, valid_request(rng, method).SerializeToString()


def from_invalid(rng: random.Random, method: str) -> tuple[str, str, bytes]:
    kind, request = invalid_request(rng, method)
    return kind, method, request.SerializeToString()


def from_many_violations(rng: random.Random, method: str) -> tuple[str, str, bytes]:
    kind, request = many_violations(rng, method)
    return kind, method, request.SerializeToString()


def from_random_bytes(rng: random.Random, method: str) -> tuple[str, str, bytes]:
    method = rng.choice(["Encode", "Predict", "GetStatus"])
    return "random_bytes", method, rng.randbytes(rng.choice([0, 1, 2, 5, 20, 100, 300]))


def any_request(rng: random.Random, method: str):
    return valid_request(rng, method) if rng.random() < 0.5 else invalid_request(rng, method)[1]


def from_mutated(rng: random.Random, method: str) -> tuple[str, str, bytes]:
    return "mutated", method, mutate(rng, any_request(rng, method).SerializeToString())


def from_unknown_fields(rng: random.Random, method: str) -> tuple[str, str, bytes]:
    return "unknown_fields", method, with_unknown_fields(rng, method, any_request(rng, method))


def from_truncated(rng: random.Random, method: str) -> tuple[str, str, bytes]:
    body = valid_request(rng, method).SerializeToString()
    return "truncated", method, body[: rng.randrange(len(body))]


def from_status(rng: random.Random, method: str) -> tuple[str, str, bytes]:
    body = b"".join(unknown_field(rng, 1) for _ in range(rng.randint(0, 3)))
    return "status", "GetStatus", body


# Each source's share of the generated requests.
SOURCES = {
    from_valid: 4,
    from_invalid: 48,
    from_many_violations: 1,
    from_random_bytes: 16,
    from_mutated: 12,
    from_unknown_fields: 10,
    from_truncated: 8,
    from_status: 1,
}


def generate(rng: random.Random, total: int) -> list[tuple[str, str, bytes]]:
    """(kind, method, body) for `total` requests, in a deterministic order."""
    longest = "ACDEFGHIKL" * 204 + "MNPQRSTV"  # 2,048 tokens
    cases = [
        *oversized_bodies(rng),
        ("valid:2048_tokens", "Encode", encode_bytes(longest)),
        ("valid:2048_tokens", "Predict", predict_bytes(spec.MASK + longest[1:])),
        ("invalid:2049_tokens", "Encode", encode_bytes(longest + "A")),
        ("invalid:2049_tokens", "Predict", predict_bytes(spec.MASK + longest)),
        *[("deep_groups", "Encode", nested_groups(depth)) for depth in (99, 100, 101, 5000)],
        ("many_violations:20000_items", "Encode", encode_bytes(*[""] * 20_000)),
        ("many_violations:60000_layers", "Encode", pb.EncodeRequest(
            items=[pb.Item(sequence="M")], params=pb.EncodeParams(repr_layers=[100] * 60_000)
        ).SerializeToString()),
    ]  # fmt: skip
    sources, shares = list(SOURCES), list(SOURCES.values())
    while len(cases) < total:
        source = rng.choices(sources, shares)[0]
        cases.append(source(rng, rng.choice(["Encode", "Predict"])))
    return cases


def nested_groups(depth: int) -> bytes:
    """An unknown group field (number 3) nested `depth` deep: protobuf refuses past 100."""
    return tag(3, 3) * depth + tag(3, 4) * depth


def encode_bytes(*sequences: str) -> bytes:
    return pb.EncodeRequest(items=[pb.Item(sequence=s) for s in sequences]).SerializeToString()


def predict_bytes(*sequences: str) -> bytes:
    return pb.PredictRequest(items=[pb.Item(sequence=s) for s in sequences]).SerializeToString()


# --- expectations -----------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    kind: str
    method: str
    body: bytes
    code: grpc.StatusCode  # the status the rules call for
    request: object = None  # the decoded request, if the body decodes
    want: spec.Expected | None = None


def expect(kind: str, method: str, body: bytes) -> Case:
    if len(body) > spec.MAX_REQUEST_BYTES:
        return Case(kind, method, body, grpc.StatusCode.RESOURCE_EXHAUSTED)
    try:
        request = spec.REQUEST_TYPES[method].FromString(body)
    except Exception:  # whatever protobuf refuses, the service must report as "request"
        return Case(kind, method, body, grpc.StatusCode.INVALID_ARGUMENT, want=undecodable())
    if method == "GetStatus":
        return Case(kind, method, body, grpc.StatusCode.OK, request)
    want = spec.expected(method, request)
    code = grpc.StatusCode.OK if want.valid else grpc.StatusCode.INVALID_ARGUMENT
    return Case(kind, method, body, code, request, want)


def undecodable() -> spec.Expected:
    return spec.Expected(fields={"request"})


# --- sending and checking ---------------------------------------------------------------


@dataclasses.dataclass
class Answer:
    code: grpc.StatusCode
    messages: list[bytes] = dataclasses.field(default_factory=list)
    details: str = ""
    violations: list[tuple[str, str]] | None = None  # None: no BadRequest came with it


def send(channel: grpc.Channel, case: Case) -> Answer:
    path = f"/esm2.v1.Esm2Service/{case.method}"
    try:
        if case.method == "GetStatus":
            call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            return Answer(grpc.StatusCode.OK, [call(case.body, timeout=CALL_TIMEOUT_S)])
        call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        return Answer(grpc.StatusCode.OK, list(call(case.body, timeout=CALL_TIMEOUT_S)))
    except grpc.RpcError as error:
        return Answer(error.code(), details=error.details() or "", violations=bad_request(error))


def bad_request(error: grpc.RpcError) -> list[tuple[str, str]] | None:
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # its code differs from the call's
        return None
    for detail in status.details if status else ():
        found = error_details_pb2.BadRequest()
        if detail.Unpack(found):
            return [(v.field, v.description) for v in found.field_violations]
    return None


def problems(case: Case, answer: Answer) -> list[str]:
    """What is wrong with the answer to one case (empty when it is right)."""
    if answer.code != case.code:
        return [f"{answer.code.name} instead of {case.code.name}: {answer.details[:200]}"]
    if answer.code == grpc.StatusCode.INVALID_ARGUMENT:
        return violation_problems(case, answer)
    if answer.code == grpc.StatusCode.OK and case.method == "GetStatus":
        status = pb.GetStatusResponse.FromString(answer.messages[0])
        return [] if status.workers else ["GetStatus lists no worker"]
    if answer.code == grpc.StatusCode.OK:
        return stream_problems(case.method, case.request, answer.messages)
    return []


def violation_problems(case: Case, answer: Answer) -> list[str]:
    if not answer.violations:
        return [f"INVALID_ARGUMENT without a BadRequest violation: {answer.details[:200]}"]
    *listed, last = answer.violations
    if not spec.is_left_out_count(*last):
        listed.append(last)
    named = {name for name, _ in listed}
    out = [
        f"illegal field {name!r}"
        for name in sorted(named)
        if not spec.field_is_legal(name, case.method, case.request)
    ]
    if not named <= case.want.fields:
        out.append(f"names fields that are fine: {sorted(named - case.want.fields)}")
    if len(case.want.fields) <= ALL_FIELDS_NAMED_UP_TO and named != case.want.fields:
        out.append(f"misses broken fields: {sorted(case.want.fields - named)}")
    for name, (position, token) in case.want.first_bad.items():
        shown = (repr(token), token) if token == spec.MASK else (repr(token),)
        if name in named and not any(
            field == name and f"position {position}" in text and any(s in text for s in shown)
            for field, text in listed
        ):
            out.append(f"{name}: no violation names position {position} and {token!r}")
    return out


def stream_problems(method: str, request, messages: list[bytes]) -> list[str]:
    """One `complete` per item, after all its tensors, which have the right kinds,
    layers, shapes, dtype and bytes."""
    count = len(request.items)
    done: set[int] = set()
    pieces = collections.defaultdict(list)
    out = []
    for raw in messages:
        message = pb.EncodeResponse.FromString(raw)
        index = message.sequence_index
        if not 0 <= index < count or index in done:
            out.append(f"message for item {index} of {count} (done: {sorted(done)})")
        elif message.HasField("complete"):
            done.add(index)
            out += complete_problems(method, request.items[index].sequence, message.complete)
        else:
            pieces[index, message.chunk.kind, message.chunk.layer].append(message.chunk)
    if done != set(range(count)):
        out.append(f"completed items {sorted(done)} of {count}")
    for index, item in enumerate(request.items):
        out += tensor_problems(method, request, item.sequence, index, pieces)
    return out


def complete_problems(method: str, sequence: str, complete: pb.ItemComplete) -> list[str]:
    out = []
    if len(complete.vocab_tokens) != VOCAB_SIZE:
        out.append(f"{len(complete.vocab_tokens)} vocab tokens")
    uppercase = spec.uppercased(sequence)
    if method == "Predict" and list(complete.sequence_tokens) != spec.tokens(uppercase):
        out.append(f"sequence_tokens {list(complete.sequence_tokens)[:8]}... for {sequence!r}")
    return out


def expected_tensors(method: str, request, sequence: str) -> dict[tuple[int, int], tuple]:
    """(kind, layer) -> shape of every tensor an item's results must hold."""
    toks = spec.tokens(sequence)
    length = len(toks)
    if method == "Predict":
        return {(pb.INCLUDE_LOGITS, 0): (toks.count(spec.MASK), VOCAB_SIZE)}
    include = set(request.params.include) or {pb.INCLUDE_MEAN}
    shapes = {
        pb.INCLUDE_MEAN: (EMBED_DIM,),
        pb.INCLUDE_PER_TOKEN: (length, EMBED_DIM),
        pb.INCLUDE_BOS: (EMBED_DIM,),
    }
    out = {
        (kind, layer): shapes[kind]
        for kind in include & LAYERED
        for layer in spec.resolved_layers(request.params.repr_layers)
    }
    if pb.INCLUDE_CONTACTS in include:
        out[pb.INCLUDE_CONTACTS, 0] = (length, length)
    if pb.INCLUDE_LOGITS in include:
        out[pb.INCLUDE_LOGITS, 0] = (length, VOCAB_SIZE)
    if pb.INCLUDE_ATTENTIONS in include:
        out[pb.INCLUDE_ATTENTIONS, 6] = (HEADS, length, length)
    return out


def tensor_problems(method, request, sequence, index, pieces) -> list[str]:
    want = expected_tensors(method, request, sequence)
    got = {(kind, layer) for i, kind, layer in pieces if i == index}
    if got != set(want):
        return [f"item {index}: tensors {sorted(got)}, expected {sorted(want)}"]
    dtype = request.params.dtype or pb.DTYPE_FLOAT32
    out = []
    for (kind, layer), shape in want.items():
        chunks = sorted(pieces[index, kind, layer], key=lambda chunk: chunk.offset)
        total = math.prod(shape) * ELEMENT_SIZE[dtype]
        offset = 0
        for chunk in chunks:
            if tuple(chunk.tensor.shape) != shape or chunk.tensor.dtype != dtype:
                out.append(
                    f"item {index} {kind}/{layer}: shape {list(chunk.tensor.shape)}, "
                    f"dtype {chunk.tensor.dtype}; expected {list(shape)}, {dtype}"
                )
            if chunk.offset != offset:
                out.append(f"item {index} {kind}/{layer}: chunk at {chunk.offset}, not {offset}")
            offset = chunk.offset + len(chunk.tensor.data)
        if offset != total:
            out.append(f"item {index} {kind}/{layer}: {offset} bytes of {total}")
    return out


# --- Redis: counting what reached the queue ---------------------------------------------


class QueueAdds:
    """Counts XADDs on the queue lanes through Redis keyspace notifications.

    Redis 6.2 has no `entries-added` in XINFO STREAM, workers delete entries once done,
    and ids are timestamps, so neither the stream's length nor its ids count what was
    added. Keyspace notifications do: Redis publishes one `xadd` event per XADD on the
    key, in order, to every subscriber. (Nothing else adds to the queue while the fuzz
    run is in flight: workers re-add entries only when they stop.)
    """

    SENTINEL = "esm2-fuzz:sentinel"

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)
        self.saved = self.client.config_get("notify-keyspace-events")["notify-keyspace-events"]
        self.client.config_set("notify-keyspace-events", self.saved + "Kt")
        self.pubsub = self.client.pubsub()
        lanes = [f"__keyspace@0__:{lane}" for lane in queue.QUEUE_LANES]
        self.pubsub.subscribe(*lanes, self.SENTINEL)
        for _ in range(len(lanes) + 1):  # the subscribe confirmations
            assert self.pubsub.get_message(timeout=5)["type"] == "subscribe"

    def count(self) -> collections.Counter:
        """Every event on the queue lanes since subscribing."""
        self.client.publish(self.SENTINEL, "end")
        events: collections.Counter = collections.Counter()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=1)
            if message is None:
                continue
            if message["channel"] == self.SENTINEL.encode():
                return events
            events[message["data"].decode()] += 1
        raise TimeoutError("the sentinel never came back")

    def close(self) -> None:
        self.pubsub.close()
        self.client.config_set("notify-keyspace-events", self.saved)
        self.client.close()


def wait_queue_drained(client: redis.Redis, timeout_s: float = 15.0) -> tuple[int, int]:
    """(length, pending) of the queue once both are 0, or when time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        length, pending = queue_length(client), pending_count(client)
        if (length == 0 and pending == 0) or time.monotonic() > deadline:
            return length, pending
        time.sleep(0.05)


# --- the tests --------------------------------------------------------------------------


def test_generator_is_deterministic_and_covers_every_kind():
    first = generate(random.Random(SEED), 3000)
    assert first == generate(random.Random(SEED), 3000)
    kinds = {kind.split(":")[0] for kind, _, _ in first}
    assert kinds >= {"valid", "invalid", "many_violations", "random_bytes", "mutated"}
    assert kinds >= {"unknown_fields", "truncated", "status", "oversized", "boundary"}
    assert "deep_groups" in kinds
    invalid = {kind for kind, _, _ in first if kind.startswith("invalid:")}
    assert invalid >= {f"invalid:{name}" for name in [*BREAKERS, "several"]}
    sizes = {kind: len(body) for kind, _, body in first if kind.startswith("boundary")}
    assert set(sizes.values()) == {spec.MAX_REQUEST_BYTES}


def test_the_checker_catches_wrong_answers():
    """The oracle is not vacuous: it flags each kind of wrong answer."""
    invalid = expect("t", "Encode", encode_bytes("MKjV"))
    assert invalid.want.first_bad == {"items[0].sequence": (3, "j")}
    right = [("items[0].sequence", "character 'j' at position 3 is not accepted")]
    assert not problems(invalid, Answer(grpc.StatusCode.INVALID_ARGUMENT, violations=right))
    for wrong in (
        Answer(grpc.StatusCode.OK),
        Answer(grpc.StatusCode.INVALID_ARGUMENT, violations=None),
        Answer(grpc.StatusCode.INVALID_ARGUMENT, violations=[("items[1].sequence", "a")]),
        Answer(grpc.StatusCode.INVALID_ARGUMENT, violations=[("items", "no items")]),
        Answer(
            grpc.StatusCode.INVALID_ARGUMENT,
            violations=[("items[0].sequence", "character 'j' at position 4")],
        ),
    ):
        assert problems(invalid, wrong), wrong
    valid = expect("t", "Predict", predict_bytes("M<mask>K"))
    logits = pb.TensorChunk(
        kind=pb.INCLUDE_LOGITS,
        tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, VOCAB_SIZE], data=bytes(4 * 33)),
    )
    done = pb.ItemComplete(vocab_tokens=["x"] * VOCAB_SIZE, sequence_tokens=["M", "<mask>", "K"])
    chunk = pb.EncodeResponse(chunk=logits).SerializeToString()
    complete = pb.EncodeResponse(complete=done).SerializeToString()
    assert not problems(valid, Answer(grpc.StatusCode.OK, [chunk, complete]))
    assert problems(valid, Answer(grpc.StatusCode.OK, [chunk]))  # no complete
    assert problems(valid, Answer(grpc.StatusCode.OK, [complete]))  # no logits
    assert problems(valid, Answer(grpc.StatusCode.OK, [complete, chunk]))  # after complete
    short = pb.EncodeResponse(chunk=logits)
    short.chunk.tensor.data = bytes(4)
    assert problems(valid, Answer(grpc.StatusCode.OK, [short.SerializeToString(), complete]))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fuzz_ten_thousand_requests_against_the_live_service(service, redis_server, capsys):
    cases = [expect(*case) for case in generate(random.Random(SEED), TOTAL_REQUESTS)]
    valid_items = sum(
        len(c.request.items)
        for c in cases
        if c.code == grpc.StatusCode.OK and c.method != "GetStatus"
    )
    client = redis.Redis.from_url(redis_server.url)
    last_ids_before = last_generated_ids(client)
    adds = QueueAdds(redis_server.url)
    try:
        started = time.perf_counter()
        with (
            grpc.insecure_channel(service.target) as channel,
            concurrent.futures.ThreadPoolExecutor(THREADS) as pool,
        ):
            answers = list(pool.map(lambda case: send(channel, case), cases))
        elapsed = time.perf_counter() - started
        length, pending = wait_queue_drained(client)
        events = adds.count()
    finally:
        adds.close()
    last_ids_after = last_generated_ids(client)
    client.close()

    outcomes = collections.Counter(answer.code.name for answer in answers)
    by_kind = collections.Counter(
        (case.kind.split(":")[0], answer.code.name)
        for case, answer in zip(cases, answers, strict=True)
    )
    failures = collections.defaultdict(list)
    for case, answer in zip(cases, answers, strict=True):
        for problem in problems(case, answer):
            failures[case.kind, problem.split(":")[0]].append((case.method, case.body, problem))
    with capsys.disabled():
        print(f"\nfuzz: {len(cases)} requests in {elapsed:.1f} s with {THREADS} threads")
        print(f"fuzz: outcomes {dict(sorted(outcomes.items()))}")
        for (source, code), n in sorted(by_kind.items()):
            print(f"fuzz:   {source:16} {code:20} {n}")
        print(f"fuzz: {valid_items} valid items sent; queue events {dict(events)}")
        for (kind, _), examples in sorted(failures.items()):
            method, body, problem = examples[0]
            print(f"fuzz: FAIL x{len(examples)} {kind} ({method}, {len(body)} B): {problem}")

    forbidden = {
        code: n for code, n in outcomes.items() if grpc.StatusCode[code] in FORBIDDEN_CODES
    }
    assert not forbidden, f"statuses that must never happen: {forbidden}"
    # Nothing invalid reached Redis: exactly the valid requests' items were queued.
    assert events["xadd"] == valid_items
    assert valid_items > 500
    assert last_ids_after != last_ids_before
    assert (length, pending) == (0, 0), "the worker left queue entries behind"
    # The service survived all of it.
    assert service.frontend.poll() is None, "the frontend died"
    assert all(worker.poll() is None for worker in service.workers), "a worker died"
    with grpc.insecure_channel(service.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="esm2.v1.Esm2Service"), timeout=10
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with Esm2Client(service.target, timeout_s=60) as esm2:
        (result,) = esm2.encode(
            ["MKTAYIAKQR"], include=["mean", "per_token", "contacts", "logits"], repr_layers=[0, -1]
        )
    assert sorted(result.embeddings) == [0, 6]
    assert result.embeddings[6].shape == (EMBED_DIM,)
    assert result.per_token[0].shape == (10, EMBED_DIM)
    assert result.contacts.shape == (10, 10)
    assert result.logits.shape == (10, VOCAB_SIZE)
    # Every answer was the one the rules call for (listed above, by kind, when not).
    summary = {f"{kind} / {what}": len(examples) for (kind, what), examples in failures.items()}
    assert not failures, f"wrong answers: {summary}"


TRIES = 20


@pytest.mark.parametrize(
    "method, message",
    [
        pytest.param(
            "Encode",
            pb.EncodeRequest(items=[pb.Item(sequence="mktjjjjjjjjjjjjj")] * 8),
            id="encode-8-items-of-13-js",
        ),
        pytest.param(
            "Predict",
            pb.PredictRequest(items=[pb.Item(sequence="mktjjjjjjjjjjjjj")] * 8),
            id="predict-8-items-of-13-js",
        ),
        pytest.param(
            "Encode",
            pb.EncodeRequest(
                items=[pb.Item(sequence="MKV")], params=pb.EncodeParams(repr_layers=[100] * 300)
            ),
            id="encode-300-bad-repr-layers",
        ),
        pytest.param(
            "Encode",
            pb.EncodeRequest(items=[pb.Item(sequence="x" * 20)] * 12),
            id="encode-12-bad-items",
        ),
    ],
)
def test_long_violation_lists_still_reach_a_default_client_as_invalid_argument(
    service, method, message
):
    """The BadRequest travels in trailing metadata (grpc-status-details-bin), and a gRPC
    client with default settings refuses trailing metadata over 8 KiB at random (soft
    limit) and always over 16 KiB (hard limit), turning the answer into RESOURCE_EXHAUSTED.
    However many problems a request has, a default client must still get INVALID_ARGUMENT
    with its BadRequest. (Between the limits the refusal is random, hence TRIES calls.)"""
    case = expect("many_violations", method, message.SerializeToString())
    assert case.code == grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(service.target) as channel:
        answers = [send(channel, case) for _ in range(TRIES)]
    codes = collections.Counter(answer.code.name for answer in answers)
    assert codes == {"INVALID_ARGUMENT": TRIES}, f"{dict(codes)}: {answers[-1].details}"
    assert all(answer.violations for answer in answers)
