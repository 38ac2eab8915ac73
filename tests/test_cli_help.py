"""Every command in the command table of docs/reference/commands.md answers ``--help`` (a lost subcommand fails here,
not with a user), and every command the parser has is in that table (a new command is documented)."""
import re
from pathlib import Path

import pytest

from legato.streams.cli import build_parser, main

COMMANDS = Path(__file__).resolve().parent.parent / "docs" / "reference" / "commands.md"

def documented_commands() -> list[tuple[str, ...]]:
    """The command words of each row of the ``| command | what it does |`` table of docs/reference/commands.md: ``legato kafka
    start|stop|status`` gives ("kafka",), ``legato runs show RUN_ID`` gives ("runs", "show")."""
    lines = COMMANDS.read_text(encoding="utf-8").splitlines()
    start = lines.index("| command | what it does |")
    commands = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cell = re.match(r"\|\s*`legato ([^`]*)`", line)
        assert cell, f"a command row without a `legato ...` command: {line}"
        words = []
        for word in cell.group(1).split():
            if not re.fullmatch(r"[a-z][a-z-]*", word):
                break  # an option, a placeholder (RUN_ID) or alternatives (start\|stop)
            words.append(word)
        commands.append(tuple(words))
    return commands


def test_the_command_table_is_found():
    commands = documented_commands()
    assert ("dev",) in commands and ("trigger",) in commands and len(commands) >= 10


@pytest.mark.parametrize("words", documented_commands(), ids=" ".join)
def test_documented_command_has_help(words, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*words, "--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0, capsys.readouterr().err
    assert out.startswith(f"usage: legato {words[0]}"), out[:200]  # "bench overhead": overhead is an argument


def _parser_commands() -> set[tuple[str, ...]]:
    """Every command of the parser: ("dev",), ("runs", "show"), …"""
    import argparse

    def subs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        return next((dict(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})

    found = set()
    for name, sub in subs(build_parser()).items():
        nested = subs(sub)
        found |= {(name, child) for child in nested} if nested else {(name,)}
    return found


def test_every_command_of_the_parser_is_in_the_table():
    documented = set(documented_commands())
    assert ("schema",) in _parser_commands()
    # a row may name a positional choice too: `legato schema workflow` documents the command ("schema",)
    missing = sorted(" ".join(c) for c in _parser_commands() if not any(d[:len(c)] == c for d in documented))
    assert not missing, f"docs/reference/commands.md does not document: {missing}"
