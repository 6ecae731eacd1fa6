"""The Makefile's install: uv sees the package indexes pip is configured with (scripts/uv_pip_args.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "uv_pip_args.py"


def uv_args(tmp_path: Path, config: str, **variables: str) -> list[str]:
    """The script's options under a pip configuration file (read after the machine's own files,
    so it binds more than they do) and these PIP_* variables, every other PIP_* variable unset."""
    path = tmp_path / "pip.conf"
    path.write_text(config)
    env = {name: value for name, value in os.environ.items() if not name.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=str(path), **variables)
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, check=True)
    return result.stdout.split()


def values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == flag]


def test_the_sections_pip_install_reads_are_passed_on_the_most_binding_first(tmp_path):
    args = uv_args(tmp_path, "[global]\nfind-links = /wheels/global\nextra-index-url = file:///global/simple\n"
                             "[install]\nextra-index-url = file:///one/simple file:///two/simple\n"
                             "[download]\nfind-links = /wheels/download\n",
                   PIP_CONSTRAINT="/pins/constraints.txt")
    assert args[:2] == ["--index-strategy", "unsafe-best-match"]  # uv then picks versions as pip does
    assert values(args, "--find-links") == ["/wheels/global"]      # [download] is not install's
    # [install] binds more than [global]; each value of a list is one option
    assert values(args, "--extra-index-url") == ["file:///one/simple", "file:///two/simple"]
    assert values(args, "--constraint") == ["/pins/constraints.txt"]


def test_a_pip_variable_replaces_the_files_value(tmp_path):
    args = uv_args(tmp_path, "[global]\nfind-links = /wheels/file\nindex-url = https://file.example/simple\n",
                   PIP_FIND_LINKS="/wheels/a /wheels/b", PIP_INDEX_URL="https://variable.example/simple")
    assert values(args, "--find-links") == ["/wheels/a", "/wheels/b"]
    assert values(args, "--index-url") == ["https://variable.example/simple"]
