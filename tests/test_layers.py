"""The package's layers, checked from its source: every import (module-level or inside a
function) goes to the same layer or one below it, as docs/architecture.md draws them."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import transmiter_deploy

PACKAGE = Path(transmiter_deploy.__file__).resolve().parent
GROUND = {"errors", "artifacts", "host", "_compat", "__init__"}
# layer -> the layers it may import (itself included)
ALLOWED = {
    "ground": {"ground"},
    "method": {"ground", "method"},
    "features": {"ground", "method", "features"},
    "runtimes": {"ground", "runtimes"},
    "deploy": {"ground", "method", "features", "runtimes", "deploy"},
    "demo": {"ground", "method", "features", "demo"},
    "serving": {"ground", "method", "features", "runtimes", "deploy", "serving"},
    "pipeline": {"ground", "method", "features", "runtimes", "deploy", "demo", "pipeline"},
    "benchmark": {"ground", "method", "features", "runtimes", "deploy", "demo", "pipeline", "serving", "benchmark"},
    "upgrade": {"ground", "method", "features", "runtimes", "deploy", "demo", "pipeline", "serving", "benchmark",
                "upgrade"},
    "cli": {"ground", "method", "features", "runtimes", "deploy", "demo", "pipeline", "serving", "benchmark", "upgrade",
            "cli"},
}


def layer_of(parts: list[str]) -> str:
    """The layer of a module given its dotted path inside the package."""
    if not parts or parts[0] in GROUND:
        return "ground"
    if parts[0] == "cli":
        return "cli"
    assert parts[0] in ALLOWED, f"module {'.'.join(parts)} is in no layer: add it to docs/architecture.md and here"
    return parts[0]


def imported_modules(path: Path) -> list[tuple[int, list[str]]]:
    """(line, dotted path inside the package) of every import of our own modules in ``path``."""
    here = list(path.relative_to(PACKAGE).with_suffix("").parts)
    package = here[:-1] if here[-1] != "__init__" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                # "from . import demo" imports a module; "from . import __version__" a name
                modules = [alias.name for alias in node.names if not node.module and (
                    PACKAGE.joinpath(*base, alias.name).is_dir() or PACKAGE.joinpath(*base, f"{alias.name}.py").is_file())]
                found += [(node.lineno, target + [name]) for name in modules] or [(node.lineno, target)]
            elif node.module and node.module.split(".")[0] == "transmiter_deploy":
                found.append((node.lineno, node.module.split(".")[1:]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[1:]) for alias in node.names
                      if alias.name.split(".")[0] == "transmiter_deploy"]
    return found


def test_every_import_goes_to_the_same_layer_or_below():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = layer_of(list(path.relative_to(PACKAGE).with_suffix("").parts))
        for line, target in imported_modules(path):
            if layer_of(target) not in ALLOWED[layer]:
                violations.append(f"{path.relative_to(PACKAGE)}:{line} ({layer}) imports "
                                  f"{'.'.join(target)} ({layer_of(target)})")
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_the_checker_sees_an_upward_import(tmp_path):
    # negative control: the walk above must catch a method module importing the pipeline
    module = PACKAGE / "method" / "_upward_probe.py"
    module.write_text("def f():\n    from ..pipeline.recipe import load_recipe\n", encoding="utf-8")
    try:
        targets = imported_modules(module)
        assert targets == [(2, ["pipeline", "recipe"])]
        assert layer_of(targets[0][1]) not in ALLOWED["method"]
    finally:
        module.unlink()


def test_the_registry_imports_without_torch():
    code = ("import sys, transmiter_deploy.runtimes.registry as r; r.families(); r.default_precisions(); "
            "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('torch', 'onnxruntime')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---- the package's structure: no private names across modules, no import cycle, short functions ----
MAX_FUNCTION_LINES = 80  # docs/architecture.md: "no function over 80 lines"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def resolve_module(parts: list[str]) -> str | None:
    """The dotted name of our module a dotted path inside the package denotes (a module file or
    a package), or None when it names something inside a module."""
    if not parts:
        return "__init__"
    if PACKAGE.joinpath(*parts).is_dir():
        return ".".join(parts)
    if PACKAGE.joinpath(*parts[:-1], f"{parts[-1]}.py").is_file():
        return ".".join(parts)
    return None


def import_edges(path: Path, tree: ast.Module) -> list[tuple[int, str, str | None]]:
    """(line, module imported, name imported from it or None) for every import of our modules in
    ``tree`` (the module at ``path``), module-level and inside functions."""
    here = list(path.relative_to(PACKAGE).with_suffix("").parts)
    package = here[:-1]
    edges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "transmiter_deploy":
                base = node.module.split(".")[1:]
            else:
                continue
            owner = resolve_module(base)
            for alias in node.names:
                submodule = resolve_module(base + [alias.name])
                if submodule is not None:
                    edges.append((node.lineno, submodule, None))
                elif owner is not None:
                    edges.append((node.lineno, owner, alias.name))
        elif isinstance(node, ast.Import):
            edges += [(node.lineno, resolve_module(alias.name.split(".")[1:]), None) for alias in node.names
                      if alias.name.split(".")[0] == "transmiter_deploy"]
    return [edge for edge in edges if edge[1] is not None]


def private_imports(path: Path, tree: ast.Module) -> list[str]:
    """Imports in ``tree`` of another module's private names (``_name``, not ``__name__``)."""
    own = module_name(path)
    return [f"{path.relative_to(PACKAGE)}:{line} imports {name} from {target}"
            for line, target, name in import_edges(path, tree)
            if name is not None and name.startswith("_") and not name.startswith("__") and target != own]


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(encoding="utf-8"))) for path in sorted(PACKAGE.rglob("*.py"))]


def test_no_module_imports_another_modules_private_names():
    violations = [line for path, tree in package_modules() for line in private_imports(path, tree)]
    assert violations == [], "private names imported across modules:\n" + "\n".join(violations)


def test_no_import_cycle_among_the_modules():
    graph: dict[str, set[str]] = {}
    for path, tree in package_modules():
        own = module_name(path)
        # a package's __init__ is imported with any of its modules: an edge to it is not a dependency
        graph[own] = {target for _, target, _ in import_edges(path, tree)
                      if target != own and not PACKAGE.joinpath(*target.split(".")).is_dir()
                      and target != "__init__"}
    assert import_cycles(graph) == []


def test_no_function_is_over_80_lines():
    long = [f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in package_modules() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_structure_checks_see_a_private_import_and_a_cycle():
    # negative controls: a deploy module importing a pipeline private name, and a two-module cycle
    path = PACKAGE / "deploy" / "probe.py"
    tree = ast.parse("from ..pipeline.export_run import _hidden, ExportRun\nfrom .fusion import _own\n")
    assert private_imports(path, tree) == ["deploy/probe.py:1 imports _hidden from pipeline.export_run",
                                           "deploy/probe.py:2 imports _own from deploy.fusion"]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


OUTSIDE_REFERENCES = ("DESIGN.md", "../shared", "shared/layout")  # notes users of the repository do not have


def test_code_and_docs_cite_only_files_inside_the_repository():
    root = PACKAGE.parent
    files = [*PACKAGE.rglob("*.py"), *root.joinpath("docs").glob("*.md"), root / "README.md",
             *root.joinpath("benchmarks").glob("*.py")]
    cited = [f"{path.relative_to(root)}:{number}" for path in files
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
             if any(reference in line for reference in OUTSIDE_REFERENCES)]
    assert cited == [], "citations of files outside the repository:\n" + "\n".join(cited)


def test_code_comments_cite_no_issue_tracker():
    # a comment says why in its own words; another project's issue number is not a file of ours
    root = PACKAGE.parent
    files = [*PACKAGE.rglob("*.py"), *root.joinpath("benchmarks").glob("*.py"),
             *(path for path in root.joinpath("cpp").rglob("*") if path.suffix in (".cpp", ".h", ".hpp", ".txt"))]
    cited = [f"{path.relative_to(root)}:{number}" for path in files
             for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1)
             if re.search(r"\bissues?\s+#\d+", line)]
    assert cited == [], "issue-tracker citations in code:\n" + "\n".join(cited)


def test_runtimes_names_one_thing_the_registry():
    # RUNTIMES is the registry's table of runtimes; a list of runtimes elsewhere has its own name
    defined = [f"{path.relative_to(PACKAGE)}:{node.lineno}" for path, tree in package_modules() for node in tree.body
               if isinstance(node, (ast.Assign, ast.AnnAssign))
               and any(isinstance(target, ast.Name) and target.id == "RUNTIMES"
                       for target in (node.targets if isinstance(node, ast.Assign) else [node.target]))]
    assert len(defined) == 1 and defined[0].startswith("runtimes/registry.py:"), defined
