"""Every command in README's command table answers ``--help`` (a lost subcommand fails here, not with a user)."""
import re
from pathlib import Path

import pytest

from legato.streams.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"

def documented_commands() -> list[tuple[str, ...]]:
    """The command words of each row of README's ``| command | what it does |`` table: ``legato kafka
    start|stop|status`` gives ("kafka",), ``legato runs show RUN_ID`` gives ("runs", "show")."""
    lines = README.read_text(encoding="utf-8").splitlines()
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


def test_the_readme_table_is_found():
    commands = documented_commands()
    assert ("dev",) in commands and ("trigger",) in commands and len(commands) >= 10


@pytest.mark.parametrize("words", documented_commands(), ids=" ".join)
def test_documented_command_has_help(words, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*words, "--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0, capsys.readouterr().err
    assert out.startswith(f"usage: legato {words[0]}"), out[:200]  # "bench overhead": overhead is an argument
