"""A clone in any folder carries every file its tests and benchmarks read."""

from __future__ import annotations

import re
import subprocess

import support
from support import ROOT

from bench import corpus

# A path built from the folder above the clone: `ROOT.parent / "shared"`, "../shared".
_OUTSIDE_PATTERN = re.compile(r"""\.parent\s*/\s*["']shared["']|["']\.\./shared""")


def _tracked(*patterns: str) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return listed.stdout.split()


def test_data_folders_are_inside_the_repository():
    for folder in (support.DATA_DIR, corpus.DATA_DIR):
        assert folder.resolve().is_relative_to(ROOT), folder


def test_every_data_file_read_is_tracked():
    tracked = set(_tracked("tests/data"))
    needed = {"few_proteins.fasta", "some_proteins.fasta"} | {name for name, _ in corpus.REAL_FILES}
    for name in needed:
        assert f"tests/data/{name}" in tracked, f"tests/data/{name} is not committed"
    assert "tests/data/README.md" in tracked  # the fair-esm licence note


def test_no_test_or_benchmark_reads_outside_the_clone():
    offenders = [
        f"{path}:{number}"
        for path in _tracked("tests/*.py", "bench/*.py", "Makefile", ".ci/run")
        for number, line in enumerate((ROOT / path).read_text().splitlines(), start=1)
        if _OUTSIDE_PATTERN.search(line) and path != "tests/unit/test_repository.py"
    ]
    assert offenders == []
