"""Score requests: the variant notation, its validation, and the forward passes it needs.

Variants are written as ProteinGym and DMS data write them: `A42G` (wild-type
residue, 1-based position, mutant residue), several joined by ":" (`A42G:L45P`).
Pure functions, shared by the frontend (which decides) and the client (which
checks a whole CSV before sending it): nothing here knows gRPC, Redis or torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from esm2_service.alphabet import STANDARD_RESIDUES, uppercase_residues
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.validation import (
    FieldViolation,
    InvalidRequest,
    Violations,
    check_decoded,
    check_sequence,
    clip,
)

MAX_VARIANTS = 50_000  # a full scan of a 2,048-residue sequence is 38,912 (at most 40,960)
MAX_FORWARD_PASSES = 16_384  # per request; only pseudo_log_likelihood comes near it
# Past this many bad variants, the rest are summarised.
MAX_VARIANT_VIOLATIONS = 50

STRATEGY_NAMES: dict[int, str] = {
    pb.SCORING_STRATEGY_MASKED_MARGINAL: "masked_marginal",
    pb.SCORING_STRATEGY_WT_MARGINAL: "wt_marginal",
    pb.SCORING_STRATEGY_PSEUDO_LOG_LIKELIHOOD: "pseudo_log_likelihood",
}
DEFAULT_STRATEGY = pb.SCORING_STRATEGY_MASKED_MARGINAL
NOTATION = "like A42G (wild-type residue, 1-based position, mutant residue; join several with ':')"
_SUBSTITUTION = re.compile(r"([A-Z-])([0-9]+)([A-Z])")
# Longer positions are outside any wild type; int() refuses past 4,300 digits.
_MAX_POSITION_DIGITS = 9


@dataclass(frozen=True)
class Substitution:
    wild_type: str
    position: int  # 1-based
    mutant: str


@dataclass(frozen=True)
class ValidScoreRequest:
    """A Score request that passed validation, with its defaults resolved."""

    wild_type: str
    mutants: tuple[str, ...]  # as the request wrote them, or the scan's names
    variants: tuple[tuple[Substitution, ...], ...]  # one tuple per mutant
    strategies: tuple[int, ...]  # sorted, unique pb.SCORING_STRATEGY_* values

    @cached_property
    def positions(self) -> tuple[int, ...]:
        """Every position (1-based) some variant mutates, in order."""
        return tuple(sorted({s.position for variant in self.variants for s in variant}))

    def mutated_sequence(self, variant: tuple[Substitution, ...]) -> str:
        residues = list(self.wild_type)
        for substitution in variant:
            residues[substitution.position - 1] = substitution.mutant
        return "".join(residues)


def parse_variant(text: str, wild_type: str) -> tuple[tuple[Substitution, ...], list[str]]:
    """The substitutions of `text` and every problem with it (empty when it is valid)."""
    substitutions, problems, seen = [], [], set()
    for part in text.split(":"):
        match = _SUBSTITUTION.fullmatch(part)
        if match is None:
            problems.append(f"{clip(part)!r} is not a substitution {NOTATION}")
            continue
        wt, digits, mutant = match.groups()
        if len(digits) > _MAX_POSITION_DIGITS:
            problems.append(
                f"{clip(part)}: position {clip(digits)} is outside the wild type "
                f"(1..{len(wild_type)})"
            )
            continue
        position = int(digits)
        substitutions.append(Substitution(wt, position, mutant))
        if not 1 <= position <= len(wild_type):
            problems.append(
                f"{clip(part)}: position {position} is outside the wild type (1..{len(wild_type)})"
            )
        elif wild_type[position - 1] != wt:
            problems.append(
                f"{clip(part)}: the wild type has {wild_type[position - 1]!r} at position "
                f"{position}, not {wt!r}"
            )
        if mutant not in STANDARD_RESIDUES:
            problems.append(
                f"{clip(part)}: mutant residue {mutant!r} is not one of the 20 amino acids "
                f"{STANDARD_RESIDUES}"
            )
        if position in seen:
            problems.append(f"{clip(part)}: position {position} is mutated twice")
        seen.add(position)
    return tuple(substitutions), problems


def scan_variants(wild_type: str) -> tuple[tuple[str, ...], tuple[tuple[Substitution, ...], ...]]:
    """Every single substitution: position by position, mutants in STANDARD_RESIDUES order."""
    mutants, variants = [], []
    for position, wt in enumerate(wild_type, start=1):
        for mutant in STANDARD_RESIDUES:
            if mutant != wt:
                mutants.append(f"{wt}{position}{mutant}")
                variants.append((Substitution(wt, position, mutant),))
    return tuple(mutants), tuple(variants)


def score_violations(request: pb.ScoreRequest, limits: bool = True) -> Violations:
    """Every rule `request` breaks (the variants' only once the wild type is valid).

    `limits=False` leaves out the per-request bound on the number of variants: the client
    checks a list of any length before splitting it into requests (`plan_requests`)."""
    found = check_sequence(request.wild_type, "wild_type", allow_mask=False)
    _check_strategies(found, request.strategies)
    if request.scan and request.variants:
        found.add("scan", "give variants or set scan, not both")
    elif not request.scan and not request.variants:
        found.add("variants", f"no variants; give 1 to {MAX_VARIANTS:,}, or set scan")
    elif limits and len(request.variants) > MAX_VARIANTS:
        found.add("variants", f"{len(request.variants):,} variants; the limit is {MAX_VARIANTS:,}")
    elif not found and not request.scan:
        _check_variants(found, request.variants, uppercase_residues(request.wild_type))
    return found


def resolve_strategies(strategies) -> tuple[int, ...]:
    """Sorted, unique; empty (or only UNSPECIFIED) means (MASKED_MARGINAL,)."""
    return tuple(sorted(set(strategies) - {pb.SCORING_STRATEGY_UNSPECIFIED} or {DEFAULT_STRATEGY}))


def forward_passes(
    strategies: tuple[int, ...], wild_type: str, variants: list[tuple[Substitution, ...]]
) -> int:
    """The passes one request of `variants` costs (resolved `strategies`)."""
    positions = {s.position for variant in variants for s in variant}
    cost = {
        pb.SCORING_STRATEGY_MASKED_MARGINAL: len(positions),
        pb.SCORING_STRATEGY_WT_MARGINAL: 1,
        pb.SCORING_STRATEGY_PSEUDO_LOG_LIKELIHOOD: len(wild_type) * len(variants),
    }
    return sum(cost[strategy] for strategy in strategies)


def validate_score(request) -> ValidScoreRequest:
    request = check_decoded(request)
    violations = score_violations(request)
    if violations:
        raise InvalidRequest(violations)
    wild_type = uppercase_residues(request.wild_type)
    if request.scan:
        mutants, variants = scan_variants(wild_type)
    else:
        mutants = tuple(request.variants)
        variants = tuple(parse_variant(text, wild_type)[0] for text in mutants)
    valid = ValidScoreRequest(
        wild_type=wild_type,
        mutants=mutants,
        variants=variants,
        strategies=resolve_strategies(request.strategies),
    )
    passes = forward_passes(valid.strategies, valid.wild_type, list(valid.variants))
    if passes > MAX_FORWARD_PASSES:
        raise InvalidRequest([FieldViolation("strategies", _too_many_passes(valid, passes))])
    return valid


def _too_many_passes(valid: ValidScoreRequest, passes: int) -> str:
    return (
        f"{passes:,} forward passes (pseudo_log_likelihood takes {len(valid.wild_type):,} per "
        f"variant, for {len(valid.variants):,} variants); the limit is "
        f"{MAX_FORWARD_PASSES:,} per request: split the variants over several requests"
    )


def _check_strategies(found: Violations, strategies) -> None:
    valid = ", ".join(pb.ScoringStrategy.keys()[1:])
    unknown = (
        (i, value)
        for i, value in enumerate(strategies)
        if value != pb.SCORING_STRATEGY_UNSPECIFIED and value not in STRATEGY_NAMES
    )
    found.add_each(
        unknown,
        lambda i, value: FieldViolation(
            f"strategies[{i}]", f"unknown strategy {value}; valid: {valid}"
        ),
    )


def _check_variants(found: Violations, variants, wild_type: str) -> None:
    bad = 0
    for index, text in enumerate(variants):
        _, problems = parse_variant(text, wild_type)
        if problems:
            bad += 1
            if bad <= MAX_VARIANT_VIOLATIONS:
                for problem in problems:
                    found.add(f"variants[{index}]", problem)
    if bad > MAX_VARIANT_VIOLATIONS:
        found.add("variants", f"{bad - MAX_VARIANT_VIOLATIONS:,} more variants are invalid")
