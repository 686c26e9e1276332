"""`esm2 encode` against live processes: HDF5 output equal to fair-esm, the rules for
bad records, long-sequence windows, and resuming after Ctrl-C or a crash."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
from support import DATA_DIR, ESM2, assert_close, esm2, fair_esm_outputs, read_fasta_records

from esm2_service.alphabet import VOCAB_TOKENS


def encode(service, fasta, out, *options):
    return esm2("encode", fasta, "-o", out, "--target", service.target, "--no-progress", *options)


def test_encode_a_real_fasta_to_hdf5_keyed_by_record_id(service, tiny_reference, tmp_path):
    out = tmp_path / "few.h5"
    result = encode(
        service, DATA_DIR / "few_proteins.fasta", out, "--include", "mean,per_token,contacts",
        "--layers", "-1,0",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    records = read_fasta_records("few_proteins.fasta")
    assert f"{len(records)} records (" in result.stderr and "written to" in result.stderr
    with h5py.File(out) as file:
        assert file.attrs["records"] == len(records)
        assert list(file.attrs["vocab_tokens"]) == list(VOCAB_TOKENS)
        job = json.loads(file.attrs["job"])
        assert (job["include"], job["layers"]) == (["mean", "per_token", "contacts"], [-1, 0])
        assert len(job["checkpoint_sha256"]) == 64
        for index, (record_id, sequence) in enumerate(records):
            group = file[record_id]
            assert (group.attrs["id"], group.attrs["index"]) == (record_id, index)
            assert group.attrs["length"] == len(sequence)
            expected = fair_esm_outputs(tiny_reference, sequence, layers=(0, 6))
            assert_close(group["mean/layer6"][:], expected["mean"][6])
            assert_close(group["per_token/layer0"][:], expected["per_token"][0])
            assert_close(group["contacts"][:], expected["contacts"])
            assert sorted(group) == ["contacts", "mean", "per_token"]
    assert not (tmp_path / "few.h5.partial").exists()
    assert not (tmp_path / "few.h5.rejects.tsv").exists()


def test_bad_records_are_listed_and_the_rest_is_encoded(service, tiny_reference, tmp_path):
    fasta = tmp_path / "mixed.fasta"
    fasta.write_text(
        "MKV\n"  # line 1: before any header
        ">ok one\nMKTAYIAKQR\n"
        ">lower\nmktayIAKQR*\n"  # uppercased, the stop dropped
        ">ok\nMKV\n"  # duplicate id
        ">empty\n"
        ">star\nMK*V\n"
        ">digit\nMK1V\n"
        ">  \nMKV\n"  # line 13: no id
        f">long\n{'A' * 2049}\n"
        ">a/b%c\nACDEFGHIK\n"
    )
    out = tmp_path / "mixed.h5"

    result = encode(service, fasta, out)

    assert result.returncode == 3, result.stderr
    accepted = "(accepted: ACDEFGHIKLMNPQRSTVWY, XBUZO, '-'; lowercase is uppercased, "
    accepted += "one trailing '*' dropped)"
    assert (tmp_path / "mixed.h5.rejects.tsv").read_text().splitlines() == [
        "id\tline\treason",
        "\t1\tsequence text before the first '>' header",
        "ok\t6\tduplicate id (first at line 2)",
        "empty\t8\tempty sequence",
        f"star\t9\tcharacter '*' at position 3 is not accepted {accepted}",
        f"digit\t11\tcharacter '1' at position 3 is not accepted {accepted}",
        "\t13\theader without an id",
        "long\t15\t2,049 residues; the limit is 2,048 (--long windows splits it)",
    ]
    assert "3 records (" in result.stderr and "7 rejected, listed in" in result.stderr
    with h5py.File(out) as file:
        assert sorted(file) == ["a%2Fb%25c", "lower", "ok"]
        assert file["a%2Fb%25c"].attrs["id"] == "a/b%c"
        expected = fair_esm_outputs(tiny_reference, "MKTAYIAKQR", layers=(6,))["mean"][6]
        assert_close(file["lower/mean/layer6"][:], expected)
        assert_close(file["ok/mean/layer6"][:], expected)


def test_long_sequences_are_embedded_as_averaged_overlapping_windows(
    service, tiny_reference, tmp_path
):
    sequence = "".join(sequence for _, sequence in read_fasta_records("some_proteins.fasta"))
    sequence = sequence[:2300]
    (tmp_path / "long.fasta").write_text(f">long\n{sequence}\n")
    out = tmp_path / "long.h5"

    result = encode(
        service, tmp_path / "long.fasta", out, "--long", "windows", "--window", "1000",
        "--overlap", "100", "--include", "mean,per_token,logits,bos",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    starts = [0, 900, 1300]  # every 900 residues, the last flush with the end
    windows = [fair_esm_outputs(tiny_reference, sequence[s : s + 1000], (6,)) for s in starts]
    dims = windows[0]["per_token"][6].shape[1]
    total, coverage = np.zeros((2300, dims)), np.zeros((2300, 1))
    logits = np.zeros((2300, 33))
    for start, window in zip(starts, windows, strict=True):
        total[start : start + 1000] += window["per_token"][6]
        logits[start : start + 1000] += window["logits"]
        coverage[start : start + 1000] += 1
    with h5py.File(out) as file:
        group = file["long"]
        assert (group.attrs["length"], group.attrs["windows"]) == (2300, 3)
        assert_close(group["per_token/layer6"][:], total / coverage)
        assert_close(group["mean/layer6"][:], (total / coverage).mean(0))
        assert_close(group["logits"][:], logits / coverage)
        assert_close(group["bos/layer6"][:], np.mean([w["bos"][6] for w in windows], axis=0))


def many_records(path, count: int) -> list[tuple[str, str]]:
    """`count` short real sequences (pieces of tests/data proteins) with unique ids."""
    text = "".join(sequence for _, sequence in read_fasta_records("some_proteins.fasta"))
    records = [(f"r{i}", text[i * 7 % 5000 : i * 7 % 5000 + 30 + i % 50]) for i in range(count)]
    path.write_text("".join(f">{rid}\n{sequence}\n" for rid, sequence in records))
    return records


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "crash"])
def test_an_interrupted_job_resumes_without_recomputing_what_is_written(service, tmp_path, stop):
    fasta = tmp_path / "many.fasta"
    records = many_records(fasta, 5000)  # long enough to be stopped midway on a busy host
    out = tmp_path / "many.h5"
    argv = [*ESM2, "encode", fasta, "-o", out, "--target", service.target, "--no-progress"]
    argv += ["--shard-records", "100", "--concurrency", "2"]
    first = subprocess.Popen(list(map(str, argv)), stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "many.h5.partial"
    deadline = time.monotonic() + 120
    while len(list(partial.glob("shard-*.h5"))) < 2 and time.monotonic() < deadline:
        assert first.poll() is None, first.stderr.read()
        time.sleep(0.02)
    first.send_signal(stop)
    first_err = first.communicate(timeout=60)[1]
    assert first.returncode != 0
    assert not out.exists()
    if stop == signal.SIGINT:
        assert "run the same command again to continue" in first_err
    written = sum(len(h5py.File(shard, "r")) for shard in partial.glob("shard-*.h5"))
    assert 200 <= written < len(records)

    second = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=300)

    assert second.returncode == 0, second.stderr
    assert f"{written:,} already written by an earlier run" in second.stderr
    assert f"{len(records) - written:,} records (" in second.stderr
    with h5py.File(out) as file:
        assert sorted(file) == sorted(record_id for record_id, _ in records)
        assert file.attrs["records"] == len(records)
        for record_id, sequence in records[::500]:
            assert file[record_id].attrs["length"] == len(sequence)
    assert not partial.exists()


def test_resuming_with_other_settings_or_another_fasta_is_refused(service, tmp_path):
    fasta = tmp_path / "few.fasta"
    many_records(fasta, 20)
    out = tmp_path / "few.h5"
    partial = tmp_path / "few.h5.partial"
    partial.mkdir()
    h5py.File(partial / "shard-000000.h5", "w").close()  # a job without records is not kept
    (partial / "job.json").write_text(
        json.dumps(
            {"format": "esm2-service encode v1", "include": ["mean"], "layers": [-1],
             "dtype": "float32", "long": "reject"}
        )
    )  # fmt: skip

    changed = encode(service, fasta, out, "--include", "mean,bos")

    assert changed.returncode == 2
    assert "include was ['mean'], now ['mean', 'bos']" in changed.stderr
    assert encode(service, fasta, out).returncode == 0
    fasta.write_text(fasta.read_text().replace(">r3\n", ">r3\nW"))
    again = encode(service, fasta, out)  # a finished job is not recomputed
    assert again.returncode == 0 and "is complete; nothing to do" in again.stderr


def test_an_unreachable_service_is_named_at_once_and_ctrl_c_leaves_nothing(tmp_path):
    from esm2_service.server.embedded_redis import free_port

    fasta = tmp_path / "few.fasta"
    many_records(fasta, 20)
    target = f"127.0.0.1:{free_port()}"
    argv = [*ESM2, "encode", fasta, "-o", tmp_path / "few.h5", "--target", target]
    job = subprocess.Popen([*map(str, argv), "--no-progress"], stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    first_line = job.stderr.readline()
    seconds = time.monotonic() - started
    job.send_signal(signal.SIGINT)
    err = job.communicate(timeout=30)[1]

    assert f"cannot reach the service at {target}: nothing listens there" in first_line
    assert "retrying for up to 60 s" in first_line
    assert seconds < 20  # the interpreter's start, then the first refused connection
    assert job.returncode == 130
    assert "stopped before any record was written" in err and "kept" not in err
    assert list(tmp_path.iterdir()) == [fasta]


def test_a_changed_record_stops_a_resumed_job(service, tmp_path):
    fasta = tmp_path / "many.fasta"
    records = many_records(fasta, 300)
    out = tmp_path / "many.h5"
    argv = ["--shard-records", "100"]
    assert encode(service, fasta, out, *argv).returncode == 0
    # make it unfinished again: the shards are what a resumed job reads
    out.unlink()
    partial = tmp_path / "many.h5.partial"
    partial.mkdir()
    with h5py.File(partial / "shard-000000.h5", "w") as shard:
        group = shard.create_group("r3")
        group.attrs.update({"id": "r3", "checksum": 1})
    (partial / "job.json").write_text(
        json.dumps(
            {"format": "esm2-service encode v1", "include": ["mean"], "layers": [-1],
             "dtype": "float32", "long": "reject"}
        )
    )  # fmt: skip

    result = encode(service, fasta, out, *argv)

    assert result.returncode == 2
    assert "record 'r3' (line 7) has changed since it was written" in result.stderr
    assert len(records) == 300


def test_a_lost_connection_is_retried_and_the_job_still_finishes(
    redis_server, tiny_checkpoint, tmp_path
):
    """The frontend dies mid-job and comes back on the same port a moment later: the
    requests that failed are sent again and every record is written once."""
    import redis as redis_py
    from conftest import ServiceProcesses

    from esm2_service.server.embedded_redis import free_port

    with redis_py.Redis.from_url(redis_server.url) as db:
        db.flushdb()
    port = free_port()
    service = ServiceProcesses(redis_server.url, tiny_checkpoint, server_args=["--port", str(port)])
    fasta = tmp_path / "many.fasta"
    records = many_records(fasta, 5000)  # long enough to be stopped midway on a busy host
    out = tmp_path / "many.h5"
    argv = [*ESM2, "encode", fasta, "-o", out, "--target", service.target, "--no-progress"]
    try:
        service.wait_serving()
        job = subprocess.Popen(
            list(map(str, [*argv, "--concurrency", "2"])), stderr=subprocess.PIPE, text=True
        )
        partial = tmp_path / "many.h5.partial"
        deadline = time.monotonic() + 120
        while not list(partial.glob("shard-*.h5")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.poll() is None, "the job ended before the frontend was killed"
        service.frontend.kill()
        service.frontend.wait()
        service.frontend.stdout.close()
        time.sleep(1.5)
        service.frontend = service._spawn("esm2_service.server", ["--port", str(port)])
        assert service._read_port(service.frontend) == port
        err = job.communicate(timeout=300)[1]
    finally:
        service.stop()

    assert job.returncode == 0, err
    with h5py.File(out) as file:
        assert sorted(file) == sorted(record_id for record_id, _ in records)
