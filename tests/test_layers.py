"""The package's layers, checked from its source: every import (module-level or inside a
function) goes to the same layer or one below it, as docs/architecture.md draws them."""

import ast
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
    "pipeline": {"ground", "method", "features", "runtimes", "deploy", "demo", "pipeline"},
    "benchmark": {"ground", "method", "features", "runtimes", "deploy", "demo", "pipeline", "benchmark"},
    "cli": {"ground", "method", "features", "runtimes", "deploy", "demo", "pipeline", "benchmark", "cli"},
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
