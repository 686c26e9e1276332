"""Benchmark inputs: the sequence corpora and a cached random-weight checkpoint."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from esm2_service.alphabet import ACCEPTED_CHARACTERS, STANDARD_RESIDUES
from esm2_service.client.fasta import read_fasta

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "tests" / "data"
CACHE_DIR = REPO_ROOT / ".cache" / "bench"
CHECKPOINT_NAME = "esm2_t6_8M_UR50D.pt"
CORPUS_NAMES = ("lognormal", "real")
# (file, how many of its records; None: all), in this order.
REAL_FILES = (
    ("some_proteins.fasta", None),
    ("few_proteins.fasta", None),
    ("P62593_tem1_variants.fasta", 30),
)
MAX_RESIDUES = 2048  # the service's per-sequence limit


@dataclass(frozen=True)
class Corpus:
    """Named sequences, in arrival order, and the records left out (id, reason)."""

    name: str
    ids: list[str]
    sequences: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def residues(self) -> int:
        """Total residues (no <cls>/<eos>): the numerator of every tokens/s."""
        return sum(len(sequence) for sequence in self.sequences)

    def describe(self) -> str:
        lengths = [len(sequence) for sequence in self.sequences]
        return (
            f"corpus {self.name}: {len(lengths)} sequences, {self.residues:,} residues, "
            f"lengths {min(lengths)}..{max(lengths)} (median {statistics.median(lengths):g})"
        )

    def summary(self) -> dict:
        lengths = [len(sequence) for sequence in self.sequences]
        return {
            "name": self.name,
            "sequences": len(lengths),
            "residues": self.residues,
            "min_length": min(lengths),
            "median_length": statistics.median(lengths),
            "max_length": max(lengths),
            "skipped": [{"id": i, "reason": reason} for i, reason in self.skipped],
        }


def random_sequence(rng: np.random.Generator, length: int) -> str:
    """`length` residues drawn uniformly from the 20 standard amino acids."""
    letters = np.array(list(STANDARD_RESIDUES))
    return "".join(rng.choice(letters, size=length))


def lognormal_corpus(
    count: int = 48,
    median: float = 339.0,
    sigma: float = 0.6,
    bounds: tuple[int, int] = (30, 899),
    seed: int = 0,
) -> Corpus:
    """`count` random sequences with lognormal lengths (median `median` residues), clipped."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.lognormal(np.log(median), sigma, size=count)), *bounds)
    sequences = [random_sequence(rng, int(length)) for length in lengths]
    return Corpus("lognormal", [f"random_{i}" for i in range(count)], sequences)


def _rejection(sequence: str) -> str | None:
    """Why the service would refuse `sequence`, or None."""
    bad = sorted(set(sequence) - ACCEPTED_CHARACTERS)
    if bad:
        return f"characters outside the alphabet: {''.join(bad)}"
    if len(sequence) > MAX_RESIDUES:
        return f"{len(sequence)} residues > {MAX_RESIDUES}"
    return None


def real_corpus(data_dir: Path = DATA_DIR) -> Corpus:
    """The real proteins of `REAL_FILES`; sequences the service would refuse are skipped."""
    ids, sequences, skipped = [], [], []
    for file_name, limit in REAL_FILES:
        records = read_fasta(data_dir / file_name)
        for record_id, sequence, _ in records[:limit]:
            reason = _rejection(sequence)
            if reason:
                skipped.append((record_id, reason))
            else:
                ids.append(record_id)
                sequences.append(sequence)
    return Corpus("real", ids, sequences, skipped)


def load_corpora(choice: str) -> list[Corpus]:
    """The corpora named by `--corpus`: lognormal, real or all."""
    names = CORPUS_NAMES if choice == "all" else (choice,)
    builders = {"lognormal": lognormal_corpus, "real": real_corpus}
    return [builders[name]() for name in names]


def ensure_checkpoint(cache_dir: Path = CACHE_DIR) -> Path:
    """A random-weight checkpoint of the full 8M shape, made once and reused."""
    from esm2_service.worker.checkpoint import make_random_checkpoint, regression_path

    path = cache_dir / CHECKPOINT_NAME
    if not (path.is_file() and regression_path(path).is_file()):
        make_random_checkpoint(path, seed=0)
    return path
