"""Shared by the hostile cases: a tiny end-to-end workspace made through the CLI (the ``flow``
fixture in tests/conftest.py), the CLI run in a child process (under a file-size limit, without
root's permission override) or in this one, and snapshots of artifact trees."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cli_process import run_cli_child
from conftest import tree_digest as snapshot  # noqa: F401  (the hostile cases' name for it)
from transmiter_deploy.cli import main


def make_flow(root: Path, images: Path) -> Path:
    """Caches, heads and adapters of the tiny towers under ``root``: ``c_src``, ``c_ft``,
    ``c_tgt``, ``h_src``, ``h_ft``, ``h_tgt``, ``a_src`` (extracted), ``a_tgt`` (transferred)."""
    for step in flow_steps(root, images):
        assert main(["--quiet", *map(str, step)]) == 0, step
    return root


def flow_steps(root: Path, images: Path) -> list[list]:
    return [
        ["cache", "--model", "TM-Tiny-ViT", "--data", images, "--out", root / "c_src"],
        ["cache", "--model", "TM-Tiny-ViT", "--init-seed", 1, "--data", images, "--out", root / "c_ft"],
        ["cache", "--model", "TM-Tiny-RN", "--data", images, "--out", root / "c_tgt"],
        ["head", "--model", "TM-Tiny-ViT", "--classes-from", root / "c_src", "--width", 32, "--templates", "photo",
         "--out", root / "h_src"],
        ["head", "--model", "TM-Tiny-ViT", "--init-seed", 1, "--classes-from", root / "c_src", "--no-auxiliary",
         "--templates", "photo", "--out", root / "h_ft"],
        ["head", "--model", "TM-Tiny-RN", "--classes-from", root / "h_src", "--templates", "photo", "--out", root / "h_tgt"],
        extract_args(root, root / "a_src"),
        ["transfer", "--adapter", root / "a_src", "--source-cache", root / "c_src", "--source-head", root / "h_src",
         "--target-cache", root / "c_tgt", "--target-head", root / "h_tgt", "--out", root / "a_tgt"],
    ]


def extract_args(root: Path, out: Path) -> list:
    return ["extract", "--source-cache", root / "c_src", "--source-head", root / "h_src", "--teacher-cache",
            root / "c_ft", "--teacher-head", root / "h_ft", "--epochs", 2, "--batch-size", 8, "--out", out]


def run_cli(*args, limit: int | None = None, obey_permissions: bool = False, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """``transmiter --quiet ARGS`` in a child process (forked from a warm parent:
    tests/cli_process.py): under RLIMIT_FSIZE ``limit`` bytes (Python ignores SIGXFSZ, so a write
    past it fails with EFBIG); ``obey_permissions``: as root, without the capabilities that let
    root ignore file permissions. For the cases whose point is the process boundary; the others
    run the CLI in this process (:func:`run_cli_here`)."""
    return run_cli_child(*args, limit=limit, obey_permissions=obey_permissions, timeout=timeout, env=env)


def run_cli_here(capfd, *args) -> subprocess.CompletedProcess:
    """``transmiter --quiet ARGS`` through the CLI's ``main`` in this process, its output read at
    the file-descriptor level (``capfd``: what a library writes to fd 2 counts, as it would from
    a child process)."""
    capfd.readouterr()
    status = main(["--quiet", *map(str, args)])
    captured = capfd.readouterr()
    return subprocess.CompletedProcess(list(args), status, captured.out, captured.err)


def leftovers(parent: Path) -> list[str]:
    """Temporary names an interrupted write could leave behind under ``parent``."""
    return sorted(str(p.relative_to(parent)) for p in parent.rglob("*")
                  if p.name.endswith((".partial", ".old", ".tmp")) or ".partial" in p.name)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]
