"""Where `esm2 encode` writes: an HDF5 file keyed by record id, built from shards so
that an interrupted job never leaves a corrupt file and resumes where it stopped.

While a job runs, results go to `OUT.partial/`: `job.json` (the settings, the
service's checkpoint, the format) and shard files `shard-NNNNNN.h5` of up to
`SHARD_RECORDS` records or `SHARD_BYTES` bytes. Each shard is written under a
temporary name and renamed into place once complete, so a crash, a Ctrl-C or a lost
connection loses at most the records not yet in a shard, never a written one. When
every record is done, the shards are merged into `OUT.tmp`, renamed to `OUT`, and
the folder is removed. The folder appears with the first shard: a job that wrote no
record leaves nothing behind, and a folder without a shard (left by an older version)
is discarded rather than resumed.

The file's layout is H5_LAYOUT.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

FORMAT = "esm2-service encode v1"
H5_LAYOUT = """\
output HDF5 layout: one group per record, named by its key (--key: the FASTA id, or its
accession), "%" written "%25", "/" "%2F"; L is a resolved layer 0-6:
  ID/mean/layerL        [320]           mean over residues     (--include mean)
  ID/per_token/layerL   [len, 320]      one row per residue    (--include per_token)
  ID/bos/layerL         [320]           the <cls> position     (--include bos)
  ID/contacts           [len, len]                             (--include contacts)
  ID/logits             [len, 33]       columns: vocab_tokens  (--include logits)
  ID/attentions         [20, len, len]  last layer             (--include attentions)
  ID attributes: id (its key), index (place among the FASTA's records), line, length, windows
  file attributes: job (settings, JSON), vocab_tokens, records
arrays are float32, or float16 with --dtype float16.
read with: f = h5py.File(OUT); f["P12345"]["mean/layer6"][:]
a UniProt record >sp|P12345|NAME is keyed sp|P12345|NAME; with --key accession, P12345"""
SHARD_RECORDS = 1000
SHARD_BYTES = 64 * 1024 * 1024
# Settings added to the job after the format's first files: what a job without them had.
IMPLIED_SETTINGS = {"key": "id"}


class JobMismatch(Exception):
    """The output belongs to a job with other settings (or from other weights)."""


def escape_id(record_id: str) -> str:
    escaped = record_id.replace("%", "%25").replace("/", "%2F")
    return "%2E" + escaped[1:] if escaped in (".", "..") else escaped


class ShardedStore:
    """The shards of one job; `job` is a JSON-able dict of everything that must not
    change between a job and its resumption."""

    def __init__(
        self, output: str | os.PathLike[str], job: dict, shard_records: int = SHARD_RECORDS
    ):
        self.output = Path(output)
        self.shard_records = shard_records
        self.folder = self.output.with_name(self.output.name + ".partial")
        self.job = {"format": FORMAT, **job}
        self._buffer: list[tuple[dict, dict[str, np.ndarray]]] = []
        self._buffered_bytes = 0
        self._job_saved = False

    def finished(self) -> bool:
        """The output exists and was made by this job's settings (else JobMismatch)."""
        if not self.output.exists():
            return False
        with h5py.File(self.output, "r") as file:
            written = json.loads(file.attrs.get("job", "{}"))
        self._check(written, f"{self.output} was written")
        return True

    def open(self) -> dict[str, int]:
        """Starts or resumes the job: the ids already written, with their checksums."""
        if not self.holds_records():
            self._discard_empty_folder()
            return {}
        written = json.loads((self.folder / "job.json").read_text())
        self._check(written, f"{self.folder} holds a job")
        self.job = {**written, **self.job}  # keeps the recorded checkpoint
        self._job_saved = True
        for stale in self.folder.glob("*.tmp"):
            stale.unlink()
        done = {}
        for shard in self._shards():
            with h5py.File(shard, "r") as file:
                for group in file.values():
                    done[group.attrs["id"]] = int(group.attrs["checksum"])
        return done

    def check_model(self, checkpoint_sha256: str) -> None:
        """Records the service's checkpoint on the first result; refuses another later."""
        known = self.job.get("checkpoint_sha256")
        if known is None:
            self.job["checkpoint_sha256"] = checkpoint_sha256
            self._job_saved = False
        elif known != checkpoint_sha256:
            raise JobMismatch(
                f"the service now runs other weights (checkpoint {checkpoint_sha256[:12]}, "
                f"the job's is {known[:12]}): finish with the same weights, or start anew "
                f"(delete {self.folder})"
            )

    def add(self, attributes: dict, arrays: dict[str, np.ndarray]) -> None:
        self._buffer.append((attributes, arrays))
        self._buffered_bytes += sum(array.nbytes for array in arrays.values())
        if len(self._buffer) >= self.shard_records or self._buffered_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        """Writes the buffered records as one new shard, atomically."""
        if not self._buffer:
            return
        self.folder.mkdir(exist_ok=True)
        if not self._job_saved:
            self._save_job()
        number = len(list(self._shards()))
        final = self.folder / f"shard-{number:06d}.h5"
        temporary = final.with_suffix(".h5.tmp")
        with h5py.File(temporary, "w") as file:
            for attributes, arrays in self._buffer:
                _write_record(file, attributes, arrays)
        _fsync(temporary)
        os.replace(temporary, final)
        self._buffer, self._buffered_bytes = [], 0

    def finish(self, vocab_tokens: list[str]) -> int:
        """Merges the shards into the output file; returns the records it holds."""
        self.flush()
        temporary = self.output.with_name(self.output.name + ".tmp")
        records = 0
        with h5py.File(temporary, "w", libver="latest") as merged:
            merged.attrs["job"] = json.dumps(self.job, sort_keys=True)
            merged.attrs["vocab_tokens"] = vocab_tokens
            for shard in self._shards():
                with h5py.File(shard, "r") as file:
                    for name in file:
                        file.copy(file[name], merged, name)
                        records += 1
            merged.attrs["records"] = records
        _fsync(temporary)
        os.replace(temporary, self.output)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        return records

    def holds_records(self) -> bool:
        """Whether the folder holds a shard: records of this job or an earlier run's."""
        return any(self._shards())

    def _shards(self) -> Iterator[Path]:
        return iter(sorted(self.folder.glob("shard-*.h5")))

    def _save_job(self) -> None:
        temporary = self.folder / "job.json.tmp"
        temporary.write_text(json.dumps(self.job, indent=2))
        os.replace(temporary, self.folder / "job.json")
        self._job_saved = True

    def _discard_empty_folder(self) -> None:
        """Removes what a job that wrote no shard left; a folder with other files stays."""
        if not self.folder.is_dir():
            return
        for leftover in [self.folder / "job.json", *self.folder.glob("*.tmp")]:
            leftover.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.folder.rmdir()

    def _check(self, written: dict, where: str) -> None:
        written = {**IMPLIED_SETTINGS, **written}
        changed = [
            f"{key} was {written.get(key)!r}, now {value!r}"
            for key, value in self.job.items()
            if key != "checkpoint_sha256" and written.get(key) != value
        ]
        if changed:
            raise JobMismatch(
                f"{where} with other settings ({'; '.join(changed)}): rerun with those "
                f"settings, or write elsewhere (or delete it) to start anew"
            )


def _write_record(file: h5py.File, attributes: dict, arrays: dict[str, np.ndarray]) -> None:
    group = file.create_group(escape_id(attributes["id"]))
    for key, value in attributes.items():
        group.attrs[key] = value
    for name, array in arrays.items():
        group.create_dataset(name, data=array)


def _fsync(path: Path) -> None:
    with open(path, "rb") as file, contextlib.suppress(OSError):
        os.fsync(file.fileno())
