"""The steps after a verified export, shared by single-task and bank exports: an engine per
pixels graph for each engine runtime the recipe names, and validation of every runtime the recipe
names against PyTorch, with runners the registry builds (one active at a time).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from ..artifacts import MANIFESTS, read_json, write_json
from ..errors import DependencyError, InputError
from ..runtimes.base import GraphFile, InputSpec, Runner, RunSettings
from ..runtimes.registry import PRECISIONS, RUNTIMES
from .export_run import ExportRun

ENGINES_DIR = "engines"
VALIDATION = "validation.json"


def pixel_graphs(run: ExportRun) -> list[str]:
    """The exported pixels -> outputs graphs, one per precision (and a bank's backbone graphs)."""
    files = read_json(run.onnx_dir / MANIFESTS["export"], "export manifest")["files"]
    return sorted(name for name in files if name.startswith(("model", "backbone")) and name.endswith(".onnx"))


def drop_unasked_calibrated(run: ExportRun, directory: Path, step: str,
                            manifest_format: tuple[str, int] | None = None) -> list[str]:
    """Calibrated graphs an earlier run added to ``directory`` (an export, or a bank's backbone
    export: ``manifest_format``) that this recipe no longer asks for leave it, and the step that
    added them (``step``, formatted with the precision's name) is forgotten; returns their names."""
    from ..deploy.precision_edits import remove_precision

    removed = []
    for name, entry in PRECISIONS.items():
        if (entry.needs_calibration and name not in run.precisions
                and remove_precision(directory, entry, *([manifest_format] if manifest_format else []))):
            run.log(f"removed the {name} graphs from {directory} (the recipe no longer asks for {name})")
            run.steps.forget(step.format(name))
            removed.append(name)
    return removed


def gate_images(run: ExportRun):
    """The gate images of ``run``'s task: its labelled test images, or else held-out training
    images (agreement only); and how many training images were held out."""
    from ..deploy.calibration import held_out, preprocess_records
    from ..deploy.gate import GateImages
    from ..features.datasets import open_dataset

    model, agreement = run.models["target"], run.recipe.export.calibration.agreement
    advisory = (f"advisory: the target {model.identity.describe()} has random weights, whose accuracy is "
                "chance; the criteria are reported, finite outputs required"
                if model.identity.init_seed is not None else None)
    if "test" in run.splits:
        records = open_dataset(run.splits["test"], run.classes).records
        labels = np.array([record.label for record in records])
        return GateImages(preprocess_records(model, records).numpy(), labels, run.task.data.base_classes,
                          "test images", agreement, advisory), 0
    pixels = held_out(model, run.splits["train"], run.recipe.export.calibration.seed)
    return GateImages(pixels.numpy(), None, description=f"{len(pixels)} held-out training images (agreement "
                                                        "only: the recipe has no test images)",
                      agreement=agreement, advisory=advisory), len(pixels)


def engine_steps(run: ExportRun) -> list[str]:
    """One engine per exported pixels graph, over the recipe's batch range, when the recipe names
    a runtime that runs engines (TensorRT); returns the engine steps' keys (empty where none could
    be built: then each manifest holds a trtexec command)."""
    from ..runtimes.tensorrt import BatchProfile, build_engine, engine_path, manifest_path, tensorrt_available

    if not any(entry.loads == "engine" and entry.family in run.recipe.runtimes for entry in RUNTIMES.values()):
        return []
    export = run.recipe.export
    profile = BatchProfile(export.batch.min, export.batch.opt, export.batch.max)
    files = read_json(run.onnx_dir / MANIFESTS["export"], "export manifest")["files"]
    keys = []
    for graph in pixel_graphs(run):
        engine = engine_path(Path(graph), run.out / ENGINES_DIR)
        reason = tensorrt_available()
        if reason is not None:
            if not engine_command_recorded(engine, files[graph]["sha256"], profile, export.workspace_mib):
                try:
                    build_engine(run.onnx_dir / graph, engine, profile, export.workspace_mib)
                except DependencyError:
                    pass  # expected here: the manifest now holds the trtexec command
            run.steps.unavailable(f"tensorrt-{graph}", f"{reason}; trtexec command in {manifest_path(engine)}")
            continue
        inputs = {"onnx": files[graph]["sha256"], "profile": asdict(profile), "workspace_mib": export.workspace_mib}
        if files[graph].get("external_data"):  # the weights an engine is built from are in them
            inputs["external_data"] = [files[name]["sha256"] for name in files[graph]["external_data"] if name in files]
        keys.append(run.steps.run(
            f"tensorrt-{graph}", inputs,
            [engine, manifest_path(engine)],
            lambda graph=graph, engine=engine: build_engine(run.onnx_dir / graph, engine, profile,
                                                            export.workspace_mib)))
    return keys


def engine_command_recorded(engine: Path, onnx_sha256: str, profile, workspace_mib: int) -> bool:
    """Whether the manifest beside ``engine`` already holds the trtexec command for this graph,
    profile and workspace: then it is left as it is, byte for byte (a bank's unchanged backbone)."""
    from ..runtimes.tensorrt import manifest_path

    try:
        record = read_json(manifest_path(engine), "engine manifest")
    except InputError:
        return False
    return (record.get("built") is False and record.get("onnx_sha256") == onnx_sha256
            and record.get("profile") == asdict(profile) and record.get("workspace_mib") == workspace_mib)


def validation_runners(run: ExportRun, input_shape: tuple, module: Callable, graphs: list[str]) -> tuple[list, list[str]]:
    """A runner (not yet active) for every registered runtime the recipe names, other than the
    reference, each built by the registry: ``module`` (a zero-argument builder of the PyTorch
    module) for module runtimes, each of ``graphs`` (in the export directory) for the others
    (runtimes that compile a graph find it in the export's engines folder); and why each
    unavailable runtime is not run."""
    settings = RunSettings(compiled_dir=run.out / ENGINES_DIR)
    candidates, skipped = [], []
    for entry in RUNTIMES.values():
        if entry.reference or entry.family not in run.recipe.runtimes:
            continue
        reason = entry.unavailable()
        if reason is not None:
            skipped.append(f"{entry.name}: {reason}")
            continue
        if entry.loads == "module":
            candidates.append(entry.create(module, settings, input_spec=InputSpec("pixel_values", input_shape)))
        else:
            candidates += [entry.create(GraphFile(run.onnx_dir / graph), settings) for graph in graphs]
    return candidates, skipped


def runtime_environments(run: ExportRun) -> dict[str, dict]:
    """What decides each named runtime's results here besides the graphs (e.g. ONNX Runtime's
    providers): part of the validation step's key, so a changed runtime validates again."""
    return {entry.name: entry.environment() for entry in RUNTIMES.values()
            if entry.family in run.recipe.runtimes and entry.unavailable() is None}


def validation_step(run: ExportRun, inputs: dict, pixels: Callable[[], np.ndarray], module: Callable,
                    graphs: Callable[[], list[str]], judge_rows: Callable[[Runner, np.ndarray], list[dict]]
                    ) -> tuple[list[dict], list[str]]:
    """The ``validate`` step: every available runtime the recipe names (:func:`validation_runners`)
    run on ``pixels()`` and judged by ``judge_rows(runner, pixels)`` against PyTorch, one runner
    active at a time, into ``validation.json``; keyed by ``inputs``, the recipe's runtimes and
    their environments. Returns the table's rows and why each skipped runtime was skipped."""

    def validate() -> None:
        images = pixels()
        candidates, skipped = validation_runners(run, (None, *images.shape[1:]), module, graphs())
        rows = []
        for candidate in candidates:
            with candidate:
                rows += [{"graph": candidate.graph, **row} for row in judge_rows(candidate, images)]
        write_json(run.out / VALIDATION, {"images": int(len(images)), "rows": rows, "skipped": skipped})

    run.steps.run("validate", {**inputs, "runtimes": list(run.recipe.runtimes),
                               "environments": runtime_environments(run)}, [run.out / VALIDATION], validate)
    validation = read_json(run.out / VALIDATION, "validation table")
    return validation["rows"], validation.get("skipped", [])
