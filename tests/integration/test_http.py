"""The HTTP/JSON door against real processes: BioLM's own examples and SDK with only
the base URL changed, every output against fair-esm, gzip, tokens, each error
status, the OpenAPI document, a fuzz run of malformed bodies, and the door's bounds
on slow, departing and ambiguous clients (raw sockets)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import numpy as np
import pytest
import redis
import requests
from conftest import ServiceProcesses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from queue_helpers import ConnectionCounter, sequence_number
from support import assert_close, fair_esm_outputs, read_fasta_records

from esm2_service import queue
from esm2_service.alphabet import VOCAB_TOKENS, split_tokens
from esm2_service.server.embedded_redis import free_port
from esm2_service.server.http_results import AMINO_ACID_COLUMNS
from esm2_service.validation import MAX_REPORTED_VIOLATIONS, InvalidRequest, validate_encode

TOKEN = "http-door-token-0123"
AUTH = {"Authorization": f"Token {TOKEN}"}
AMINO_ACIDS = list("LAGVSERTIDPKQNFYMHWC")
REAL = read_fasta_records("few_proteins.fasta")[0][1]


class HttpDoorProcess:
    """`esm2 http` as a child process on a free port."""

    def __init__(self, redis_url: str, *args: str, env: dict | None = None, stderr=None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "esm2_service.server.http_main", "--port", "0", *args],
            env={**os.environ, "REDIS_URL": redis_url, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        line = self.process.stdout.readline()
        assert "esm2 http listening on port" in line, line
        self.base = f"http://127.0.0.1:{int(line.rsplit(' ', 1)[1])}"
        self.api = f"{self.base}/api/v3/esm2-8m"

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while requests.get(f"{self.base}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the HTTP door never became ready"
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.process.stdout.close()


def fresh_db(redis_server, db: int) -> str:
    url = redis_server.url_for_db(db)
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture(scope="module")
def door(redis_server, tiny_checkpoint):
    """A worker on the tiny checkpoint and the HTTP door in front of it, token required."""
    url = fresh_db(redis_server, 8)
    workers = ServiceProcesses(url, tiny_checkpoint)
    http = HttpDoorProcess(url, env={"ESM2_AUTH_TOKENS": TOKEN})
    try:
        workers.wait_serving()
        http.wait_ready()
        yield http
    finally:
        http.stop()
        workers.stop()


def post(door, action: str, body, headers=None, **kwargs) -> requests.Response:
    return requests.post(
        f"{door.api}/{action}/",
        json=body,
        headers={**AUTH, **(headers or {})},
        timeout=120,
        **kwargs,
    )


def amino_acid_logits(logits: np.ndarray) -> np.ndarray:
    return logits[:, list(AMINO_ACID_COLUMNS)]


def check_encode(result: dict, sequence: str, reference, layers=(5, 6)) -> None:
    expected = fair_esm_outputs(reference, sequence)
    if "embeddings" in result:
        assert [e["layer"] for e in result["embeddings"]] == list(layers)
        for entry in result["embeddings"]:
            assert_close(entry["embedding"], expected["mean"][entry["layer"]], what="mean")
    if "per_token_embeddings" in result:
        for entry in result["per_token_embeddings"]:
            assert_close(
                entry["embeddings"], expected["per_token"][entry["layer"]], what="per_token"
            )
    if "bos_embeddings" in result:
        for entry in result["bos_embeddings"]:
            assert_close(entry["embedding"], expected["bos"][entry["layer"]], what="bos")
    for name in ("contacts", "attentions"):
        if name in result:
            assert_close(result[name], expected[name], what=name)
    if "logits" in result:
        assert result["vocab_tokens"] == AMINO_ACIDS
        assert_close(result["logits"], amino_acid_logits(expected["logits"]), what="logits")


# ---------------------------------------------------------------------------------
# BioLM's reference examples, the SDK, and fidelity


PREDICT_EXAMPLE = {"items": [{"sequence": "ACD<mask>FGHI"}, {"sequence": "MNOP<mask>RST"}]}
ENCODE_EXAMPLE = {
    "params": {"repr_layers": [-1, -2], "include": ["mean", "per_token"]},
    "items": [{"sequence": "ACDEFGHIKLMN"}, {"sequence": "QRSTVWYACDEFG"}],
}


def check_predict(results: list, sequences: list[str], reference) -> None:
    for result, sequence in zip(results, sequences, strict=True):
        expected = fair_esm_outputs(reference, sequence)
        assert result["vocab_tokens"] == AMINO_ACIDS
        assert result["sequence_tokens"] == split_tokens(sequence)
        assert_close(result["logits"], amino_acid_logits(expected["mask_logits"]), what="predict")


def test_the_reference_pages_requests_examples_work_unchanged(door, tiny_reference):
    # As the reference page writes them, with only the base URL changed.
    headers = {"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"}
    response = requests.post(f"{door.api}/predict/", headers=headers, json=PREDICT_EXAMPLE)
    assert response.status_code == 200, response.text
    sequences = [item["sequence"] for item in PREDICT_EXAMPLE["items"]]
    check_predict(response.json()["results"], sequences, tiny_reference)

    response = requests.post(f"{door.api}/encode/", headers=headers, json=ENCODE_EXAMPLE)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["sequence_index"] for r in results] == [0, 1]
    assert sorted(results[0]) == ["embeddings", "per_token_embeddings", "sequence_index"]
    for result, item in zip(results, ENCODE_EXAMPLE["items"], strict=True):
        check_encode(result, item["sequence"], tiny_reference)


def test_the_reference_pages_curl_example_works_unchanged(door, tiny_reference):
    body = json.dumps(ENCODE_EXAMPLE, indent=2)
    done = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{door.api}/encode/", "-H", f"Authorization: Token {TOKEN}",
         "-H", "Content-Type: application/json", "-d", body],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    results = json.loads(done.stdout)["results"]
    check_encode(results[1], ENCODE_EXAMPLE["items"][1]["sequence"], tiny_reference)


def test_every_encode_output_matches_fair_esm(door, tiny_reference):
    sequences = [REAL, "MKTAYIAKQRQISFVKSHFSRQ", "ACDEFGHIKLMNPQRSTVWYXBUZO-"]
    include = ["mean", "per_token", "bos", "contacts", "logits", "attentions"]
    body = {
        "items": [{"sequence": s} for s in sequences],
        "params": {"include": include, "repr_layers": [0, 3, -1]},
    }
    response = post(door, "encode", body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["sequence_index"] for r in results] == [0, 1, 2]
    for result, sequence in zip(results, sequences, strict=True):
        assert list(result) == [
            "sequence_index", "embeddings", "bos_embeddings", "per_token_embeddings",
            "contacts", "attentions", "logits", "vocab_tokens",
        ]  # fmt: skip
        check_encode(result, sequence, tiny_reference, layers=(0, 3, 6))
    assert np.asarray(results[0]["attentions"]).shape == (
        4,
        len(REAL),
        len(REAL),
    )  # the tiny model's 4 heads


def reference_log_prob(reference, sequence: str) -> float:
    scores = amino_acid_logits(fair_esm_outputs(reference, sequence)["logits"]).astype(np.float64)
    log_probs = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
    return sum(
        log_probs[i, AMINO_ACIDS.index(r)] for i, r in enumerate(sequence) if r in AMINO_ACIDS
    )


def test_log_prob_sums_each_standard_residues_log_probability(door, tiny_reference):
    sequences = [REAL, "MKTXAYIAK-QR"]  # X and - are skipped, as BioLM skips them
    response = post(door, "log_prob", {"items": [{"sequence": s} for s in sequences]})
    assert response.status_code == 200, response.text
    values = [r["log_prob"] for r in response.json()["results"]]
    for value, sequence in zip(values, sequences, strict=True):
        assert value == pytest.approx(reference_log_prob(tiny_reference, sequence), abs=1e-4)


SDK_SCRIPT = """
import json, sys
from biolmai import BioLM, BioLMApi
spec = json.load(sys.stdin)
out = {
    "encode": BioLM(entity="esm2-8m", action="encode", params=spec["params"], items=spec["items"]),
    "predict": BioLM(entity="esm2-8m", action="predict", items=spec["masked"]),
}
api = BioLMApi("esm2-8m")
out["many"] = api.encode(items=spec["many"])
out["log_prob"] = api.call("log_prob", spec["items"])
out["invalid"] = api.encode(items=[{"sequence": "MKJ"}])
print(json.dumps(out))
"""


def test_biolms_sdk_runs_unchanged_but_for_the_base_url(door, tiny_reference):
    many = [{"sequence": "MKV" + "A" * i} for i in range(20)]
    spec = {**ENCODE_EXAMPLE, "masked": [{"sequence": "ACD<mask>FGHI"}], "many": many}
    env = {
        **os.environ,
        "BIOLMAI_BASE_API_URL": f"{door.api[: -len('/esm2-8m')]}",
        "BIOLMAI_TOKEN": TOKEN,
        # biolmai 0.4.0 refuses to import where 4 x cores < its default of 16 threads.
        "BIOLMAI_THREADS": "8",
    }
    done = subprocess.run(
        [sys.executable, "-c", SDK_SCRIPT], input=json.dumps(spec), env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for result, item in zip(out["encode"], ENCODE_EXAMPLE["items"], strict=True):
        check_encode(result, item["sequence"], tiny_reference)
    check_predict([out["predict"]], ["ACD<mask>FGHI"], tiny_reference)
    # 20 items: the SDK read maxItems (8) from the schema endpoint and sent 3 requests.
    assert [r["sequence_index"] for r in out["many"]] == [0, 1, 2, 3, 4, 5, 6, 7] * 2 + [0, 1, 2, 3]
    for result, item in zip(out["many"], many, strict=True):
        check_encode(result, item["sequence"], tiny_reference, layers=(6,))
    for result, item in zip(out["log_prob"], ENCODE_EXAMPLE["items"], strict=True):
        assert result["log_prob"] == pytest.approx(
            reference_log_prob(tiny_reference, item["sequence"]), abs=1e-4
        )
    assert out["invalid"]["status_code"] == 400
    assert out["invalid"]["errors"][0]["field"] == "items[0].sequence"


def test_gzip_requests_and_responses(door):
    body = json.dumps(
        {"items": [{"sequence": REAL}], "params": {"include": ["per_token"]}}
    ).encode()
    plain = post(door, "encode", json.loads(body), {"Accept-Encoding": "identity"})
    headers = {
        **AUTH,
        "Content-Encoding": "gzip",
        "Content-Type": "application/json",
        "Accept-Encoding": "gzip",
    }
    zipped = requests.post(
        f"{door.api}/encode/", data=gzip.compress(body), headers=headers, timeout=60
    )
    assert zipped.status_code == 200, zipped.text
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert zipped.json() == plain.json()  # requests inflates it
    assert "Content-Encoding" not in plain.headers


# ---------------------------------------------------------------------------------
# Errors


def test_tokens_are_required_except_for_health(door):
    body = {"items": [{"sequence": "MKV"}]}
    for headers, detail in (
        ({}, "missing"),
        ({"Authorization": f"Bearer {TOKEN}"}, "must have the form 'Token <token>'"),
        ({"Authorization": "Token not-the-token"}, "not valid"),
    ):
        response = requests.post(f"{door.api}/encode/", json=body, headers=headers, timeout=30)
        assert response.status_code == 401, response.text
        assert response.json()["code"] == "UNAUTHENTICATED" and detail in response.json()["detail"]
        assert TOKEN not in response.text
    assert requests.get(f"{door.base}/healthz", timeout=10).status_code == 200
    assert requests.get(f"{door.base}/readyz", timeout=10).status_code == 200


def test_invalid_input_lists_every_violation_as_grpc_does(door):
    items = [{"sequence": s} for s in ("MKV", "MKJV!", "MK<mask>", "")]
    response = post(door, "encode", {"items": items, "params": {"repr_layers": [9, -1]}})
    assert response.status_code == 400
    body = response.json()
    from esm2_service.esm2.v1 import esm2_pb2 as pb

    request = pb.EncodeRequest(items=[pb.Item(**item) for item in items])
    request.params.repr_layers.extend([9, -1])
    with pytest.raises(InvalidRequest) as grpc_verdict:
        validate_encode(request)
    assert body["errors"] == [
        {"field": v.field, "msg": v.description} for v in grpc_verdict.value.violations
    ]
    assert [e["field"] for e in body["errors"]] == [
        "items[1].sequence", "items[1].sequence", "items[2].sequence", "items[3].sequence",
        "params.repr_layers[0]",
    ]  # fmt: skip
    assert body["status_code"] == 400 and len(body["request_id"]) == 32
    assert response.headers["X-Request-Id"] == body["request_id"]

    nine = post(door, "predict", {"items": [{"sequence": "<mask>"}] * 9})
    assert nine.status_code == 400 and nine.json()["errors"][0]["field"] == "items"
    shape = post(
        door, "encode", {"items": [{"sequence": 7}], "params": {"include": "mean"}, "extra": 1}
    )
    assert [e["field"] for e in shape.json()["errors"]] == [
        "extra",
        "items[0].sequence",
        "params.include",
    ]
    # An unknown output name is reported beside the rest of the request's violations.
    names = post(
        door,
        "encode",
        {"items": [{"sequence": "MK1A"}], "params": {"include": ["mean", "embeddings", 3]}},
    )
    assert names.status_code == 400
    assert [(e["field"], e["msg"].split(";")[0]) for e in names.json()["errors"]] == [
        ("items[0].sequence", "character '1' at position 3 is not accepted (accepted: "
         "ACDEFGHIKLMNPQRSTVWY, XBUZO, '-')"),
        ("params.include[1]", "unknown output 'embeddings'"),
        ("params.include[2]", "unknown output 3"),
    ]  # fmt: skip
    alone = post(door, "encode", {"items": [{"sequence": "MKA"}], "params": {"include": ["x"]}})
    assert alone.status_code == 400
    assert [e["field"] for e in alone.json()["errors"]] == ["params.include[0]"]


def post_compact(door, action: str, body) -> requests.Response:
    """`body` as compact JSON (as BioLM's SDK sends it), so more fits in the size limit."""
    data = json.dumps(body, separators=(",", ":"))
    return requests.post(f"{door.api}/{action}/", data=data, headers=AUTH, timeout=120)


def test_error_bodies_list_at_most_the_bound_and_count_the_rest(door):
    many = post_compact(door, "encode", {"items": [{"sequence": "MK" + "!" * 11}] * 10_000})
    assert many.status_code == 400
    errors = many.json()["errors"]
    assert len(errors) == MAX_REPORTED_VIOLATIONS + 1
    assert errors[0] == {"field": "items", "msg": "10000 items; the limit is 8"}
    total = 1 + 10_000 * 11  # the item count, then 11 bad characters in each item
    assert errors[-1] == {
        "field": "request",
        "msg": f"and {total - MAX_REPORTED_VIOLATIONS:,} more violations, not listed",
    }
    assert len(many.content) < 64 * 1024

    body = {"items": [{"sequence": "MKV"}], "params": {"include": [0] * 500_000}}
    outputs = post_compact(door, "encode", body)
    assert outputs.status_code == 400
    errors = outputs.json()["errors"]
    assert len(errors) == MAX_REPORTED_VIOLATIONS + 1
    assert errors[0]["field"] == "params.include[0]"
    assert errors[-1]["msg"] == "and 499,900 more violations, not listed"
    assert len(outputs.content) < 64 * 1024


def test_a_huge_unknown_field_name_is_cut_in_the_body(door):
    name = "x" * 1_000_000
    response = post_compact(door, "encode", {"items": [{"sequence": "MKV"}], name: 1})
    assert response.status_code == 400
    body = response.json()
    assert body["errors"] == [
        {
            "field": "x" * 40 + "…(1,000,000 characters)",
            "msg": "unknown field; expected items, params",
        }
    ]
    assert len(response.content) < 1_000


def test_too_large_bodies_and_responses_get_413(door):
    huge = {"items": [{"sequence": "M" * (2 * 1024 * 1024)}]}
    assert post(door, "encode", huge).status_code == 413
    bomb = gzip.compress(b'{"items": [{"sequence": "' + b"A" * (3 * 1024 * 1024) + b'"}]}')
    headers = {**AUTH, "Content-Encoding": "gzip"}
    response = requests.post(f"{door.api}/encode/", data=bomb, headers=headers, timeout=30)
    assert response.status_code == 413 and "inflates past" in response.json()["detail"]
    everything = {"items": [{"sequence": "M" * 2048}] * 8, "params": {"include": ["attentions"]}}
    response = post(door, "encode", everything)
    assert response.status_code == 413
    assert "use the gRPC API" in response.json()["detail"]


def test_no_worker_503_full_queue_429_and_deadline_504(redis_server):
    empty = HttpDoorProcess(fresh_db(redis_server, 9))
    try:
        response = requests.post(
            f"{empty.api}/encode/", json={"items": [{"sequence": "MKV"}]}, timeout=30
        )
        assert response.status_code == 503 and "no live worker" in response.json()["detail"]
        assert requests.get(f"{empty.base}/readyz", timeout=10).status_code == 503
    finally:
        empty.stop()

    url = fresh_db(redis_server, 10)
    with redis.Redis.from_url(url) as client:
        client.zadd(queue.HEARTBEATS, {"silent-worker": time.time() + 3600})  # alive, never reads
        slow = HttpDoorProcess(url, "--request-timeout-s", "1", "--max-queue-items", "2")
        try:
            slow.wait_ready()
            response = requests.post(
                f"{slow.api}/encode/", json={"items": [{"sequence": "MKV"}]}, timeout=30
            )
            assert response.status_code == 504 and response.json()["code"] == "DEADLINE_EXCEEDED"
            client.xadd(queue.QUEUE_LANES[0], {b"noise": b"x"})
            client.xadd(queue.QUEUE_LANES[0], {b"noise": b"y"})
            response = requests.post(
                f"{slow.api}/encode/", json={"items": [{"sequence": "MKV"}]}, timeout=30
            )
            assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
            assert response.json()["code"] == "RESOURCE_EXHAUSTED"
        finally:
            slow.stop()


def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(redis_server, tiny_checkpoint):
    """What a pod's shutdown relies on (deploy/k8s/base/http-deployment.yaml): after
    SIGTERM the door stops accepting, and a request already queued still gets its answer
    once a worker computes it."""
    url = fresh_db(redis_server, 11)
    with redis.Redis.from_url(url) as client:
        client.zadd(queue.HEARTBEATS, {"silent-worker": time.time() + 3600})  # ready, no worker
        http = HttpDoorProcess(url)
        workers = None
        try:
            http.wait_ready()
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(
                    requests.post,
                    f"{http.api}/encode/",
                    json={"items": [{"sequence": REAL}]},
                    timeout=60,
                )
                deadline = time.monotonic() + 10
                while not any(client.xlen(lane) for lane in queue.QUEUE_LANES):
                    assert time.monotonic() < deadline, "the request never reached the queue"
                    time.sleep(0.05)
                http.process.send_signal(signal.SIGTERM)
                time.sleep(1.0)
                assert http.process.poll() is None, "exited with a request in flight"
                with pytest.raises(requests.ConnectionError):
                    requests.get(f"{http.base}/healthz", timeout=5)
                client.zrem(queue.HEARTBEATS, "silent-worker")
                workers = ServiceProcesses(url, tiny_checkpoint)  # computes the queued item
                response = pending.result(timeout=60)
            assert response.status_code == 200, response.text
            (result,) = response.json()["results"]
            assert len(result["embeddings"][0]["embedding"]) == 32  # the tiny model's width
            # uvicorn re-raises the signal once it has shut down, so the status is SIGTERM's
            # (143 to a shell or the kubelet), after the request in flight was answered.
            assert http.process.wait(timeout=30) == -signal.SIGTERM
        finally:
            http.stop()  # closes its stdout pipe whether or not it is still running
            if workers is not None:
                workers.stop()


MALFORMED = [
    b"",
    b"{",
    b"not json",
    b'{"items": [{"sequence": "MKV"}]',
    b'{"items": [{"sequence": "MK\xff\xfe"}]}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"items": [{"sequence": "MKV"}], "params": {"repr_layers": [1e400]}}',
    b'{"items": [{"sequence": "MKV"}], "params": {"repr_layers": [100000000000000000000000000]}}',
    b'{"items": [{"sequence": "MKV"}], "params": {"repr_layers": [true]}}',
    b'{"items": [{"sequence": "MKV"}], "params": {"repr_layers": [NaN]}}',
    b'{"items": {"sequence": "MKV"}}',
    b'{"items": [["MKV"]]}',
    b'{"items": [{"sequence": ["M"]}]}',
    b'{"items": [null]}',
    b"null",
    b"[]",
    b'"MKV"',
    b'{"items": [{"sequence": "MKV"}], "params": []}',
    b'{"items": [{"sequence": "MKV"}], "params": {"include": [1]}}',
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
BODIES = st.fixed_dictionaries(
    {},
    optional={
        "items": st.lists(
            st.fixed_dictionaries({}, optional={"sequence": JSON_VALUES}) | JSON_VALUES, max_size=10
        )
        | JSON_VALUES,
        "params": st.fixed_dictionaries(
            {}, optional={"repr_layers": JSON_VALUES, "include": JSON_VALUES}
        )
        | JSON_VALUES,
    },
)


def test_malformed_bodies_never_get_a_500_and_the_service_keeps_serving(door):
    session = requests.Session()
    statuses = []
    for action in ("encode", "predict", "log_prob"):
        for body in MALFORMED:
            statuses.append(
                session.post(f"{door.api}/{action}/", data=body, headers=AUTH, timeout=30)
            )
    truncated = gzip.compress(b'{"items": [{"sequence": "MKV"}]}')[:-6]
    statuses.append(
        session.post(
            f"{door.api}/encode/", data=truncated, headers={**AUTH, "Content-Encoding": "gzip"}
        )
    )
    statuses.append(
        session.post(f"{door.api}/encode/", data=b"{}", headers={**AUTH, "Content-Encoding": "br"})
    )
    for response in statuses:
        assert response.status_code == 400, (response.request.body[:80], response.text)
        assert response.json()["detail"]

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=BODIES, action=st.sampled_from(["encode", "predict", "log_prob"]))
    def random_body(body, action):
        response = session.post(
            f"{door.api}/{action}/", data=json.dumps(body), headers=AUTH, timeout=60
        )
        assert response.status_code in (200, 400), response.text
        assert response.headers["Content-Type"] == "application/json"

    random_body()
    assert post(door, "encode", {"items": [{"sequence": "MKV"}]}).status_code == 200
    assert requests.get(f"{door.base}/readyz", timeout=10).status_code == 200


# ---------------------------------------------------------------------------------
# OpenAPI


def test_the_openapi_document_describes_what_is_served(door):
    document = requests.get(f"{door.base}/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.1")

    def check(schema_name: str, instance) -> None:
        schema = {
            "$ref": f"#/components/schemas/{schema_name}",
            "components": document["components"],
        }
        jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)

    include = ["mean", "per_token", "bos", "contacts", "logits", "attentions"]
    encode_body = {
        "items": [{"sequence": "MKTAYIAK"}],
        "params": {"include": include, "repr_layers": [0, -1]},
    }
    check("encode_request", encode_body)
    check("encode_response", post(door, "encode", encode_body).json())
    check("predict_request", PREDICT_EXAMPLE)
    check("predict_response", post(door, "predict", PREDICT_EXAMPLE).json())
    check("log_prob_response", post(door, "log_prob", {"items": [{"sequence": "MKV"}]}).json())
    check("Error", post(door, "encode", {"items": []}).json())
    with pytest.raises(jsonschema.ValidationError):
        check("encode_request", {"items": [{"sequence": "MKV", "x": 1}]})
    for action in ("encode", "predict", "log_prob"):
        assert f"/api/v3/esm2-8m/{action}/" in document["paths"]
        schema = requests.get(f"{door.base}/api/v3/schema/esm2-8m/{action}/", timeout=10).json()
        assert schema["properties"]["items"]["maxItems"] == 8
    assert requests.get(f"{door.base}/api/v3/schema/esm2-8m/fold/", timeout=10).status_code == 404
    page = requests.get(f"{door.base}/docs", timeout=10)
    assert page.status_code == 200 and "/openapi.json" in page.text
    assert VOCAB_TOKENS[4:24] == tuple(AMINO_ACIDS)  # the 20 columns, documented as 4..23


def test_256_concurrent_requests_are_all_answered_over_a_bounded_pool(door, redis_server):
    from esm2_service.server.broker import REDIS_CONNECTIONS

    def one(index: int) -> tuple[int, int]:
        body = {"items": [{"sequence": sequence_number(index)}]}
        response = post(door, "encode", body)
        return response.status_code, len(response.json()["results"][0]["embeddings"])

    name = f"esm2-http-{door.process.pid}"
    with ConnectionCounter(redis_server.url, name) as connections, ThreadPoolExecutor(256) as pool:
        answers = list(pool.map(one, range(256)))
    assert answers == [(200, 1)] * 256
    assert 1 <= connections.peak <= REDIS_CONNECTIONS


# ---------------------------------------------------------------------------------
# Bounds: slow, departing and ambiguous clients, over raw sockets

ENCODE_PATH = "/api/v3/esm2-8m/encode/"
ENCODE_METHOD = f"POST {ENCODE_PATH}"
MKV = b'{"items": [{"sequence": "MKV"}]}'


@pytest.fixture(scope="module")
def bounded_door(redis_server, tmp_path_factory):
    """A door with 1 s header and body timeouts, its metrics on a port of its own and
    DEBUG logs in a file. No worker: bodies are read and checked before readiness is."""
    log_path = tmp_path_factory.mktemp("logs") / "http-door.log"
    metrics_port = free_port()
    with open(log_path, "w") as log:
        http = HttpDoorProcess(
            fresh_db(redis_server, 12),
            *("--header-timeout-s", "1", "--body-timeout-s", "1"),
            *("--metrics-port", str(metrics_port), "--log-level", "DEBUG"),
            stderr=log,
        )
    http.log_path, http.metrics_port = log_path, metrics_port
    yield http
    http.stop()


def open_socket(door: HttpDoorProcess, timeout_s: float = 5.0) -> socket.socket:
    port = int(door.base.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=timeout_s)


def read_until_closed(sock: socket.socket) -> bytes:
    """What the server sends until it closes; a timeout (the socket's) if it never does."""
    received = bytearray()
    while chunk := sock.recv(65536):
        received += chunk
    return bytes(received)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length: (status, lowercase headers, body)."""
    received = bytearray()
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole response: {bytes(received)!r}"
        received += chunk
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, body


def raw_request(door, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request on a connection of its own."""
    with open_socket(door) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        return read_response(sock)


def request_counts(door) -> dict[str, float]:
    """esm2_requests_total of the encode action, by code, from the door's /metrics."""
    text = requests.get(f"http://127.0.0.1:{door.metrics_port}/metrics", timeout=10).text
    return {
        sample.labels["code"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "esm2_requests_total" and sample.labels["method"] == ENCODE_METHOD
    }


def test_a_connection_stalled_in_its_headers_is_closed_after_the_header_timeout(bounded_door):
    with open_socket(bounded_door) as fresh:
        fresh.sendall(b"POST " + ENCODE_PATH.encode() + b" HTTP/1.1\r\nHost: t\r\nContent-")
        started = time.monotonic()
        assert read_until_closed(fresh) == b""
        assert 0.5 < time.monotonic() - started < 3.5  # 1 s; uvicorn's keep-alive is 5 s
    # The next request on a kept-alive connection has a deadline of its own.
    with open_socket(bounded_door) as reused:
        reused.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(reused)[0] == 200
        reused.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        started = time.monotonic()
        assert read_until_closed(reused) == b""
        assert time.monotonic() - started < 3.5


def test_a_stalled_body_gets_408_and_the_connection_closes(bounded_door):
    head = b"POST " + ENCODE_PATH.encode() + b" HTTP/1.1\r\nHost: t\r\nContent-Length: 100"
    with open_socket(bounded_door) as sock:
        sock.sendall(head + b"\r\n\r\n" + MKV[:10])
        started = time.monotonic()
        status, headers, body = read_response(sock)
        assert 0.5 < time.monotonic() - started < 3.5
        assert (status, headers["connection"]) == (408, "close"), body
        error = json.loads(body)
        assert error["code"] == "DEADLINE_EXCEEDED"
        assert error["detail"] == "the request body did not arrive within 1 s"
        assert read_until_closed(sock) == b""


def test_a_body_still_trickling_in_after_its_response_is_cut_off(bounded_door):
    # /healthz answers without reading the body; the client keeps sending it slowly.
    with open_socket(bounded_door, timeout_s=0.3) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\nx")
        assert read_response(sock)[0] == 200
        deadline = time.monotonic() + 3.5  # the body timeout is 1 s
        closed = False
        while not closed:
            assert time.monotonic() < deadline, "a trickling body kept its connection open"
            try:
                sock.sendall(b"x")
                closed = sock.recv(1) == b""
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                closed = True


def test_a_client_leaving_mid_body_is_counted_as_such_and_logged_at_debug(bounded_door):
    before = request_counts(bounded_door)
    head = b"POST " + ENCODE_PATH.encode() + b" HTTP/1.1\r\nHost: t\r\nContent-Length: 100"
    with open_socket(bounded_door) as sock:
        sock.sendall(head + b"\r\n\r\n" + MKV[:10])
        time.sleep(0.2)  # the door is reading the body
    deadline = time.monotonic() + 5
    while (counts := request_counts(bounded_door)) == before:
        assert time.monotonic() < deadline, "the request was never counted"
        time.sleep(0.1)
    assert counts.get("CLIENT_DISCONNECTED", 0) == before.get("CLIENT_DISCONNECTED", 0) + 1
    assert counts.get("INTERNAL", 0) == before.get("INTERNAL", 0)
    log = bounded_door.log_path.read_text()
    assert "the client left mid-body" in log
    assert " ERROR " not in log and "Traceback" not in log


def test_content_length_with_transfer_encoding_gets_400_and_a_closed_connection(bounded_door):
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(MKV), MKV)
    head = b"POST " + ENCODE_PATH.encode() + b" HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
    with open_socket(bounded_door) as sock:
        sock.sendall(head + b"\r\nContent-Length: 4\r\n\r\n" + chunked)
        status, headers, body = read_response(sock)
        assert (status, headers["connection"]) == (400, "close"), body
        error = json.loads(body)
        assert error["code"] == "INVALID_ARGUMENT" and len(error["request_id"]) == 32
        assert [e["field"] for e in error["errors"]] == ["headers"]
        assert "Content-Length and Transfer-Encoding" in error["detail"]
        assert read_until_closed(sock) == b""
    # Chunked alone is read as ever: the body parses, and the door, with no worker, says so.
    status, _, body = raw_request(bounded_door, head, chunked)
    assert (status, json.loads(body)["code"]) == (503, "UNAVAILABLE")


def test_a_gzip_body_is_every_member_and_nothing_else(bounded_door):
    def post_gzip(data: bytes) -> requests.Response:
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        return requests.post(f"{bounded_door.base}{ENCODE_PATH}", data=data, headers=headers)

    members = post_gzip(gzip.compress(MKV[:9]) + gzip.compress(MKV[9:]))
    assert members.json()["code"] == "UNAVAILABLE"  # parsed; no worker to run it
    for trailer in (b"garbage", b"\0" * 8, gzip.compress(b" ")[:-2]):
        response = post_gzip(gzip.compress(MKV) + trailer)
        assert response.status_code == 400, (trailer, response.text)
        ((field, message),) = [(e["field"], e["msg"]) for e in response.json()["errors"]]
        assert field == "body" and "gzip data" in message


def test_past_max_connections_a_request_gets_503_and_a_connection_is_closed(redis_server, tmp_path):
    """uvicorn's limit_concurrency answers 503 to a request that arrives while
    --max-connections connections are open, its own counted; the door closes a
    connection past that many as soon as it accepts it."""
    log_path = tmp_path / "http-door.log"
    with open(log_path, "w") as log:
        http = HttpDoorProcess(fresh_db(redis_server, 13), "--max-connections", "4", stderr=log)
    idle: list[socket.socket] = []
    healthz = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close"
    try:
        idle += [open_socket(http), open_socket(http)]
        assert raw_request(http, healthz)[0] == 200  # 3 open
        idle.append(open_socket(http))
        status, headers, body = raw_request(http, healthz)  # 4 open
        assert (status, headers["connection"], body) == (503, "close", b"Service Unavailable")
        idle.append(open_socket(http))
        started = time.monotonic()
        with open_socket(http) as fifth:
            assert read_until_closed(fifth) == b""
        assert time.monotonic() - started < 2  # on accept, not at the 10 s header timeout
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 5
        while raw_request(http, healthz)[0] != 200:
            assert time.monotonic() < deadline, "the door never took connections again"
            time.sleep(0.1)
    finally:
        for sock in idle:
            sock.close()
        http.stop()
    assert "refused a connection: 4 are open (--max-connections 4)" in log_path.read_text()
