"""Every `transmiter` command shown in README.md, docs/ and the commands' own --help examples
parses with the real CLI: the subcommand exists, every option is one of its own, values fit their
types and choices, nothing required is left out. Docs that name an option the code renamed fail
here, not in a user's shell."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from transmiter_deploy.cli import cli

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)\s*$")
SHELL = ("bash", "sh", "shell", "console", "")
PROGRAMS = ("transmiter", ".venv/bin/transmiter")


def shell_lines(text: str, fenced: bool = True):
    """(line number, words) of every command line (continuations joined, comments dropped), inside
    shell code blocks when ``fenced``."""
    inside, language, pending = not fenced, "", ""
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line.strip()) if fenced else None
        if fence:
            inside, language = not inside, fence.group(1)
            continue
        if not inside or language not in SHELL:
            continue
        joined = pending + line
        if joined.rstrip().endswith("\\"):
            pending = joined.rstrip()[:-1] + " "
            continue
        pending = ""
        try:
            words = shlex.split(joined, comments=True)
        except ValueError:  # not shell: a fragment of prose or output
            continue
        yield number, words


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for number, words in shell_lines(path.read_text(encoding="utf-8")):
            if words and words[0] in PROGRAMS:
                found.append((f"{path.relative_to(ROOT)}:{number}", words[1:]))
    return found


def help_examples(group: click.Group = cli, prefix: str = "transmiter") -> list[tuple[str, list[str]]]:
    found = []
    for name, command in group.commands.items():
        for number, words in shell_lines(command.help or "", fenced=False):
            if words and words[0] in PROGRAMS:
                found.append((f"{prefix} {name} --help, line {number}", words[1:]))
        if isinstance(command, click.Group):
            found += help_examples(command, f"{prefix} {name}")
    return found


def parse_problem(args: list[str]) -> str | None:
    """Why ``transmiter ARGS`` would not parse (None: it parses), without running it."""
    command, rest, name = cli, list(args), "transmiter"
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        name = rest.pop(0)
        command = command.commands[name]
    if isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        return f"no command '{rest[0]}'"
    try:
        command.make_context(name, rest)
    except click.exceptions.Exit:  # --help
        return None
    except click.ClickException as exc:
        return exc.format_message()
    return None


def test_the_docs_and_the_help_show_commands():
    assert len(documented_commands()) >= 40 and len(help_examples()) >= 20


@pytest.mark.parametrize("where,args", documented_commands() + help_examples(),
                         ids=lambda value: value if isinstance(value, str) else None)
def test_every_shown_command_parses(where, args):
    assert parse_problem(args) is None, f"{where}: transmiter {' '.join(args)}: {parse_problem(args)}"


@pytest.mark.parametrize("args,problem", [
    (["upgrade", "old", "--target", "X", "--out", "new", "--dry-rnu"], "No such option '--dry-rnu'"),
    (["export", "r.yaml", "--outt", "x"], "No such option '--outt'"),
    (["predict", "e", "i.png", "--runtime", "tensorflow"], "'tensorflow' is not one of"),
    (["upgrade", "old", "--out", "new"], "Missing option '--target'"),
    (["bank", "lst", "x"], "no command 'lst'"),
])
def test_the_check_sees_a_command_that_does_not_parse(args, problem):
    assert problem in (parse_problem(args) or "")
