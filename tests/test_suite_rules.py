"""Rules for the test suite itself (README "Development"), read from the tests' source: no test
calls another test, and the CLI starts as a fresh interpreter only in the console script's own
test; every other child process of the CLI is forked from the warm parent of
tests/cli_process.py."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent
# the one test whose point is the installed console script in a new interpreter
CONSOLE_SCRIPT_TEST = ("test_cli.py", "test_console_script_help_and_exit_status")


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(TESTS.rglob("*.py"))]


def test_no_test_calls_another_test():
    calls = []
    for path, module in _modules():
        tests = {node.name for node in module.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
        for node in ast.walk(module):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in tests:
                calls.append(f"{path.relative_to(TESTS)}:{node.lineno} calls {node.func.id}")
    assert calls == []


def _enclosing_functions(module: ast.Module) -> dict[int, str]:
    owner = {}
    for node in ast.walk(module):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if hasattr(inner, "lineno"):
                    owner.setdefault(inner.lineno, node.name)
    return owner


def test_the_cli_runs_as_a_new_interpreter_only_in_the_console_script_test():
    """``python -m transmiter_deploy.cli`` names the module as a string; only the console script's
    test (its fallback where the script is not installed), the fork server's preload and this
    rule may."""
    found = []
    for path, module in _modules():
        owner = _enclosing_functions(module)
        for node in ast.walk(module):
            if isinstance(node, ast.Constant) and node.value == "transmiter_deploy.cli":
                where = (path.name, owner.get(node.lineno, "<module>"))
                if where != CONSOLE_SCRIPT_TEST and path.name not in ("cli_process.py", Path(__file__).name):
                    found.append(f"{path.relative_to(TESTS)}:{node.lineno} ({where[1]})")
    assert found == [], "run the CLI through main() in the test, or in a child of tests/cli_process.py"


def test_session_fixtures_that_export_are_made_once_per_run_whichever_worker_needs_them():
    """make test TEST_WORKERS=N runs pytest-xdist workers, each with its own session: a session fixture that
    runs an export (or the CLI) makes it through conftest.made_once / export_once, or each worker
    would make it again."""
    import ast

    tree = ast.parse((TESTS / "conftest.py").read_text())
    exporting = {"run_export", "run_bank_export", "make_flow", "main"}
    sharing = {"made_once", "export_once"}
    checked = []
    for function in (node for node in tree.body if isinstance(node, ast.FunctionDef)):
        session = any(isinstance(d, ast.Call) and any(k.arg == "scope" and getattr(k.value, "value", None) == "session"
                                                      for k in d.keywords) for d in function.decorator_list)
        if not session:
            continue
        called = {getattr(call.func, "id", getattr(call.func, "attr", None))
                  for call in ast.walk(function) if isinstance(call, ast.Call)}
        if called & (exporting | sharing) or "copy_export" in called:
            checked.append(function.name)
            assert called & sharing, f"session fixture {function.name} exports without conftest.made_once"
    assert {"demo_export", "demo_bank_export", "flow", "family_exports"} <= set(checked), checked


def test_cpp_tests_run_last_and_wait_for_the_builds_beside_them(request, tmp_path, monkeypatch):
    """make test builds the C++ runtime beside pytest (scripts/test_suite.sh): tests/cpp come last
    (the tests marked cluster just before them), their build fixtures wait for the builds' status, and
    a failed or killed build fails them."""
    import importlib
    import subprocess

    import pytest

    from conftest import run_order

    # the tests marked cluster after the others, tests/cpp after them
    order = [run_order(item) for item in request.session.items]
    assert order == sorted(order)
    assert [TESTS / "cpp" in Path(item.path).parents for item in request.session.items] == [rank == 2 for rank in order]
    monkeypatch.syspath_prepend(str(TESTS / "cpp"))
    cpp_builds = importlib.import_module("cpp_builds")
    status = tmp_path / "status"
    # a builds job that is still running, then writes its exit status
    job = subprocess.Popen(["sh", "-c", f"sleep 1; echo 0 > {status}.tmp && mv {status}.tmp {status}"])
    monkeypatch.setenv("TRANSMITER_CPP_BUILDS_STATUS", str(status))
    monkeypatch.setenv("TRANSMITER_CPP_BUILDS_PID", str(job.pid))
    cpp_builds.wait_for_builds()
    assert status.read_text().strip() == "0"
    job.wait()
    status.write_text("2\n")
    with pytest.raises(pytest.fail.Exception, match=r"failed \(exit 2\)"):
        cpp_builds.wait_for_builds()
    status.unlink()  # a job that ended without writing its status
    with pytest.raises(pytest.fail.Exception, match="without a status"):
        cpp_builds.wait_for_builds()


def test_ctest_and_pytest_emulate_the_same_aarch64_cpu():
    """ctest (CMake's emulator) and tests/cpp (their launcher) run the aarch64 programs on the same
    emulated CPU: its instruction set decides which ONNX Runtime kernels run, and so the figures."""
    import re
    import sys

    sys.path.insert(0, str(TESTS / "cpp"))
    from cpp_builds import QEMU_CPU

    toolchain = (TESTS.parent / "cpp" / "cmake" / "aarch64-linux-gnu.cmake").read_text()
    (chosen,) = re.findall(r"set\(TRANSMITER_QEMU_AARCH64_CPU (\S+)\)", toolchain)
    assert chosen == QEMU_CPU and "-cpu ${TRANSMITER_QEMU_AARCH64_CPU}" in toolchain
