"""Shared fixtures: small data the tests make themselves (no downloads anywhere)."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def draw_image(colour: tuple[int, int, int], seed: int, size: int = 40) -> Image.Image:
    """A coloured square on a noisy background: deterministic per seed."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    x, y = rng.integers(2, size // 2, size=2)
    pixels[y : y + size // 2, x : x + size // 2] = colour
    return Image.fromarray(pixels)


def make_image_folder(root: Path, per_class: int = 3, classes: dict = COLOURS) -> Path:
    for index, (name, colour) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_image(colour, seed=100 * index + i).save(root / name / f"{i:03d}.png")
    return root


# Fixtures that start a live cluster or server, and the session's demo exports (minutes to make
# on 2 cores): a test that uses one, directly or through another fixture, is marked ``cluster`` or
# ``demo_exports`` (left out of ``make test-fast``, run by ``make test``).
MARKED_FIXTURES = {"cluster": {"ray_local_cluster"},
                   "demo_exports": {"demo_export", "demo_bank_export", "demo_int8_export", "demo_external_export",
                                    "family_exports"}}


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for marker, fixtures in MARKED_FIXTURES.items():
            if fixtures & used:
                item.add_marker(getattr(pytest.mark, marker))
    items.sort(key=run_order)


def run_order(item) -> int:
    """Where a test runs (a stable sort: every other order is kept). make test builds the C++ runtime
    beside the tests (scripts/test_suite.sh): the tests marked ``cluster`` (a live Ray cluster or
    Triton server) run last, when the builds have most likely ended: a Ray cluster's processes are
    the tests most slowed by compilers on the same two cores. (tests/cpp run in a pytest process of
    their own there, after the builds.)"""
    return 1 if item.get_closest_marker("cluster") else 0


@pytest.fixture(autouse=True)
def torch_threads_kept():
    """Every test leaves torch's thread count as it found it: float results depend on it (a
    reduction split over another number of threads rounds differently), and a session fixture made
    before a leak would no longer match what later tests compute bit for bit."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"the test changed torch's thread count from {before} to {after}")


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and link under ``root`` by relative path, with its sha256 (links by target)."""
    digest = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            digest[str(path.relative_to(root))] = "-> " + str(path.readlink())
        elif path.is_file():
            digest[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def assert_unchanged(root: Path, before: dict[str, str], fixture: str) -> None:
    """The rule for session fixtures: tests read them and write elsewhere (a copy: copy_tree)."""
    after = tree_digest(root)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"a test changed the session fixture {fixture}: {changed[:10]}"


def shared_root(tmp_path_factory) -> Path:
    """Where the run's pytest processes share their session fixtures' work: the directory that
    make test names in TRANSMITER_TEST_SHARED (scripts/test_suite.sh runs tests/cpp in a second
    process beside the others), else the common temporary root of pytest-xdist's workers
    (``make test TEST_WORKERS=N``), else this process's own."""
    named = os.environ.get("TRANSMITER_TEST_SHARED")
    if named:
        return Path(named)
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"


@contextmanager
def made_once(tmp_path_factory, name: str) -> Iterator[tuple[Path, bool]]:
    """``(directory, first)`` of a session fixture's work, shared by the run's processes (each has
    its own session, and would make the fixtures' exports again). The directory sits in
    :func:`shared_root`; a file lock lets the first process to come make it (``first``: True) while
    the others wait, then find it made (a failed making leaves it to the next one). With one
    process it is the first."""
    root = shared_root(tmp_path_factory)
    root.mkdir(parents=True, exist_ok=True)
    directory, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        first = not done.exists()
        if first:
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
        yield directory, first
        if first:
            done.write_text("made\n")


def save_outcome(outcome, path: Path) -> None:
    """An export's outcome as JSON, for the workers that did not run it (:func:`made_once`)."""
    path.write_text(json.dumps(dataclasses.asdict(outcome), default=str))


def load_outcome(path: Path):
    """What :func:`save_outcome` wrote, as the ExportOutcome the run returned."""
    from transmiter_deploy.pipeline.report import ExportOutcome
    from transmiter_deploy.pipeline.steps import StepRecord

    fields = json.loads(path.read_text())
    fields["steps"] = [StepRecord(**step) for step in fields["steps"]]
    fields["out_dir"] = Path(fields["out_dir"])
    fields["export_dir"] = Path(fields["export_dir"]) if fields["export_dir"] else None
    return ExportOutcome(**fields)


def export_once(tmp_path_factory, name: str, recipe_text: str, prepare=None):
    """``(recipe, outcome)`` of ``recipe_text`` exported into ``<shared>/<name>/out`` once per run
    (:func:`made_once`); ``prepare(directory)`` first fills the directory (a copied export)."""
    from transmiter_deploy.pipeline.export import run_export
    from transmiter_deploy.pipeline.recipe import load_recipe

    with made_once(tmp_path_factory, name) as (directory, first):
        path = directory / "recipe.yaml"
        if first:
            if prepare is not None:
                prepare(directory)
            path.write_text(recipe_text)
            outcome = run_export(load_recipe(path), directory / "out", progress=False, log=lambda _: None)
            save_outcome(outcome, directory / "outcome.json")
    return load_recipe(path), load_outcome(directory / "outcome.json")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


def clip_like_logits(samples: int, width: int, feature_dim: int = 32, seed: int = 0, scale: float = 20.0):
    """Logits shaped like CLIP's: scale * cosine(features, head rows). Returns (logits, features, head)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(samples, feature_dim, generator=generator), dim=1)
    head = torch.nn.functional.normalize(torch.randn(width, feature_dim, generator=generator), dim=1) * scale
    return features @ head.T, features, head


def make_head_and_adapter(feature_dim: int, width: int, num_classes: int, latent_dim: int | None = None,
                          model=None, seed: int = 0, scale: float = 100.0, mlp_scale: float = 0.05):
    """A head of ``model`` (C x d, CLIP-like) and a non-trivial adapter that applies to it."""
    from transmiter_deploy.method.adapter import AdapterConfig, TransMiterAdapter
    from transmiter_deploy.features.adapter_artifact import AdapterArtifact
    from transmiter_deploy.features.heads import ZeroShotHead
    from transmiter_deploy.features.models import ModelIdentity

    identity = model.identity if model is not None else ModelIdentity("TM-Tiny-ViT", init_seed=0)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.functional.normalize(torch.randn(width, feature_dim, generator=generator) + 0.3, dim=1) * scale
    names = [f"class {i}" for i in range(width)]
    head = ZeroShotHead(weight, names[:num_classes], names[num_classes:], identity, ("{}",), scale)
    config = AdapterConfig(num_task_classes=num_classes, logit_width=width, latent_dim=latent_dim or width, num_layers=1)
    adapter = TransMiterAdapter(config, seed=seed)
    with torch.no_grad():  # a trained-looking MLP: the adapter is no longer the identity
        for parameter in adapter.blocks.parameters():
            parameter.add_(mlp_scale * torch.randn(parameter.shape, generator=generator))
    artifact = AdapterArtifact(adapter, head.class_names, head.auxiliary_names, "transferred",
                               ModelIdentity("TM-Tiny-RN", init_seed=0), identity)
    return head, artifact


# The demo recipe at a size the test suite can afford: the shipped demo models, a small task.
SMALL_DEMO = """\
name: small-demo
source: {name: TM-Demo-Source, demo_weights: TM-Demo-Source}
finetuned: {name: TM-Demo-Source, demo_weights: TM-Demo-Source-ft-colours-tinted}
target: {name: TM-Demo-Target, demo_weights: TM-Demo-Target}
data: {demo_task: colours-tinted, train_per_class: 40, test_per_class: 8}
head: {logit_width: 64}
extraction: {epochs: 3}
transfer: {regularisation: 500}
plus: {shots: 2, epochs: 2}
export: {precisions: [fp32, fp16], batch: {min: 1, opt: 4, max: 8}}
"""


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory):
    """``(recipe, outcome)`` of the small demo recipe, exported once per run (:func:`export_once`).

    Shared by the export-pipeline tests and the C++ runtime tests (tests/cpp/); tests read it and
    write elsewhere (:func:`copy_export`, :func:`copy_tree`).
    """
    recipe, outcome = export_once(tmp_path_factory, "demo-export", SMALL_DEMO)
    before = tree_digest(outcome.out_dir)
    yield recipe, outcome
    assert_unchanged(outcome.out_dir, before, "demo_export")


# A bank of two demo tasks at the small demo's size; its colours_tinted task has exactly the
# settings of SMALL_DEMO, so its accuracy table must equal the single-task export's.
SMALL_BANK = """\
name: small-bank
source: {name: TM-Demo-Source, demo_weights: TM-Demo-Source}
target: {name: TM-Demo-Target, demo_weights: TM-Demo-Target}
data: {train_per_class: 40, test_per_class: 8}
head: {logit_width: 64}
extraction: {epochs: 3}
transfer: {regularisation: 500}
plus: {shots: 2, epochs: 2}
tasks:
  - name: colours_tinted
    finetuned: {name: TM-Demo-Source, demo_weights: TM-Demo-Source-ft-colours-tinted}
    data: {demo_task: colours-tinted}
  - name: textures_foggy
    finetuned: {name: TM-Demo-Source, demo_weights: TM-Demo-Source-ft-textures-foggy}
    data: {demo_task: textures-foggy}
export: {precisions: [fp32, fp16], batch: {min: 1, opt: 4, max: 8}}
"""
THIRD_BANK_TASK = """\
  - name: colours_dusk
    finetuned: {name: TM-Demo-Source, demo_weights: TM-Demo-Source-ft-colours-dusk}
    data: {demo_task: colours-dusk}
"""


def bank_recipe_text(extra_tasks: str = "") -> str:
    """SMALL_BANK with more tasks appended to its list."""
    return SMALL_BANK.replace("export: {", extra_tasks + "export: {")


@pytest.fixture(scope="session")
def demo_bank_export(tmp_path_factory) -> Path:
    """The ``--out`` directory of the small two-task bank, exported once per run (the bank
    is ``<out>/onnx``; :func:`made_once`); tests that change it work on a copy (:func:`copy_tree`)."""
    from transmiter_deploy.pipeline.bank_export import run_bank_export
    from transmiter_deploy.pipeline.recipe import load_recipe

    with made_once(tmp_path_factory, "demo-bank") as (directory, first):
        if first:
            (directory / "recipe.yaml").write_text(SMALL_BANK)
            run_bank_export(load_recipe(directory / "recipe.yaml"), directory / "out", progress=False,
                            log=lambda _: None)
    before = tree_digest(directory / "out")
    yield directory / "out"
    assert_unchanged(directory / "out", before, "demo_bank_export")


# What the suite upgrades the demo bank onto (docs/upgrade.md): another architecture with another
# image size (32 px against 48) and feature width (64 against 96), random weights.
BANK_UPGRADE_TARGET = {"name": "TM-Tiny-ViT", "init_seed": 0}
BANK_TASKS = ("colours_tinted", "textures_foggy")


@pytest.fixture(scope="session")
def demo_bank_upgrade(tmp_path_factory, demo_bank_export) -> Path:
    """The small bank upgraded onto :data:`BANK_UPGRADE_TARGET` (generation 2), once per run, every
    task accepted by name so that the upgrade goes ahead whatever its verdicts (tests/test_upgrade.py
    checks them; tests/test_triton_generations.py serves it as the next version)."""
    from transmiter_deploy.pipeline.recipe import ModelRef
    from transmiter_deploy.upgrade.run import upgrade_export
    from transmiter_deploy.upgrade.settings import LatencySettings

    with made_once(tmp_path_factory, "demo-bank-upgrade") as (directory, first):
        if first:
            upgrade_export(demo_bank_export, ModelRef(**BANK_UPGRADE_TARGET), directory / "out", accept=BANK_TASKS,
                           latency=LatencySettings(batches=(1,), budget_s=0.5, min_rounds=3), progress=False,
                           log=lambda _: None)
    before = tree_digest(directory / "out")
    yield directory / "out"
    assert_unchanged(directory / "out", before, "demo_bank_upgrade")


def copy_tree(source: Path, target: Path) -> Path:
    """A copy that shares no inodes with ``source`` (hard-linked files are copied as separate files),
    so a test can change it without touching the session fixture."""
    shutil.copytree(source, target, symlinks=True)
    return target


# The same recipe asking for int8 as well (calibrated and gated: tests/test_int8.py).
SMALL_DEMO_INT8 = SMALL_DEMO.replace("precisions: [fp32, fp16]", "precisions: [fp32, fp16, int8]")


def copy_export(demo_export, tmp_path: Path, recipe_text: str = SMALL_DEMO_INT8) -> tuple[Path, Path]:
    """``(recipe, out)``: the session's finished demo export copied to ``tmp_path`` with a recipe
    asking for more, so only the new steps run."""
    import shutil

    _, outcome = demo_export
    out = tmp_path / "out"
    shutil.copytree(outcome.out_dir, out)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text)
    return path, out


@pytest.fixture(scope="session")
def demo_int8_export(demo_export, tmp_path_factory):
    """``(out, outcome)`` of the small demo export with int8 added (once per run)."""
    _, outcome = export_once(tmp_path_factory, "int8", SMALL_DEMO_INT8,
                             lambda directory: shutil.copytree(demo_export[1].out_dir, directory / "out"))
    return outcome.out_dir, outcome


@pytest.fixture(scope="session")
def flow(tmp_path_factory) -> Path:
    """The hostile cases' tiny workspace (tests/hostile/hostile_support.py): caches, heads and
    adapters of the tiny towers, and their ``images``, made once per run through the CLI."""
    from hostile.hostile_support import make_flow

    with made_once(tmp_path_factory, "hostile-flow") as (root, first):
        if first:
            make_flow(root, make_image_folder(root / "images", per_class=4))
    before = tree_digest(root)
    yield root
    assert_unchanged(root, before, "flow")


# The small demo recipe with ONNX external data forced on (tests/test_external_data.py, and the
# C++ backend's tests/cpp/test_cpp_external_data.py): every graph keeps its tensors in GRAPH.onnx.data.
SMALL_DEMO_EXTERNAL = SMALL_DEMO.replace("export: {", "export: {external_data_threshold: 0, ")


@pytest.fixture(scope="session")
def demo_external_export(demo_export, tmp_path_factory):
    """``(recipe, outcome)`` of the small demo export re-run with ``external_data_threshold: 0``
    (once per run): the session's finished export copied, so only the steps that write graphs run
    again. The copied inline graphs are kept in ``<out>/../inline-onnx`` first: they were made from
    the very adapter and head files the re-run reads."""

    def prepare(directory: Path) -> None:
        shutil.copytree(demo_export[1].out_dir, directory / "out")
        shutil.copytree(directory / "out" / "onnx", directory / "inline-onnx")

    return export_once(tmp_path_factory, "external", SMALL_DEMO_EXTERNAL, prepare)


def damage_external_data(directory: Path, case: str, graph: str = "model.onnx", other: str = "model_fp16.onnx") -> None:
    """Damage the data file of ``directory/graph`` as users' copies and disks do: ``missing``,
    ``renamed``, ``truncated`` (to half), ``swapped`` (``other``'s data file in its place),
    ``tampered`` (same size, one byte changed) or ``graph-points-elsewhere`` (the graph edited to
    read ``other``'s data file)."""
    import onnx

    data = directory / f"{graph}.data"
    if case == "missing":
        data.unlink()
    elif case == "renamed":
        data.rename(directory / "weights.data")
    elif case == "truncated":
        with open(data, "r+b") as handle:
            handle.truncate(data.stat().st_size // 2)
    elif case == "swapped":
        data.unlink()
        shutil.copy(directory / f"{other}.data", data)
    elif case == "tampered":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.unlink()  # a new file: never write through a link to another copy
        data.write_bytes(bytes(raw))
    elif case == "graph-points-elsewhere":
        model = onnx.load(directory / graph, load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = f"{other}.data"
        onnx.save(model, directory / graph)
    else:
        raise AssertionError(case)


def polygraphy_validate(graph: Path) -> None:
    """What ``polygraphy run GRAPH --onnxrt --validate --input-shapes ...`` checks, through
    Polygraphy's own Python API in this process (the command line's import alone costs seconds per
    graph): the graph runs in ONNX Runtime on Polygraphy's generated data, symbolic axes 2, and
    every output is free of NaN and inf."""
    import onnx
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import Comparator, DataLoader

    metadata = TensorMetadata()
    for value in onnx.load(graph, load_external_data=False).graph.input:
        metadata.add(value.name, dtype=None,
                     shape=[d.dim_value if d.HasField("dim_value") else 2 for d in value.type.tensor_type.shape.dim])
    results = Comparator.run([OnnxrtRunner(SessionFromOnnx(str(graph)))], data_loader=DataLoader(input_metadata=metadata))
    assert Comparator.validate(results, check_inf=True, check_nan=True), f"{graph}: Polygraphy's validation failed"


# The family matrix (tests/test_families.py, tests/cpp/test_cpp_families.py): one tiny random
# configuration per open_clip image-tower family (transmiter_deploy/model_configs/TM-Tiny-*.json),
# chained in a ring so that each family is the source of one export and the target of the next.
FAMILIES = ("TM-Tiny-ViT", "TM-Tiny-RN", "TM-Tiny-ConvNeXt", "TM-Tiny-EVA02", "TM-Tiny-SigLIP", "TM-Tiny-SigLIP2",
            "TM-Tiny-MobileCLIP")
FAMILY_PAIRS = tuple((FAMILIES[i], FAMILIES[(i + 1) % len(FAMILIES)]) for i in range(len(FAMILIES)))
FAMILY_RECIPE = """\
name: family-{index}
source: {{name: {source}, init_seed: 0}}
finetuned: {{name: {source}, init_seed: 1}}
target: {{name: {target}, init_seed: 2}}
data: {{demo_task: colours-tinted, train_per_class: 8, test_per_class: 4}}
head: {{logit_width: 32}}
extraction: {{epochs: 1}}
plus: {{shots: 2, epochs: 1}}
export: {{precisions: [fp32, fp16, int8], batch: {{min: 1, opt: 4, max: 8}}, calibration: {{images: 32, minimum: 16}}}}
runtimes: [pytorch, onnxruntime]
"""


def family_pair_id(pair: tuple[str, str]) -> str:
    return "{}-to-{}".format(*(name.removeprefix("TM-Tiny-") for name in pair))


@pytest.fixture(scope="session")
def family_exports(tmp_path_factory):
    """``export(pair) -> (status, out)``: the ring's export of ``pair`` through ``transmiter export``
    (the CLI's ``main``), run once per run (:func:`made_once`) and shared by the matrix's Python and
    C++ tests."""
    from transmiter_deploy.cli import main

    done: dict[tuple[str, str], tuple[int, Path]] = {}

    def export(pair: tuple[str, str]) -> tuple[int, Path]:
        if pair not in done:
            with made_once(tmp_path_factory, f"family-{family_pair_id(pair)}") as (root, first):
                if first:
                    recipe = root / "recipe.yaml"
                    recipe.write_text(FAMILY_RECIPE.format(index=FAMILY_PAIRS.index(pair), source=pair[0],
                                                           target=pair[1]))
                    status = main(["--quiet", "export", str(recipe), "--out", str(root / "out")])
                    (root / "status").write_text(str(status))
            done[pair] = (int((root / "status").read_text()), root / "out")
        return done[pair]

    return export
