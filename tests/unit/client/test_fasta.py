"""read_fasta: records, multi-line sequences and the errors it names."""

from __future__ import annotations

import pytest

from esm2_service.client.fasta import accession, read_fasta


def write(tmp_path, text: str):
    path = tmp_path / "input.fasta"
    path.write_text(text, encoding="utf-8")
    return path


def test_records_span_lines_and_lose_whitespace(tmp_path):
    path = write(
        tmp_path,
        ">sp|P69905|HBA_HUMAN Hemoglobin subunit alpha\n"
        "MVLSPADKTN\n"
        "  VKAAWGKVGA \t\n"
        "\n"
        ">second\r\n"
        "MK<mask>V L\r\n"
        ">third\n"
        "ACDE",
    )

    assert [tuple(record) for record in read_fasta(path)] == [
        ("sp|P69905|HBA_HUMAN", "MVLSPADKTNVKAAWGKVGA", 1),
        ("second", "MK<mask>VL", 5),
        ("third", "ACDE", 7),
    ]


def test_empty_file_has_no_records(tmp_path):
    assert read_fasta(write(tmp_path, "\n\n")) == []


def test_text_before_the_first_header_names_its_line(tmp_path):
    path = write(tmp_path, "\nMKV\n>a\nMKV\n")

    with pytest.raises(ValueError, match=r"input\.fasta:2: sequence text before the first '>'"):
        read_fasta(path)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (">a\nMKV\n>b\n\n>c\nMKV\n", r"input\.fasta:3: record 'b' has no sequence"),
        (">a\nMKV\n>last\n", r"input\.fasta:3: record 'last' has no sequence"),
        (">a\nMKV\n>  \nMKV\n", r"input\.fasta:3: header without an id"),
    ],
)
def test_empty_records_and_headers_name_their_line(tmp_path, text, error):
    with pytest.raises(ValueError, match=error):
        read_fasta(write(tmp_path, text))


@pytest.mark.parametrize(
    ("record_id", "expected"),
    [
        ("sp|P00698|LYSC_CHICK", "P00698"),
        ("tr|A0A023GPI8|A0A023GPI8_CANAW", "A0A023GPI8"),
        ("P00698", "P00698"),
        ("gi|12345|ref|NP_000509.1|", "gi|12345|ref|NP_000509.1|"),  # not db|ACCESSION|NAME
        ("sp||NAME", "sp||NAME"),
    ],
)
def test_the_accession_is_the_middle_field_of_a_db_accession_name_id(record_id, expected):
    assert accession(record_id) == expected
