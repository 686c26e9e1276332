"""FASTA reading for the `esm2` command line: streaming, with each record's line."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

PathLike = str | os.PathLike[str]


class FastaRecord(NamedTuple):
    id: str  # the first word of the header, after ">"
    sequence: str
    line: int  # the header's line number, from 1


class FastaProblem(NamedTuple):
    """Text that is not a record: before the first header, or a header without an id."""

    line: int
    description: str


def accession(record_id: str) -> str:
    """The middle field of a `db|ACCESSION|NAME` id, as UniProt writes them
    (`sp|P00698|LYSC_CHICK` -> `P00698`); any other id as it is."""
    fields = record_id.split("|")
    return fields[1] if len(fields) == 3 and fields[1] else record_id


def iter_fasta(path: PathLike) -> Iterator[FastaRecord | FastaProblem]:
    """The records of a FASTA file in file order, read line by line (memory holds one
    record at a time), and a FastaProblem where the text is not a record.

    The id is the first word of the header line after ">". A sequence may span
    several lines; all whitespace is removed and letters are kept as written. Blank
    lines are skipped. A record may have an empty sequence.
    """
    header_line = 0
    record_id: str | None = None
    parts: list[str] = []
    seen_header = False
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.startswith(">"):
                if record_id is not None:
                    yield FastaRecord(record_id, "".join(parts), header_line)
                words = line[1:].split()
                record_id = words[0] if words else None
                header_line, parts, seen_header = number, [], True
                if record_id is None:  # its sequence lines are skipped with it
                    yield FastaProblem(number, "header without an id")
            elif line.strip():
                if record_id is not None:
                    parts.append("".join(line.split()))
                elif not seen_header:
                    yield FastaProblem(number, "sequence text before the first '>' header")
                    seen_header = True  # reported once
    if record_id is not None:
        yield FastaRecord(record_id, "".join(parts), header_line)


def read_fasta(path: PathLike) -> list[FastaRecord]:
    """Every record of a small FASTA file, in file order.

    Raises:
        ValueError: text that is not a record, or a record without sequence, naming
            the line number (from 1).
    """
    records = []
    for entry in iter_fasta(path):
        if isinstance(entry, FastaProblem):
            raise ValueError(f"{path}:{entry.line}: {entry.description}")
        if not entry.sequence:
            raise ValueError(f"{path}:{entry.line}: record {entry.id!r} has no sequence")
        records.append(entry)
    return records
