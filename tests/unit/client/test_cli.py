"""The `esm2` command line: parsing, outputs, errors and forwarding."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import h5py
import numpy as np
import pytest

from esm2_service.alphabet import VOCAB_TOKENS
from esm2_service.client import EncodeResult
from esm2_service.client.cli import main, parse_args
from esm2_service.client.output import record_arrays
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
        ["encode", "in.fa", "-o", "out.h5", "--include", "mean,per_token", "--layers", "-1,0"]
        + ["--dtype", "float16", "--concurrency", "4", "--no-progress", "--long", "windows"]
    )

    assert (args.fasta, args.output, args.dtype) == ("in.fa", "out.h5", "float16")
    assert args.include == ["mean", "per_token"]
    assert args.layers == [-1, 0]
    assert (args.concurrency, args.no_progress) == (4, True)
    assert (args.long, args.window, args.overlap, args.shard_records) == (
        "windows",
        1022,
        256,
        1000,
    )
    assert args.target == "esm2.example:443"


def test_encode_defaults(monkeypatch):
    monkeypatch.delenv("ESM2_TARGET", raising=False)
    args = parse_args(["encode", "in.fa", "-o", "out.h5", "--layers=-2"])

    assert (args.include, args.layers, args.dtype) == (["mean"], [-2], "float32")
    assert (args.target, args.concurrency, args.timeout) == ("localhost:50051", None, None)
    assert args.long == "reject"


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["--include", "mean,embeddings"],
            "argument --include: unknown include 'embeddings'; "
            "valid: mean, per_token, bos, contacts, logits, attentions",
        ),
        (["--layers", "-1,last"], "argument --layers: expected comma-separated integers"),
        (["--long", "truncate"], "argument --long: invalid choice: 'truncate'"),
        (["--concurrency", "0"], "argument --concurrency: expected a positive integer, got '0'"),
    ],
)
def test_bad_encode_arguments_exit_2_naming_the_problem(capsys, argv, error):
    with pytest.raises(SystemExit) as caught:
        main(["encode", "in.fa", "-o", "out.h5", *argv])

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


def test_record_arrays_are_named_by_kind_and_layer():
    result = EncodeResult(
        sequence_index=0,
        embeddings={0: np.zeros(320), 6: np.ones(320)},
        per_token={6: np.ones((3, 320))},
        bos={6: np.ones(320)},
        contacts=np.eye(3),
        logits=np.ones((3, 33)),
    )

    assert sorted(record_arrays(result)) == [
        "bos/layer6",
        "contacts",
        "logits",
        "mean/layer0",
        "mean/layer6",
        "per_token/layer6",
    ]


def test_encode_writes_hdf5_from_requests_of_eight(fake_server, tmp_path):
    target, servicer = fake_server
    path = tmp_path / "in.fasta"
    path.write_text("".join(f">s{i}\nM{'K' * i}\n" for i in range(20)))
    output = tmp_path / "out.h5"
    argv = ["encode", str(path), "-o", str(output), "--include", "mean,per_token,contacts"]
    argv += ["--layers", "-1,0", "--target", target, "--no-progress"]

    assert main(argv) == 0

    with h5py.File(output) as data:
        assert sorted(data) == sorted(f"s{i}" for i in range(20))
        assert list(data.attrs["vocab_tokens"]) == list(VOCAB_TOKENS)
        np.testing.assert_array_equal(
            data["s6/per_token/layer0"][:], servicer.tensor(pb.INCLUDE_PER_TOKEN, 0, 7)
        )
        assert data["s0/mean/layer6"][0] == 1.75
        assert data["s1/contacts"].shape == (2, 2)
        assert sorted(data["s3"].attrs) == ["checksum", "id", "index", "length", "line", "windows"]
    assert sorted(len(request) for request in servicer.requests) == [4, 8, 8]


def test_records_the_service_refuses_become_rejects_and_the_rest_is_written(
    fake_server, tmp_path, capsys
):
    target, servicer = fake_server
    path = tmp_path / "in.fasta"
    records = [f">r{i}\nMKV{'A' * i}\n" for i in range(12)]
    records[5] = ">r5\nMKVQQQQ\n"
    path.write_text("".join(records))
    output = tmp_path / "out.h5"

    assert main(["encode", str(path), "-o", str(output), "--target", target, "--no-progress"]) == 3

    with h5py.File(output) as data:
        assert sorted(data) == sorted(f"r{i}" for i in range(12) if i != 5)
    rejects = (tmp_path / "out.h5.rejects.tsv").read_text().splitlines()
    assert rejects == ["id\tline\treason", "r5\t11\trefused: items[0].sequence: holds QQQQ"]
    assert "11 records (" in capsys.readouterr().err


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

    assert main(argv) == 2

    # The first window (one request of 8) is refused; the later windows are never sent.
    assert capsys.readouterr().err.splitlines() == [
        "error: INVALID_ARGUMENT: 1 violation:",
        "  items[2].sequence (record 's2', line 5): holds QQQQ",
    ]
    assert servicer.requests == []


def test_unreachable_server_is_reported_without_traceback(capsys):
    assert main(["status", "--target", "127.0.0.1:1", "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE: ") and "Traceback" not in err
    assert "cannot reach the service at 127.0.0.1:1: " in err
    assert "is `esm2 serve` (or `esm2 server`) running on that port?" in err
    assert "--target HOST:PORT, or $ESM2_TARGET" in err


def test_an_http1_port_is_named_as_not_grpc(http1_port, capsys):
    assert main(["status", "--target", f"127.0.0.1:{http1_port}", "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the service at 127.0.0.1:{http1_port}: that port speaks HTTP/1" in err
    assert "not gRPC (likely the HTTP door, `esm2 http`)" in err


@pytest.mark.parametrize(
    ("argv", "violation"),
    [
        (["predict", "--sequence", "MKTAYIAKRQ"], "items[0].sequence (record 'seq1'): no <mask>"),
        (["score", "--wt", "MKV", "--variants", "{csv}"], "variants[0] (CSV line 2): A1G: the"),
    ],
)
def test_input_the_client_refuses_exits_2_like_any_bad_input(tmp_path, capsys, argv, violation):
    csv = tmp_path / "variants.csv"
    csv.write_text("mutant\nA1G\n")
    argv = [arg.format(csv=csv) for arg in argv]

    assert main([*argv, "--target", "127.0.0.1:1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT: 1 violation:\n")
    assert violation in err


def test_lowercase_residues_are_sent_uppercased(fake_server, capsys):
    target, servicer = fake_server
    argv = ["predict", "--sequence", "mk<mask>ay", "--target", target, "--no-progress"]

    assert main(argv) == 0
    assert servicer.requests == [["MK<mask>AY"]]


def test_missing_output_folder_exits_2_before_any_request(fasta, tmp_path, capsys):
    output = tmp_path / "absent" / "out.h5"

    assert main(["encode", fasta, "-o", str(output), "--target", "127.0.0.1:1"]) == 2
    assert f"{output}: no such directory to write into" in capsys.readouterr().err


def test_a_heatmap_without_matplotlib_exits_2_before_any_request(tmp_path, capsys, monkeypatch):
    from esm2_service.client import cli_score

    real_find_spec = cli_score.importlib.util.find_spec
    monkeypatch.setattr(
        cli_score.importlib.util,
        "find_spec",
        lambda name, *rest: None if name == "matplotlib" else real_find_spec(name, *rest),
    )
    png = tmp_path / "scan.png"
    argv = ["score", "--wt", "MKV", "--scan", "--heatmap", str(png), "--target", "127.0.0.1:1"]

    assert main(argv) == 2  # not 1: the unreachable target was never tried
    assert "--heatmap needs matplotlib, which this environment lacks" in capsys.readouterr().err
    assert not png.exists()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("MKV\n>a\nM<mask>V\n", "in.fasta:1: sequence text before the first '>' header"),
        (">a\nM<mask>V\n>b\n", "in.fasta:3: record 'b' has no sequence"),
        ("\n", "in.fasta: no FASTA records"),
    ],
)
def test_bad_fasta_for_predict_exits_2(tmp_path, capsys, text, error):
    path = tmp_path / "in.fasta"
    path.write_text(text, encoding="utf-8")

    assert main(["predict", str(path)]) == 2
    assert error in capsys.readouterr().err


def test_a_sequence_typed_where_predicts_fasta_file_goes_is_pointed_to_sequence(capsys):
    assert main(["predict", "MKT<mask>A", "--target", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err == (
        "error: MKT<mask>A: no such FASTA file; to send a sequence itself, use --sequence SEQ\n"
    )


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["-o", "out.npz"], "out.npz: esm2 encode writes HDF5; name the output .h5"),
        (
            ["--long", "windows", "--window", "100", "--overlap", "100"],
            "need 0 <= overlap < window",
        ),
        (["--long", "windows", "--include", "mean,contacts"], "cannot merge contacts across"),
        (["--layers", "9"], "params.repr_layers[0]: layer 9 is outside -7..6"),
    ],
)
def test_bad_encode_settings_exit_2_before_any_request(fasta, tmp_path, capsys, argv, error):
    argv = ["-o", str(tmp_path / "out.h5"), *argv] if "-o" not in argv else argv
    assert main(["encode", fasta, *argv, "--target", "127.0.0.1:1"]) == 2
    assert error in capsys.readouterr().err


def test_encode_of_a_file_without_records_exits_2(tmp_path, capsys):
    path = tmp_path / "in.fasta"
    path.write_text("\n")
    assert main(["encode", str(path), "-o", str(tmp_path / "out.h5")]) == 2
    assert "in.fasta: no FASTA records" in capsys.readouterr().err


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
