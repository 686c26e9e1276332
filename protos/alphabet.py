"""The ESM-2 alphabet, without torch: token order, accepted residues, tokenization.

Mirrors `esm.data.Alphabet.from_architecture("ESM-1b")` (a test checks it).
"""

from __future__ import annotations

import re
import string

VOCAB_TOKENS: tuple[str, ...] = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N",
    "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-",
    "<null_1>", "<mask>",
)  # fmt: skip
TOKEN_INDEX: dict[str, int] = {token: i for i, token in enumerate(VOCAB_TOKENS)}
CLS_INDEX = TOKEN_INDEX["<cls>"]
PAD_INDEX = TOKEN_INDEX["<pad>"]
EOS_INDEX = TOKEN_INDEX["<eos>"]
MASK_INDEX = TOKEN_INDEX["<mask>"]
MASK_TOKEN = "<mask>"

STANDARD_RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
EXTENDED_RESIDUES = "XBUZO"
GAP = "-"
# Every single character a sequence may hold. "." is in the vocabulary but is
# not a residue, so it is refused like any other unknown character.
ACCEPTED_CHARACTERS = frozenset(STANDARD_RESIDUES + EXTENDED_RESIDUES + GAP)

_TOKEN_PATTERN = re.compile(re.escape(MASK_TOKEN) + "|.", re.DOTALL)
# ASCII only: str.upper() maps some other letters to ASCII ones ('ı' -> 'I') or to two
# characters ('ß' -> 'SS'), which would accept them or shift every later position.
_ASCII_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)


def uppercase_residues(sequence: str) -> str:
    """`sequence` with its ASCII letters uppercased and its `<mask>` tokens kept: residues
    are accepted in either case. Every character keeps its position."""
    if MASK_TOKEN not in sequence:
        return sequence.translate(_ASCII_UPPER)
    return MASK_TOKEN.join(part.translate(_ASCII_UPPER) for part in sequence.split(MASK_TOKEN))


def token_count(sequence: str) -> int:
    """len(split_tokens(sequence)), without building the list."""
    return len(sequence) - (len(MASK_TOKEN) - 1) * sequence.count(MASK_TOKEN)


def split_tokens(sequence: str) -> list[str]:
    """Splits a sequence into tokens: one per character, `<mask>` as one token."""
    return _TOKEN_PATTERN.findall(sequence)


def encode_tokens(tokens: list[str]) -> list[int]:
    """Token ids with <cls> and <eos> around them, as fair-esm's batch converter makes."""
    return [CLS_INDEX, *(TOKEN_INDEX[token] for token in tokens), EOS_INDEX]


# Byte -> token id for the one-character tokens; _NOT_A_TOKEN for every other byte.
_NOT_A_TOKEN = 255
_CHARACTER_IDS = bytes(TOKEN_INDEX.get(chr(byte), _NOT_A_TOKEN) for byte in range(256))


def token_ids(sequence: str) -> tuple[int, ...]:
    """encode_tokens(split_tokens(sequence)): a table lookup per character when the
    sequence holds no <mask> (ten times faster than the general path); KeyError for a
    character that is not a token."""
    if "<" not in sequence and sequence.isascii():
        ids = sequence.encode("ascii").translate(_CHARACTER_IDS)
        if _NOT_A_TOKEN not in ids:
            return (CLS_INDEX, *ids, EOS_INDEX)
    return tuple(encode_tokens(split_tokens(sequence)))
