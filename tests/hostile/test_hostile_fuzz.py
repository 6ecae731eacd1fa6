"""Property-based fuzz (Hypothesis) of every file format the Python side reads back: random
mutations of real files (deleted keys, wrong types, huge numbers, deep nesting, long strings,
unicode, duplicate keys, truncation) must end in a result or in one error line of the toolkit's
own (InputError/IntegrityError and kin), never a traceback.

CI runs a few dozen examples per format (``FUZZ_EXAMPLES``, default 25, derandomised);
``benchmarks/fuzz_formats.py`` runs 10,000 per format and reports the outcome counts
(``FUZZ_REPORT``: where this module writes them).

Formats and the entry point each goes through: the recipe (``transmiter export --check``),
``cache.json``, ``head.json``, ``adapter.json`` (``transmiter evaluate``), the bank manifest
(``transmiter bank list``), the export manifest (``read_head``, what ``transmiter bank add`` reads
first), engine manifests (the export's record check), step records (the export's step runner).
``report.json`` is written, never read back."""

from __future__ import annotations

import atexit
import copy
import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from transmiter_deploy.cli import main
from transmiter_deploy.errors import TransmiterError, one_line

from conftest import SMALL_DEMO

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=list(HealthCheck))
OUTCOMES: dict[str, Counter] = defaultdict(Counter)


def _write_report() -> None:
    if os.environ.get("FUZZ_REPORT"):
        Path(os.environ["FUZZ_REPORT"]).write_text(json.dumps(OUTCOMES, indent=2) + "\n")


atexit.register(_write_report)

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from([10**400, -1, 0, 2**63, 1e308, "", "\u202e\u0000\ufffd", "é" * 50_000]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                            max_size=4), max_leaves=8)
KINDS = ("delete", "replace", "rename", "duplicate", "truncate", "deep", "long")


def _pick(node, data):
    """A (container, key) inside ``node``, drawn by walking down from the root."""
    parent, key = None, None
    while isinstance(node, (dict, list)) and node:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, data.draw(st.sampled_from(keys))
        node = node[key]
        if data.draw(st.booleans()):
            break
    return parent, key


def mutate(original: dict, data, as_yaml: bool = False) -> str:
    """One random mutation of ``original``, serialised (JSON, or YAML for recipes)."""
    kind = data.draw(st.sampled_from(KINDS))
    dump = (lambda o: yaml.safe_dump(o, allow_unicode=True)) if as_yaml else (lambda o: json.dumps(o, allow_nan=True))
    if kind == "truncate":
        text = dump(original)
        return text[:data.draw(st.integers(0, max(0, len(text) - 1)))]
    mutated = copy.deepcopy(original)
    parent, key = _pick(mutated, data)
    if parent is None:
        parent, key = mutated, next(iter(mutated))
    if kind == "delete":
        del parent[key]
    elif kind == "replace":
        parent[key] = data.draw(VALUES)
    elif kind == "rename" and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=10))] = parent.pop(key)
    elif kind == "long":
        parent[key] = data.draw(st.sampled_from(["x" * 200_000, ["x"] * 20_000, {str(i): i for i in range(5_000)}]))
    depth = data.draw(st.integers(20, 5_000)) if kind == "deep" else 0
    if kind == "deep":
        parent[key] = "@@DEEP@@"
    text = json.dumps(mutated, allow_nan=True) if depth or not as_yaml else dump(mutated)
    if depth:  # written as text: building it as a Python object would need the recursion it tests
        text = text.replace('"@@DEEP@@"', "[" * depth + "]" * depth)
    if kind == "duplicate" and isinstance(mutated, dict) and mutated:
        name = data.draw(st.sampled_from(list(mutated)))
        value = json.dumps(data.draw(VALUES), allow_nan=True)
        text = text.replace("{", "{" + json.dumps(name) + ": " + value + ", ", 1) if not as_yaml else \
            text + f"{name}: {value}\n"
    return text


def _cli(*args) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["--quiet", *map(str, args)])
    return status, err.getvalue()


def _expect_clean(fmt: str, status: int, err: str) -> None:
    assert "Traceback" not in err, err[-3000:]
    if status == 0:
        OUTCOMES[fmt]["result"] += 1
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert status in (2, 3, 4, 5) and len(lines) == 1 and lines[0].startswith("transmiter: error: "), (status, err[-3000:])
    OUTCOMES[fmt][f"exit {status}"] += 1


def _library(fmt: str, call) -> None:
    """A library entry point the CLI calls: a result, or one of the toolkit's errors in one line
    (the CLI prints exactly that line)."""
    try:
        call()
    except TransmiterError as exc:  # the CLI prints it as one line (errors.one_line)
        assert len(one_line(str(exc)).splitlines()) == 1
        OUTCOMES[fmt][f"exit {exc.exit_code}"] += 1
        return
    OUTCOMES[fmt]["result"] += 1


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _fresh(source: Path, target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return target


@FUZZ
@given(data=st.data())
def test_fuzzed_recipes(fuzz_root, data):
    recipe = fuzz_root / "recipe.yaml"
    recipe.write_text(mutate(yaml.safe_load(SMALL_DEMO), data, as_yaml=True), encoding="utf-8", errors="surrogateescape")
    _expect_clean("recipe", *_cli("export", recipe, "--check", "--out", fuzz_root / "never"))
    assert not (fuzz_root / "never").exists()


@pytest.mark.parametrize("fmt", ["cache.json", "head.json", "adapter.json"])
def test_fuzzed_artifact_manifests(flow, fuzz_root, fmt):
    artifact = {"cache.json": "c_src", "head.json": "h_src", "adapter.json": "a_src"}[fmt]
    original = json.loads((flow / artifact / fmt).read_text())

    @FUZZ
    @given(data=st.data())
    def run(data):
        target = _fresh(flow / artifact, fuzz_root / artifact)
        (target / fmt).write_text(mutate(original, data), encoding="utf-8", errors="surrogateescape")
        paths = {"c_src": flow / "c_src", "h_src": flow / "h_src", artifact: target}
        _expect_clean(fmt, *_cli("evaluate", "--cache", paths["c_src"], "--head", paths["h_src"],
                                 "--adapter", paths.get("a_src", flow / "a_src")))

    run()


def test_fuzzed_bank_manifests(demo_bank_export, fuzz_root):
    bank = demo_bank_export / "onnx"
    original = json.loads((bank / "manifest.json").read_text())

    @FUZZ
    @given(data=st.data())
    def run(data):
        target = _fresh(bank, fuzz_root / "bank")
        (target / "manifest.json").write_text(mutate(original, data), encoding="utf-8", errors="surrogateescape")
        _expect_clean("bank manifest.json", *_cli("bank", "list", target))

    run()


def test_fuzzed_export_manifests(demo_export, fuzz_root):
    from transmiter_deploy.deploy.bank import read_head

    _, outcome = demo_export
    original = json.loads((outcome.export_dir / "manifest.json").read_text())

    @FUZZ
    @given(data=st.data())
    def run(data):
        target = fuzz_root / "export"
        target.mkdir(exist_ok=True)
        for path in outcome.export_dir.iterdir():  # the graphs linked, the manifest written fresh
            if path.name != "manifest.json" and not (target / path.name).exists():
                os.link(path, target / path.name)
        (target / "manifest.json").write_text(mutate(original, data), encoding="utf-8", errors="surrogateescape")
        _library("export manifest.json", lambda: read_head(target))

    run()


def test_fuzzed_engine_and_step_records(fuzz_root):
    from transmiter_deploy.pipeline.deployment_steps import engine_command_recorded
    from transmiter_deploy.pipeline.steps import Steps
    from transmiter_deploy.runtimes.tensorrt import BatchProfile

    engine = {"format": "transmiter-deploy/tensorrt-engine", "format_version": 2, "built": False, "onnx": "model.onnx",
              "onnx_sha256": "0" * 64, "profile": {"min": 1, "opt": 8, "max": 32}, "workspace_mib": 4096,
              "trtexec": "trtexec --onnx=model.onnx", "input": {"name": "pixel_values", "shapes": {"min": [1, 3, 8, 8]}}}
    step = {"key": "k" * 64, "seconds": 1.5}

    @FUZZ
    @given(data=st.data())
    def run(data):
        (fuzz_root / "model.engine.json").write_text(mutate(engine, data), encoding="utf-8", errors="surrogateescape")
        _library("engine manifest", lambda: engine_command_recorded(fuzz_root / "model.engine", "0" * 64, BatchProfile(), 4096))
        steps = Steps(fuzz_root / "steps", force=False, log=lambda _: None)
        (fuzz_root / "steps" / ".steps" / "s.json").write_text(mutate(step, data), encoding="utf-8",
                                                                 errors="surrogateescape")
        _library("step record", lambda: steps.run("s", {}, [], lambda: None))

    run()
