"""The `esm2` command line: parsing, outputs, errors and forwarding."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import pytest

from esm2_service.alphabet import VOCAB_TOKENS
from esm2_service.client import EncodeResult
from esm2_service.client.cli import main, parse_args
from esm2_service.client.output import npz_arrays
from esm2_service.esm2.v1 import esm2_pb2 as pb

FASTA = ">first protein one\nMKV\nLA\n>second\nMK\n>third\nMKVLAGG\n"


@pytest.fixture
def fasta(tmp_path):
    path = tmp_path / "in.fasta"
    path.write_text(FASTA, encoding="utf-8")
    return str(path)


def test_encode_arguments(monkeypatch):
    monkeypatch.setenv("ESM2_TARGET", "esm2.example:443")
    args = parse_args(
        ["encode", "in.fa", "-o", "out.npz", "--include", "mean,per_token", "--layers", "-1,0"]
        + ["--dtype", "float16", "--batch-size", "4", "--no-progress"]
    )

    assert (args.fasta, args.output, args.dtype) == ("in.fa", "out.npz", "float16")
    assert args.include == ["mean", "per_token"]
    assert args.layers == [-1, 0]
    assert (args.batch_size, args.concurrency, args.no_progress) == (4, 8, True)
    assert args.target == "esm2.example:443"


def test_encode_defaults(monkeypatch):
    monkeypatch.delenv("ESM2_TARGET", raising=False)
    args = parse_args(["encode", "in.fa", "-o", "out.npz", "--layers=-2"])

    assert (args.include, args.layers, args.dtype) == (["mean"], [-2], "float32")
    assert (args.target, args.batch_size, args.timeout) == ("localhost:50051", 8, None)


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["--include", "mean,embeddings"],
            "argument --include: unknown include 'embeddings'; "
            "valid: mean, per_token, bos, contacts, logits, attentions",
        ),
        (["--layers", "-1,last"], "argument --layers: expected comma-separated integers"),
        (["--batch-size", "9"], "argument --batch-size: invalid choice: 9"),
        (["--concurrency", "0"], "argument --concurrency: expected a positive integer, got '0'"),
    ],
)
def test_bad_encode_arguments_exit_2_naming_the_problem(capsys, argv, error):
    with pytest.raises(SystemExit) as caught:
        main(["encode", "in.fa", "-o", "out.npz", *argv])

    assert caught.value.code == 2
    assert error in capsys.readouterr().err


def test_predict_takes_a_fasta_or_sequences_not_both(capsys):
    assert parse_args(["predict", "--sequence", "M<mask>", "--sequence", "<mask>K"]).sequence == [
        "M<mask>",
        "<mask>K",
    ]
    with pytest.raises(SystemExit):
        parse_args(["predict", "in.fa", "--sequence", "M<mask>"])
    assert "not allowed with argument fasta" in capsys.readouterr().err


def test_npz_names():
    result = EncodeResult(
        sequence_index=0,
        embeddings={0: np.zeros(320), 6: np.ones(320)},
        per_token={6: np.ones((3, 320))},
        bos={6: np.ones(320)},
        contacts=np.eye(3),
        logits=np.ones((3, 33)),
    )

    assert sorted(npz_arrays("sp|P1|X", result)) == [
        "sp|P1|X/bos/layer6",
        "sp|P1|X/contacts",
        "sp|P1|X/logits",
        "sp|P1|X/mean/layer0",
        "sp|P1|X/mean/layer6",
        "sp|P1|X/per_token/layer6",
    ]


def test_encode_writes_the_npz(fake_server, fasta, tmp_path):
    target, servicer = fake_server
    output = tmp_path / "out.npz"
    argv = ["encode", fasta, "-o", str(output), "--include", "mean,per_token,contacts"]
    argv += ["--layers", "-1,0", "--target", target, "--no-progress", "--batch-size", "2"]

    assert main(argv) == 0

    with np.load(output) as data:
        names = set(data.files)
        assert list(data["ids"]) == ["first", "second", "third"]
        assert list(data["vocab_tokens"]) == list(VOCAB_TOKENS)
        np.testing.assert_array_equal(
            data["third/per_token/layer0"], servicer.tensor(pb.INCLUDE_PER_TOKEN, 0, 7)
        )
        assert data["first/mean/layer6"][0] == 5.75
        assert data["second/contacts"].shape == (2, 2)
    per_record = {"mean/layer0", "mean/layer6", "per_token/layer0", "per_token/layer6", "contacts"}
    expected = {f"{name}/{key}" for name in ("first", "second", "third") for key in per_record}
    assert names == expected | {"ids", "vocab_tokens"}
    assert sorted(len(request) for request in servicer.requests) == [1, 2]


def test_predict_writes_json(fake_server, tmp_path, capsys):
    target, servicer = fake_server
    output = tmp_path / "out.json"
    argv = ["predict", "--sequence", "MK<mask>", "--sequence", "<mask>A<mask>L"]

    assert main([*argv, "--target", target, "-o", str(output), "--no-progress"]) == 0

    document = json.loads(output.read_text(encoding="utf-8"))
    assert document["vocab_tokens"] == list(VOCAB_TOKENS)
    first, second = document["results"]
    assert first["id"] == "seq1" and first["sequence_tokens"] == ["M", "K", "<mask>"]
    assert first["mask_positions"] == [2] and second["mask_positions"] == [0, 2]
    assert second["predicted_tokens"] == [servicer.predicted_token(4)] * 2
    assert len(second["logits"]) == 2 and len(second["logits"][0]) == 33
    assert max(second["logits"][1]) == 4.0
    assert capsys.readouterr().out == ""


def test_status_prints_json_and_warns_on_random_weights(fake_server, capsys):
    target, servicer = fake_server
    servicer.random_weights = True

    assert main(["status", "--target", target]) == 0

    captured = capsys.readouterr()
    status = json.loads(captured.out)
    assert status["queue_depth"] == 3 and status["any_random_weights"] is True
    assert status["workers"][0]["worker_id"] == "w1"
    assert status["workers"][0]["model"]["random_weights"] is True
    assert "WARNING" in captured.err and "RANDOM weights" in captured.err


def test_server_refusals_print_each_violation_once_with_its_record(fake_server, tmp_path, capsys):
    target, servicer = fake_server
    sequences = [f"MKV{'A' * i}<mask>" for i in range(20)]
    sequences[2] += "QQQQ"
    sequences[17] += "QQQQ"
    path = tmp_path / "in.fasta"
    path.write_text("".join(f">s{i}\n{sequence}\n" for i, sequence in enumerate(sequences)))
    argv = ["predict", str(path), "--target", target, "--no-progress", "--concurrency", "1"]

    assert main(argv) == 1

    # The first window (one request of 8) is refused; the later windows are never sent.
    assert capsys.readouterr().err.splitlines() == [
        "error: INVALID_ARGUMENT: 1 violation:",
        "  items[2].sequence (record 's2', line 5): holds QQQQ",
    ]
    assert servicer.requests == []


def test_every_bad_record_is_named_once_before_any_request(fake_server, tmp_path, capsys):
    target, servicer = fake_server
    records = [f">r{i} description\nMKV{'A' * i}\n" for i in range(30)]
    records[3] = ">r3\nMKaV\n"
    records[27] = ">r27\nMK<mask>V\n"
    path = tmp_path / "in.fasta"
    path.write_text("".join(records))
    argv = ["encode", str(path), "-o", str(tmp_path / "out.npz"), "--target", target]

    assert main([*argv, "--no-progress"]) == 1

    assert capsys.readouterr().err.splitlines() == [
        "error: INVALID_ARGUMENT: 2 violations:",
        "  items[3].sequence (record 'r3', line 7): character 'a' at position 3 is not "
        "accepted (accepted: ACDEFGHIKLMNPQRSTVWY, XBUZO, '-')",
        "  items[27].sequence (record 'r27', line 55): <mask> at position 3: only Predict "
        "accepts <mask>",
    ]
    assert servicer.requests == []
    assert not (tmp_path / "out.npz").exists()


def test_unreachable_server_is_reported_without_traceback(capsys):
    assert main(["status", "--target", "127.0.0.1:1", "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE: ") and "Traceback" not in err


def test_missing_output_folder_exits_2_before_any_request(fasta, tmp_path, capsys):
    output = tmp_path / "absent" / "out.npz"

    assert main(["encode", fasta, "-o", str(output), "--target", "127.0.0.1:1"]) == 2
    assert f"{output}: no such directory to write into" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("MKV\n>a\nMKV\n", "in.fasta:1: sequence text before the first '>' header"),
        (">a\nMKV\n>a\nMK\n", "duplicate record ids ['a']"),
        ("\n", "in.fasta: no FASTA records"),
    ],
)
def test_bad_fasta_exits_2(tmp_path, capsys, text, error):
    path = tmp_path / "in.fasta"
    path.write_text(text, encoding="utf-8")

    assert main(["encode", str(path), "-o", str(tmp_path / "out.npz")]) == 2
    assert error in capsys.readouterr().err


FORWARDED = [
    ("server", "esm2_service.server.main"),
    ("worker", "esm2_service.worker.main"),
    ("serve", "esm2_service.server.serve"),
    ("make-checkpoint", "esm2_service.worker.checkpoint"),
]


@pytest.mark.parametrize(("command", "module_name"), FORWARDED)
def test_commands_forward_argv_unchanged(monkeypatch, command, module_name):
    calls = []
    module = types.ModuleType(module_name)
    module.main = lambda argv: calls.append(argv) or 7
    monkeypatch.setitem(sys.modules, module_name, module)

    assert main([command, "--port", "50052", "--workers", "2", "-v"]) == 7
    assert main([command, "--help"]) == 7
    assert calls == [["--port", "50052", "--workers", "2", "-v"], ["--help"]]


@pytest.mark.parametrize(
    ("command", "module_name", "hint"),
    [
        (
            "worker",
            "esm2_service.worker.main",
            "the worker extra: pip install 'esm2-service[worker]'",
        ),
        (
            "serve",
            "esm2_service.server.serve",
            "the server and worker extras: pip install 'esm2-service[server,worker]'",
        ),
    ],
)
def test_missing_extra_is_explained(monkeypatch, capsys, command, module_name, hint):
    monkeypatch.setitem(sys.modules, module_name, None)  # makes the import fail

    assert main([command, "--workers", "2"]) == 2
    assert f"esm2 {command} needs {hint}" in capsys.readouterr().err


def test_client_imports_neither_torch_nor_redis():
    code = (
        "import sys, esm2_service.client, esm2_service.client.cli; "
        "print(sorted({'torch', 'redis'} & {name.split('.')[0] for name in sys.modules}))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert completed.stdout.strip() == "[]"
