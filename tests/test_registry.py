"""Completeness of the registry, in the spirit of Optimum's ``test_all_models_tested``: every
registered runtime has a runner, a benchmark caller, a recipe name and a test; every
registered precision has a converter, a tolerance, a recipe and CLI name and a parity test.
Adding an entry without the rest fails here."""

import re
from dataclasses import replace
from pathlib import Path

import pytest

from transmiter_deploy.runtimes import registry
from transmiter_deploy.runtimes.base import Runner

TESTS = Path(__file__).resolve().parent
MARK = re.compile(r"pytest\.mark\.(runtime|precision)\(\s*\"([^\"]+)\"\s*\)")


def marked(kind: str) -> set[str]:
    """Names given to ``@pytest.mark.<kind>("...")`` anywhere in the test suite."""
    return {name for path in TESTS.rglob("test_*.py") if path.name != "test_registry.py"
            for found, name in MARK.findall(path.read_text(encoding="utf-8")) if found == kind}


def code_gaps(what: str, target: str, usable) -> list[str]:
    """[] when the registry's ``"module:attribute"`` string names something usable."""
    try:
        found = registry.resolve(target)
    except (ImportError, AttributeError, ValueError) as exc:
        return [f"{what} {target} does not import ({exc})"]
    return [] if usable(found) else [f"{what} {target} is not usable here"]


def runtime_gaps(entry: registry.Runtime) -> list[str]:
    from transmiter_deploy.benchmark import runtimes as bench
    from transmiter_deploy.cli import cli
    from transmiter_deploy.pipeline.recipe import RUNTIME_FAMILIES as RECIPE_RUNTIMES

    gaps = code_gaps("runner", entry.runner, lambda cls: isinstance(cls, type) and issubclass(cls, Runner))
    if entry.loads not in registry.GRAPH_LOADS or entry.name not in bench.BENCH_RUNTIMES:
        gaps.append("no benchmark caller")
    if entry.family not in RECIPE_RUNTIMES:
        gaps.append("no recipe name")
    bench_runtime = next(p for p in cli.commands["bench"].params if p.name == "runtimes")
    if entry.name not in bench_runtime.type.choices:
        gaps.append("not a `transmiter bench --runtime` choice")
    if entry.name not in marked("runtime"):
        gaps.append(f'no test marked @pytest.mark.runtime("{entry.name}")')
    return gaps


def precision_gaps(entry: registry.Precision) -> list[str]:
    from transmiter_deploy.cli import cli
    from transmiter_deploy.pipeline.recipe import PRECISIONS as RECIPE_PRECISIONS

    gaps = code_gaps("converter", entry.converter, callable)
    if not 0 < entry.top1 <= 1 or (entry.max_abs is not None and entry.max_abs <= 0):
        gaps.append("no valid tolerance")
    if entry.name not in RECIPE_PRECISIONS:
        gaps.append("no recipe name")
    choice = next(p for p in cli.commands["export-onnx"].params if p.name == "precisions")
    if entry.name not in choice.type.choices:
        gaps.append("not a `transmiter export-onnx --precision` choice")
    if entry.name not in marked("precision"):
        gaps.append(f'no parity test marked @pytest.mark.precision("{entry.name}")')
    return gaps


@pytest.mark.parametrize("name", list(registry.RUNTIMES))
def test_every_registered_runtime_is_complete(name):
    assert runtime_gaps(registry.RUNTIMES[name]) == []


@pytest.mark.parametrize("name", list(registry.PRECISIONS))
def test_every_registered_precision_is_complete(name):
    assert precision_gaps(registry.PRECISIONS[name]) == []


def test_an_entry_without_its_code_and_tests_is_reported():
    runtime = registry.Runtime("npu", "npu", "transmiter_deploy.runtimes.npu:NpuRunner", "blob", "cpu")
    gaps = runtime_gaps(runtime)
    assert any("does not import" in gap for gap in gaps) and "no benchmark caller" in gaps
    assert "no recipe name" in gaps and any("no test marked" in gap for gap in gaps)
    precision = replace(registry.PRECISIONS["fp16"], name="fp8", converter="transmiter_deploy.deploy.precisions.fp8:convert")
    gaps = precision_gaps(precision)
    assert any("does not import" in gap for gap in gaps) and "no recipe name" in gaps
    assert any("no parity test" in gap for gap in gaps)


def test_names_suffixes_and_manifest_names_are_unique():
    precisions = registry.PRECISIONS.values()
    assert len({p.suffix for p in precisions}) == len({p.manifest_name for p in precisions}) == len(registry.PRECISIONS)
    assert [p.name for p in precisions if p.reference] == [registry.REFERENCE_PRECISION]
    assert [r.name for r in registry.RUNTIMES.values() if r.reference] == [registry.reference_runtime().name]
    assert all(r.loads in registry.GRAPH_LOADS and r.device in ("cpu", "cuda") for r in registry.RUNTIMES.values())


def test_lookups_refuse_unknown_names_in_one_line():
    from transmiter_deploy.errors import InputError

    with pytest.raises(InputError, match="unknown precision 'fp8' \\(known: fp32, fp16"):
        registry.precision("fp8")
    with pytest.raises(InputError, match="unknown runtime 'npu'"):
        registry.runtime("npu")
    assert registry.precision_from_manifest("mixed-fp16").name == "fp16"
