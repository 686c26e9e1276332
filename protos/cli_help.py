"""What every `esm2` command's --help shares: paragraphs wrapped to at most 100
columns, each option's default shown, and an epilog with an example and the exit codes."""

from __future__ import annotations

import argparse
import shutil
import textwrap

# Help lines stay this short on any terminal; argparse keeps two columns spare.
MAX_WIDTH = 100
# exit code -> what it means, for the commands that call the service, and for the
# commands that run (a part of) it.
CLIENT_EXIT_CODES = {
    0: "ok",
    1: "the service failed a request",
    2: "bad usage or input",
    130: "interrupted",
}
SERVER_EXIT_CODES = {
    0: "stopped cleanly (Ctrl-C or SIGTERM)",
    1: "a failure while running",
    2: "bad usage or settings",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps each paragraph of a description or epilog, but keeps indented lines
    (examples, tables) as written; adds "(default: X)" to an option's help that does not
    mention its default."""

    def __init__(self, prog: str, **kwargs) -> None:
        terminal = shutil.get_terminal_size().columns
        kwargs["width"] = min(kwargs.get("width") or terminal - 2, MAX_WIDTH - 2)
        super().__init__(prog, **kwargs)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(_fill_paragraph(part, width, indent) for part in text.split("\n\n"))

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if shows_default(action) and "default" not in help_text.lower():
            help_text += " (default: %(default)s)"
        return help_text


def shows_default(action: argparse.Action) -> bool:
    """Whether an option has a default worth printing: not a flag's False, not None."""
    default = action.default
    return bool(action.option_strings) and all(
        default is not unset for unset in (None, False, argparse.SUPPRESS)
    )


def _fill_paragraph(paragraph: str, width: int, indent: str) -> str:
    if "\n " in paragraph or paragraph.startswith(" "):
        return textwrap.indent(paragraph, indent)
    return textwrap.fill(
        " ".join(paragraph.split()), width, initial_indent=indent, subsequent_indent=indent
    )


def epilog(example: str, codes: dict[int, str] = CLIENT_EXIT_CODES, *notes: str) -> str:
    """An example command line, then any notes, then the exit codes."""
    exit_codes = ", ".join(f"{code} {meaning}" for code, meaning in sorted(codes.items()))
    return "\n\n".join([f"example:\n  {example}", *notes, f"exit codes: {exit_codes}"])
