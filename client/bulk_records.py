"""The rules `esm2 encode` applies to each FASTA record, and long-sequence windows.

Rules, in order (README "Bulk encode" states them for users):
- letters are uppercased (soft-masked lowercase is common in FASTA files);
- one trailing `*` (a stop codon) is dropped;
- rejected, with the reason: a header without an id, sequence text before the first
  header, an empty sequence, a character the service does not accept (a `*` inside
  the sequence, digits, J, ...), a key seen before in the file (the first is kept),
  and a sequence over 2,048 residues unless long sequences are split into windows.

Each record is stored under its key: its id (the header's first word), or with
`--key accession`, the accession in a `db|ACCESSION|NAME` id.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from esm2_service.alphabet import ACCEPTED_CHARACTERS, uppercase_residues
from esm2_service.validation import MAX_TOKENS

from .fasta import FastaProblem, FastaRecord, accession

# Windows of 1,022 residues are 1,024 tokens with <cls> and <eos>: the crops ESM-2 was
# trained on.
DEFAULT_WINDOW = 1022
DEFAULT_OVERLAP = 256


def _header_id(record_id: str) -> str:
    return record_id


# --key: what each record is stored under, made from its id.
RECORD_KEYS: dict[str, Callable[[str], str]] = {"id": _header_id, "accession": accession}


@dataclass(frozen=True)
class Reject:
    id: str  # the FASTA id (not the key); "" where the text had no id
    line: int
    reason: str


@dataclass(frozen=True)
class Accepted:
    id: str  # the key the record is stored under (see RECORD_KEYS)
    sequence: str  # as the service receives it: uppercase, no trailing '*'
    line: int
    index: int  # the record's place among the file's records, from 0

    @property
    def checksum(self) -> int:
        """Tells a resumed job whether a record already written still has this sequence."""
        return zlib.crc32(self.sequence.encode())


def screen(
    entries: Iterable[FastaRecord | FastaProblem], allow_long: bool, key: str = "id"
) -> Iterator[Accepted | Reject]:
    """Each FASTA entry, accepted (cleaned) or rejected, in file order; `key` names
    the RECORD_KEYS rule that makes each record's key from its id."""
    key_of = RECORD_KEYS[key]
    first_line: dict[str, int] = {}  # key -> line of its first record
    index = -1
    for entry in entries:
        if isinstance(entry, FastaProblem):
            yield Reject("", entry.line, entry.description)
            continue
        index += 1
        record_key = key_of(entry.id)
        if record_key in first_line:
            yield Reject(entry.id, entry.line, _duplicate(key, record_key, first_line))
            continue
        first_line[record_key] = entry.line
        sequence = uppercase_residues(entry.sequence)
        if sequence.endswith("*"):
            sequence = sequence[:-1]
        problem = _problem(sequence, allow_long)
        if problem:
            yield Reject(entry.id, entry.line, problem)
        else:
            yield Accepted(record_key, sequence, entry.line, index)


def _duplicate(key: str, record_key: str, first_line: dict[str, int]) -> str:
    first = f"first at line {first_line[record_key]}"
    return f"duplicate id ({first})" if key == "id" else f"duplicate {key} {record_key} ({first})"


def _problem(sequence: str, allow_long: bool) -> str | None:
    if not sequence:
        return "empty sequence"
    for position, character in enumerate(sequence, start=1):
        if character not in ACCEPTED_CHARACTERS:
            return (
                f"character {character!r} at position {position} is not accepted "
                "(accepted: ACDEFGHIKLMNPQRSTVWY, XBUZO, '-'; lowercase is uppercased, "
                "one trailing '*' dropped)"
            )
    if len(sequence) > MAX_TOKENS and not allow_long:
        return f"{len(sequence):,} residues; the limit is {MAX_TOKENS:,} (--long windows splits it)"
    return None


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Where each window of a `length`-residue sequence starts: every `window - overlap`
    residues, the last one flush with the end. One window when the sequence fits."""
    if length <= window:
        return [0]
    stride = window - overlap
    starts = list(range(0, length - window, stride))
    return [*starts, length - window]


def merge_windows(length: int, starts: list[int], per_window: list[np.ndarray]) -> np.ndarray:
    """Per-residue arrays ([window length, ...]) of overlapping windows -> one
    [length, ...] array, averaged where windows overlap."""
    total = np.zeros((length, *per_window[0].shape[1:]), dtype=np.float64)
    coverage = np.zeros(length)
    for start, values in zip(starts, per_window, strict=True):
        total[start : start + len(values)] += values
        coverage[start : start + len(values)] += 1
    shape = (length,) + (1,) * (total.ndim - 1)
    return (total / coverage.reshape(shape)).astype(per_window[0].dtype)
