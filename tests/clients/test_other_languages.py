"""The Node and Go clients against a live service (token required), and the same
requests through the Python, Node and Go clients: bit-identical tensors for every
output kind and dtype, and the same error codes and violations."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess

import numpy as np
import pytest
import redis
from conftest import ServiceProcesses
from support import ROOT, read_fasta_records

from esm2_service.client import Esm2Client, InvalidArgumentError
from esm2_service.tensors import MAX_CHUNK_BYTES

TOKEN = "cross-client-token-0123"
NODE = ROOT / "client" / "node"
GO_PACKAGE = "esm2service"


@pytest.fixture(scope="module")
def token_service(redis_server, tiny_checkpoint):
    url = redis_server.url_for_db(7)
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    service = ServiceProcesses(url, tiny_checkpoint, env={"ESM2_AUTH_TOKENS": TOKEN})
    try:
        service.wait_serving()
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def go_env(tmp_path_factory) -> dict[str, str]:
    """GOPATH mode over Debian's Go libraries: no module proxy, nothing downloaded."""
    gopath = tmp_path_factory.mktemp("gopath")
    (gopath / "src").mkdir()
    (gopath / "src" / GO_PACKAGE).symlink_to(ROOT / "client" / "go")
    cache = ROOT / ".cache" / "go-build"  # kept between runs: the first build is slow
    return {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}:/usr/share/gocode",
        "GOCACHE": str(cache),
        "GOPROXY": "off",
        "GOFLAGS": "",
    }


def run(args, env=None, cwd=ROOT, stdin=None, timeout=600) -> subprocess.CompletedProcess:
    done = subprocess.run(
        list(map(str, args)),
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{' '.join(map(str, args))}:\n{done.stdout}\n{done.stderr}"
    return done


def live_env(service, base=None) -> dict[str, str]:
    return {**(base or os.environ), "ESM2_TARGET": service.target, "ESM2_TOKEN": TOKEN}


def test_the_node_clients_tests_pass_against_the_live_service(token_service):
    done = run(["npm", "test", "--silent"], env=live_env(token_service), cwd=NODE)
    summary = dict(re.findall(r"^# (\w+) (\d+)$", done.stdout, re.MULTILINE))
    assert summary["fail"] == "0" and summary["skipped"] == "0", done.stdout
    assert int(summary["pass"]) >= 9, done.stdout


def test_the_go_clients_tests_pass_against_the_live_service(token_service, go_env):
    assert run(["gofmt", "-l", ROOT / "client" / "go"]).stdout == ""  # formatted
    run(["go", "vet", GO_PACKAGE, f"{GO_PACKAGE}/cmd/esm2-dump"], env=go_env)
    done = run(["go", "test", "-count=1", "-v", GO_PACKAGE], env=live_env(token_service, go_env))
    assert "--- SKIP" not in done.stdout, done.stdout
    assert len(re.findall(r"^--- PASS", done.stdout, re.MULTILINE)) >= 9, done.stdout


# ---------------------------------------------------------------------------------
# The same requests through all three clients.

REAL = read_fasta_records("few_proteins.fasta")[0][1]
LONG = (REAL * 40)[:2048]  # its contacts [2048, 2048] span several chunks
ALL = ["mean", "per_token", "bos", "contacts", "logits", "attentions"]
BAD = ["MKV"] * 12
BAD[3], BAD[10] = "MKJ", "MK<mask>V"
SPEC = [
    *(
        {
            "name": f"encode-{dtype}",
            "method": "encode",
            "sequences": [REAL, "MKTAYIAKQRQISFVKSHFSRQ", "ACDEFGHIKLMNPQRSTVWYXBUZO-"],
            "include": ALL,
            "repr_layers": [-1, 0, 3],
            "dtype": dtype,
        }
        for dtype in ("float32", "float16", "bfloat16")
    ),
    {
        "name": "encode-split-11",
        "method": "encode",
        "sequences": [f"MK{'V' * i}" for i in range(11)],
        "include": ["mean", "bos"],
        "repr_layers": [-7, 6],
        "dtype": "float32",
    },
    {
        "name": "encode-2048",
        "method": "encode",
        "sequences": [LONG],
        "include": ["contacts", "logits", "per_token"],
        "repr_layers": [6],
        "dtype": "float32",
    },
    *(
        {
            "name": f"predict-{dtype}",
            "method": "predict",
            "sequences": ["MK<mask>AY<mask>IAK", "<mask>", REAL[:50] + "<mask>"],
            "dtype": dtype,
        }
        for dtype in ("float32", "float16", "bfloat16")
    ),
    {"name": "invalid-encode", "method": "encode", "sequences": BAD, "repr_layers": [9]},
    {"name": "invalid-predict", "method": "predict", "sequences": ["MKV", "<mask>", "M!"]},
]


def python_dump(target: str) -> dict:
    """The spec through the Python client, in the dump tools' JSON layout."""

    def pack(array) -> dict:
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        return {"shape": list(array.shape), "data": base64.b64encode(data).decode()}

    out = {}
    with Esm2Client(target, token=TOKEN, timeout_s=300) as client:
        for request in SPEC:
            dtype = request.get("dtype", "float32")
            try:
                if request["method"] == "predict":
                    results = [
                        {
                            "index": r.sequence_index,
                            "tensors": {"logits": pack(r.logits)},
                            "vocab_tokens": r.vocab_tokens,
                            "sequence_tokens": r.sequence_tokens,
                        }
                        for r in client.predict(request["sequences"], dtype=dtype)
                    ]
                else:
                    encoded = client.encode(
                        request["sequences"],
                        include=request.get("include", ["mean"]),
                        repr_layers=request.get("repr_layers", [-1]),
                        dtype=dtype,
                    )
                    results = [
                        {
                            "index": r.sequence_index,
                            "tensors": encode_tensors(r, pack),
                            "vocab_tokens": r.vocab_tokens,
                            "sequence_tokens": None,
                        }
                        for r in encoded
                    ]
                out[request["name"]] = {"results": results, "error": None}
            except InvalidArgumentError as error:
                violations = [list(v) for v in error.violations]
                failure = {"code": error.code().name, "message": error.details()}
                out[request["name"]] = {
                    "results": [],
                    "error": {**failure, "violations": violations},
                }
    return out


def encode_tensors(result, pack) -> dict:
    tensors = {}
    for name, layers in (("mean", result.embeddings), ("per_token", result.per_token)):
        tensors |= {f"{name}/{layer}": pack(array) for layer, array in layers.items()}
    tensors |= {f"bos/{layer}": pack(array) for layer, array in result.bos.items()}
    for name in ("contacts", "logits", "attentions"):
        if getattr(result, name) is not None:
            tensors[name] = pack(getattr(result, name))
    return tensors


def normalized(dump: dict) -> dict:
    """Go prints an empty list as null; the Python and Node dumps as []."""
    for outcome in dump.values():
        for result in outcome["results"]:
            result["sequence_tokens"] = result["sequence_tokens"] or None
    return dump


def test_python_node_and_go_clients_agree_bit_for_bit(token_service, go_env, tmp_path):
    spec = json.dumps(SPEC)
    dump_tool = tmp_path / "esm2-dump"
    run(["go", "build", "-o", dump_tool, f"{GO_PACKAGE}/cmd/esm2-dump"], env=go_env)
    run(["npm", "run", "build", "--silent"], cwd=NODE)
    target = ["--target", token_service.target, "--token", TOKEN]
    go = json.loads(run([dump_tool, *target], env=go_env, stdin=spec).stdout)
    node = json.loads(run(["node", "dist/bin/esm2-dump.js", *target], cwd=NODE, stdin=spec).stdout)
    python = python_dump(token_service.target)

    contacts = python["encode-2048"]["results"][0]["tensors"]["contacts"]
    assert len(base64.b64decode(contacts["data"])) > 3 * MAX_CHUNK_BYTES  # several chunks
    assert (
        python["encode-float16"]["results"][0]["tensors"]["logits"]
        != (python["encode-float32"]["results"][0]["tensors"]["logits"])
    )
    for name in (request["name"] for request in SPEC):
        assert normalized(go)[name] == normalized(python)[name], f"Go differs on {name}"
        assert normalized(node)[name] == normalized(python)[name], f"Node differs on {name}"
    assert python["invalid-encode"]["error"]["violations"] == [
        ["items[3].sequence", python["invalid-encode"]["error"]["violations"][0][1]],
        ["items[10].sequence", "<mask> at position 3: only Predict accepts <mask>"],
        ["params.repr_layers[0]", "layer 9 is outside -7..6"],
    ]
    assert [v[0] for v in python["invalid-predict"]["error"]["violations"]] == [
        "items[0].sequence",
        "items[2].sequence",
        "items[2].sequence",
    ]


def test_python_is_refused_without_the_token(token_service):
    import grpc

    with (
        Esm2Client(token_service.target, timeout_s=30) as client,
        pytest.raises(grpc.RpcError) as e,
    ):
        client.status()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
