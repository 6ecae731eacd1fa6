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


def test_cluster_tests_run_last(request):
    """make test builds the C++ runtime beside pytest (scripts/test_suite.sh): the tests marked
    cluster (a live Ray cluster or Triton server) come after the others, when the builds are most
    likely done."""
    from conftest import run_order

    order = [run_order(item) for item in request.session.items]
    assert order == sorted(order)
    assert [rank == 1 for rank in order] == [item.get_closest_marker("cluster") is not None
                                             for item in request.session.items]


def test_the_runs_processes_make_a_shared_fixture_once_and_wait_for_it(tmp_path, tmp_path_factory, monkeypatch):
    """make test runs tests/cpp in a second pytest process beside the others (scripts/test_suite.sh),
    and both need the session's exports: in the directory TRANSMITER_TEST_SHARED names, the first
    to come makes one while the second waits on the lock, then finds it made."""
    import threading
    import time

    from conftest import made_once

    monkeypatch.setenv("TRANSMITER_TEST_SHARED", str(tmp_path / "shared"))
    inside, seen = threading.Event(), {}

    def maker():
        with made_once(tmp_path_factory, "export") as (directory, first):
            (directory / "model.onnx").write_text("made by the first")
            inside.set()
            time.sleep(0.5)
            seen["maker"] = (first, time.monotonic())

    def reader():
        inside.wait()
        with made_once(tmp_path_factory, "export") as (directory, first):
            seen["reader"] = (first, time.monotonic(), (directory / "model.onnx").read_text())

    threads = [threading.Thread(target=maker), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen["maker"][0] is True and seen["reader"][0] is False
    assert seen["reader"][1] >= seen["maker"][1], "the second entered before the first had made it"
    assert seen["reader"][2] == "made by the first"
    assert (tmp_path / "shared" / "export.done").exists()


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
