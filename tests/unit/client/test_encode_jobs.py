"""`esm2 encode` jobs against a fake or absent service: what an unreachable service
prints, what a job that wrote nothing leaves behind, and records keyed by accession."""

from __future__ import annotations

import json

import h5py
import pytest

from esm2_service.client import bulk
from esm2_service.client.cli import main

UNIPROT_FASTA = (
    ">sp|P00698|LYSC_CHICK Lysozyme C\nMKV\n"
    ">tr|Q9XYZ1|Q9XYZ1_HUMAN\nMKVL\n"
    ">plain description\nMKVLA\n"
    ">sp|P00698|LYSC_OTHER\nMKVLAG\n"  # line 7: the same accession again
)
OLD_JOB = {
    "format": "esm2-service encode v1",
    "include": ["mean"],
    "layers": [-1],
    "dtype": "float32",
    "long": "reject",
}


def encode(fasta, output, target, *options) -> int:
    argv = ["encode", str(fasta), "-o", str(output), "--target", target, "--no-progress"]
    return main([*argv, *options])


def write_partial_job(output, job: dict, with_shard: bool) -> None:
    """`output`.partial as a run of `job` left it: with a (here empty) shard, or none."""
    partial = output.with_name(output.name + ".partial")
    partial.mkdir()
    (partial / "job.json").write_text(json.dumps(job))
    if with_shard:
        h5py.File(partial / "shard-000000.h5", "w").close()


@pytest.fixture
def fasta(tmp_path):
    path = tmp_path / "in.fasta"
    path.write_text("".join(f">r{i}\nMKV{'A' * i}\n" for i in range(40)))
    return path


def test_an_unreachable_service_is_named_at_once_and_no_kept_records_are_claimed(
    fasta, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(bulk, "RETRY_PAUSES_S", (0.01, 0.02))
    output = tmp_path / "out.h5"

    assert encode(fasta, output, "127.0.0.1:1", "--concurrency", "4") == 1

    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("esm2 encode: cannot reach the service at 127.0.0.1:1: ")
    assert lines[0].endswith("; retrying for up to 0.03 s (Ctrl-C stops; the same command "
                             "continues later)")  # fmt: skip
    assert sum("retrying for up to" in line for line in lines) == 1  # not once per request
    assert "esm2 encode: stopped before any record was written" in lines
    assert not any("kept in" in line for line in lines)
    assert not (tmp_path / "out.h5.partial").exists()


def test_a_call_cancelled_before_the_service_took_it_is_sent_again(
    fake_server, fasta, tmp_path, monkeypatch
):
    """gRPC cancels the calls that reach a stopping frontend before a handler takes them."""
    monkeypatch.setattr(bulk, "RETRY_PAUSES_S", (0.01,))
    target, servicer = fake_server
    servicer.calls_to_cancel = 1
    output = tmp_path / "out.h5"

    assert encode(fasta, output, target, "--concurrency", "1") == 0

    assert servicer.methods[:2] == ["EncodePacked", "EncodePacked"]  # the first one again
    with h5py.File(output) as data:
        assert len(data) == 40


def test_a_cancelled_call_the_service_had_taken_stops_the_job(
    fake_server, fasta, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(bulk, "RETRY_PAUSES_S", (0.01,))
    target, servicer = fake_server
    servicer.calls_to_cancel, servicer.cancel_with_request_id = 1, True

    assert encode(fasta, tmp_path / "out.h5", target, "--concurrency", "1") == 1

    assert servicer.methods == ["EncodePacked"]
    assert "CANCELLED" in capsys.readouterr().err


def test_a_fasta_without_records_leaves_no_partial_job(tmp_path, capsys):
    empty = tmp_path / "empty.fasta"
    empty.write_text("\n")

    assert encode(empty, tmp_path / "e.h5", "127.0.0.1:1") == 2

    assert "empty.fasta: no FASTA records" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [empty]


def test_a_partial_job_without_records_does_not_block_other_settings(fake_server, fasta, tmp_path):
    target, _ = fake_server
    output = tmp_path / "out.h5"
    write_partial_job(output, OLD_JOB, with_shard=False)  # as older versions left it

    assert encode(fasta, output, target, "--include", "mean,per_token") == 0

    with h5py.File(output) as data:
        assert json.loads(data.attrs["job"])["include"] == ["mean", "per_token"]
        assert sorted(data["r3"]) == ["mean", "per_token"]
    assert not (tmp_path / "out.h5.partial").exists()


def test_records_are_keyed_by_accession_and_a_repeated_one_is_rejected(
    fake_server, tmp_path, capsys
):
    target, _ = fake_server
    path = tmp_path / "uniprot.fasta"
    path.write_text(UNIPROT_FASTA)
    output = tmp_path / "out.h5"

    assert encode(path, output, target, "--key", "accession") == 3

    with h5py.File(output) as data:
        assert sorted(data) == ["P00698", "Q9XYZ1", "plain"]
        assert data["P00698"].attrs["id"] == "P00698"
        assert data["P00698"].attrs["length"] == 3  # the first record keeps the key
        assert json.loads(data.attrs["job"])["key"] == "accession"
    assert (tmp_path / "out.h5.rejects.tsv").read_text().splitlines() == [
        "id\tline\treason",
        "sp|P00698|LYSC_OTHER\t7\tduplicate accession P00698 (first at line 1)",
    ]
    assert "1 rejected" in capsys.readouterr().err


def test_records_are_keyed_by_the_headers_first_word_by_default(fake_server, tmp_path):
    target, _ = fake_server
    path = tmp_path / "uniprot.fasta"
    path.write_text(UNIPROT_FASTA)
    output = tmp_path / "out.h5"

    assert encode(path, output, target) == 0

    with h5py.File(output) as data:
        assert sorted(data) == [
            "plain",
            "sp|P00698|LYSC_CHICK",
            "sp|P00698|LYSC_OTHER",
            "tr|Q9XYZ1|Q9XYZ1_HUMAN",
        ]


@pytest.mark.parametrize(
    ("written_key", "options", "change"),
    [
        ("accession", [], "key was 'accession', now 'id'"),
        (None, ["--key", "accession"], "key was 'id', now 'accession'"),  # a job from before
        ("id", ["--key", "accession"], "key was 'id', now 'accession'"),
    ],
)
def test_resuming_with_another_key_is_refused(
    fasta, tmp_path, capsys, written_key, options, change
):
    output = tmp_path / "out.h5"
    job = OLD_JOB if written_key is None else {**OLD_JOB, "key": written_key}
    write_partial_job(output, job, with_shard=True)

    assert encode(fasta, output, "127.0.0.1:1", *options) == 2

    assert change in capsys.readouterr().err


def test_a_job_from_before_the_key_option_resumes_with_the_default_key(
    fake_server, fasta, tmp_path
):
    target, _ = fake_server
    output = tmp_path / "out.h5"
    write_partial_job(output, OLD_JOB, with_shard=True)

    assert encode(fasta, output, target) == 0

    with h5py.File(output) as data:
        assert len(data) == 40
