"""A small FASTA reader for the `esm2` command line."""

from __future__ import annotations

import os
from typing import NamedTuple


class FastaRecord(NamedTuple):
    id: str  # the first word of the header, after ">"
    sequence: str
    line: int  # the header's line number, from 1


def read_fasta(path: str | os.PathLike[str]) -> list[FastaRecord]:
    """The records of a FASTA file, in file order.

    The id is the first word of the header line after ">". A sequence may span
    several lines; all whitespace is removed and letters are kept as written.
    Blank lines are skipped; an empty file gives [].

    Raises:
        ValueError: text before the first header, a header without an id, or a
            record without sequence, naming the line number (from 1).
    """
    records: list[FastaRecord] = []
    header_line = 0
    record_id: str | None = None
    parts: list[str] = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.startswith(">"):
                if record_id is not None:
                    records.append(_record(path, header_line, record_id, parts))
                record_id, header_line, parts = _header_id(path, number, line), number, []
            elif line.strip():
                if record_id is None:
                    raise ValueError(f"{path}:{number}: sequence text before the first '>' header")
                parts.append("".join(line.split()))
    if record_id is not None:
        records.append(_record(path, header_line, record_id, parts))
    return records


def _header_id(path: str | os.PathLike[str], number: int, line: str) -> str:
    words = line[1:].split()
    if not words:
        raise ValueError(f"{path}:{number}: header without an id")
    return words[0]


def _record(
    path: str | os.PathLike[str], header_line: int, record_id: str, parts: list[str]
) -> FastaRecord:
    sequence = "".join(parts)
    if not sequence:
        raise ValueError(f"{path}:{header_line}: record {record_id!r} has no sequence")
    return FastaRecord(record_id, sequence, header_line)
