"""Print the ``uv pip install`` options that make uv see the package indexes pip is configured with.

The Makefile installs the virtual environment with uv (72 s against pip's 335 s on the project's
machines: it unpacks wheels and compiles their bytecode in parallel), but uv reads no pip
configuration, and a machine's pip configuration may be what reaches its packages: local wheel
folders, local simple indexes, a constraints file. This reads that configuration as pip itself
resolves it (``pip config list``: its files and ``PIP_*`` variables) and prints one option or value
per line for the Makefile to pass on. ``--index-strategy unsafe-best-match`` makes uv choose among
all indexes as pip does (the best version wherever it is), so both resolve the same versions.

Usage: python scripts/uv_pip_args.py [PYTHON]   (PYTHON: whose pip to ask; default this one)
"""

from __future__ import annotations

import ast
import subprocess
import sys

# pip option -> uv option (pip's values of the first three are whitespace-separated lists)
_OPTIONS = {"find-links": "--find-links", "extra-index-url": "--extra-index-url", "constraint": "--constraint",
            "index-url": "--index-url"}
# The sections ``pip install`` reads an option from, least to most binding: a configuration file's
# [global] and [install] sections (pip merges its files first), then the PIP_* variables (":env:").
_SECTIONS = ("global", "install", ":env:")


def pip_config(python: str) -> dict[str, list[tuple[str, str]]]:
    """{option: [(section, value), ...]} from ``PYTHON -m pip config list`` (one line per section and
    option, its files already merged), the sections ``pip install`` reads, least binding first."""
    listing = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    found: dict[str, list[tuple[str, str]]] = {}
    for line in listing.stdout.splitlines():
        key, sep, raw = line.partition("=")
        if not sep or "." not in key:
            continue
        section, _, option = key.rpartition(".")
        if section in _SECTIONS:
            found.setdefault(option, []).append((section, ast.literal_eval(raw)))
    for values in found.values():
        values.sort(key=lambda item: _SECTIONS.index(item[0]))
    return found


def uv_args(config: dict[str, list[tuple[str, str]]]) -> list[str]:
    """The options for uv; each option's value is the one of its most binding section, as pip takes
    it (a ``PIP_FIND_LINKS`` variable replaces the files' find-links, it does not add to them)."""
    args = ["--index-strategy", "unsafe-best-match"]
    for option, flag in _OPTIONS.items():
        if config.get(option):
            for item in config[option][-1][1].split():
                args += [flag, item]
    return args


def main() -> int:
    python = sys.argv[1] if len(sys.argv) > 1 else sys.executable
    print("\n".join(uv_args(pip_config(python))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
