"""Shared by the hostile cases: a tiny end-to-end workspace made through the CLI (the ``flow``
fixture in tests/conftest.py), the CLI run in a child process (under a file-size limit, without
root's permission override), and snapshots of artifact trees."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

from transmiter_deploy.cli import main

CLI = [sys.executable, "-m", "transmiter_deploy.cli"]


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
    """``transmiter ARGS`` in a child process: under RLIMIT_FSIZE ``limit`` bytes (Python ignores
    SIGXFSZ, so a write past it fails with EFBIG); ``obey_permissions``: as root, without the
    capabilities that let root ignore file permissions (util-linux setpriv)."""
    def prepare() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    prefix = []
    if obey_permissions and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise RuntimeError("running as root needs util-linux's setpriv to drop CAP_DAC_OVERRIDE")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
    return subprocess.run([*prefix, *CLI, "--quiet", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=prepare, env={**os.environ, **(env or {})})


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` by relative path, with its sha256 (symlinks by target)."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            files[str(path.relative_to(root))] = "-> " + os.readlink(path)
        elif path.is_file():
            files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def leftovers(parent: Path) -> list[str]:
    """Temporary names an interrupted write could leave behind under ``parent``."""
    return sorted(str(p.relative_to(parent)) for p in parent.rglob("*")
                  if p.name.endswith((".partial", ".old", ".tmp")) or ".partial" in p.name)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]
