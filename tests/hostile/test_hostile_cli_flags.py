"""Every CLI command with every option given a value of the wrong type or an empty one, the cases
generated from the click definitions (not listed by hand): one line, exit status 2.

Only values click itself must refuse are generated (a word for a number, a word outside a choice,
an empty or missing path that must exist), so no case can start a real run; a string option
accepts any string, so it has no wrong type."""

from __future__ import annotations

import click
import pytest

from transmiter_deploy.cli import cli, main


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def _bad_values(option: click.Option) -> list[str]:
    kind = option.type
    if isinstance(kind, (click.types.IntParamType, click.types.FloatParamType)):  # ranges too
        return ["not-a-number", ""]
    if isinstance(kind, click.Choice):
        return ["not-a-choice", ""]
    if isinstance(kind, click.types.BoolParamType):
        return ["maybe", ""]
    if isinstance(kind, click.Path) and kind.exists:
        return ["", "/nonexistent/by/construction"]
    return []


def _cases():
    for path, command in _commands(cli):
        for param in command.params:
            if not isinstance(param, click.Option) or param.is_flag or param.count:
                continue
            for value in _bad_values(param):
                yield pytest.param(path, param.opts[0], value, id=f"{' '.join(path)} {param.opts[0]}={value!r}")


CASES = list(_cases())


def test_the_generated_cases_cover_every_command():
    covered = {case.values[0] for case in CASES}
    assert len(CASES) >= 40
    assert covered >= {("cache",), ("export-onnx",), ("bench",), ("build-engine",), ("extract",)}


@pytest.mark.parametrize("path, option, value", CASES)
def test_a_wrong_value_is_one_line_and_exit_2(capsys, path, option, value):
    status = main(["--quiet", *path, option, value])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("transmiter: error: ") and "Traceback" not in err, err
    assert option in lines[0] or "Missing" in lines[0] or "does not exist" in lines[0], lines[0]
