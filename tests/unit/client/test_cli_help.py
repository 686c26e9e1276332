"""Every `esm2` command's --help: a description, an example, the exit codes, each
option's default, and no line over 100 characters, however wide the terminal."""

from __future__ import annotations

import argparse
import importlib
import os

import pytest

from esm2_service.client.cli import FORWARDED, build_parser, main

MAX_LINE = 100


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


COMMANDS = ["", *subparsers(build_parser())]


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    """Defaults as shipped, on a terminal wider than the help may be."""
    for name in os.environ:
        if name.startswith("ESM2_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "200")


def parser_of(command: str) -> argparse.ArgumentParser:
    if not command:
        return build_parser()
    if command in FORWARDED:
        return importlib.import_module(FORWARDED[command][0]).build_parser()
    return subparsers(build_parser())[command]


def help_of(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"] if command else ["--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def option_block(help_text: str, option: str) -> str:
    """The help of one option: its lines, up to the next option's."""
    blocks = help_text.split("\n  -")
    (block,) = [b for b in blocks if "-" + b.split()[0].rstrip(",") == option]
    return " ".join(block.split())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_a_description_an_example_and_the_exit_codes(command, capsys):
    help_text = help_of(command, capsys)
    usage, description = help_text.split("\n\n")[:2]

    assert parser_of(command).description
    assert description.strip() and not description.startswith(("positional", "options"))
    assert f"example:\n  esm2 {command}".rstrip() in help_text
    assert "exit codes: 0 " in help_text and "2 bad usage" in help_text


@pytest.mark.parametrize("command", COMMANDS)
def test_no_help_line_is_over_100_characters(command, capsys):
    long_lines = [line for line in help_of(command, capsys).splitlines() if len(line) > MAX_LINE]
    assert long_lines == []


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_with_a_default_shows_it(command, capsys):
    help_text = help_of(command, capsys)
    for action in parser_of(command)._actions:
        if not action.option_strings or action.default in (None, argparse.SUPPRESS):
            continue
        if action.default is False:
            continue
        block = option_block(help_text, action.option_strings[0])
        assert "default" in block, block
        if isinstance(action.default, int | float | str):  # 1000 may read "1,000"
            assert str(action.default) in block.replace(",", ""), block
