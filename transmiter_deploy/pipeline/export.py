"""`transmiter export RECIPE`: a single-task recipe run end to end, step by step, incrementally.

Steps: the task's steps (pipeline/task_steps.py: data, feature caches, heads, extract,
transfer, TransMiter+, teacher check, evaluate) -> ONNX (every precision of the recipe,
parity) -> each calibrated precision behind its gate -> engines -> validation on every
available runtime (pipeline/deployment_steps.py) -> report. Each step is keyed by the content
of what it reads (:mod:`.steps`) and skipped when unchanged; every step writes its outputs
atomically, so a failure leaves the previous outputs and every completed step usable.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..artifacts import MANIFESTS, atomic_directory, load_tensors, read_json, save_tensors, write_json
from ..runtimes.registry import PRECISIONS, reference_runtime
from .deployment_steps import drop_unasked_calibrated, engine_steps, gate_images, pixel_graphs, validation_step
from .export_run import REFERENCES, ExportRun, Models, key_external_data, key_lineage, model_specs, running_export
from .recipe import Recipe
from .report import ExportOutcome
from .steps import tree_sha256
from .task_steps import task_steps


def run_export(recipe: Recipe, out_dir: Path, force: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> ExportOutcome:
    """Run a validated recipe; returns what ran, what was skipped and why, and the accuracy table."""
    failures = []
    with running_export(recipe, out_dir, force, progress, log) as (run, outcome):
        run.models = Models(model_specs(recipe))
        run.model_keys = run.models.model_keys
        outcome.accuracy = task_steps(run)
        outcome.teacher_check = run.teacher_check
        outcome.stand_in_tokenizers = run.stand_in_tokenizers()
        _onnx(run)
        outcome.export_dir = run.onnx_dir
        _drop_unasked(run)
        for name in run.precisions:
            if PRECISIONS[name].needs_calibration:
                failure = _calibrated(run, name, outcome)
                failures += [failure] if failure is not None else []
        outcome.validation, outcome.validation_skipped = _validate(run, engine_steps(run))
    if failures:  # after the report, which shows the failed gate; the other artifacts stay
        raise failures[0]
    return outcome


def _onnx(run: ExportRun) -> None:
    """The adapter fused into the target's head, exported and verified against PyTorch; the
    PyTorch outputs on the parity images are kept for the validation step."""
    from ..deploy.onnx_export import ExportSettings, export_deployment, parity_pixels
    from ..runtimes.onnx_files import resolve_external_data_threshold

    export = run.recipe.export
    precisions = tuple(name for name in run.precisions if not PRECISIONS[name].needs_calibration)
    threshold = resolve_external_data_threshold(export.external_data_threshold)

    def work() -> None:
        report = export_deployment(run.models["target"], run.head("target"), run.adapter(run.final_stage), run.onnx_dir,
                                   parity_pixels(run.models["target"], run.parity_images(), count=16),
                                   ExportSettings(opset=export.opset, softmax=export.softmax, precisions=precisions,
                                                  external_data_threshold=threshold, lineage=run.lineage),
                                   log=run.log)
        with atomic_directory(run.out / REFERENCES, "references.json") as staging:
            digest = save_tensors(staging / "parity.safetensors", {
                "pixels": torch.from_numpy(report.references.pixels),
                "outputs": torch.from_numpy(report.references.outputs)})
            write_json(staging / "references.json", {"parity.safetensors": digest})

    inputs = {"adapter": run.keys["final"], "target": run.model_keys["target"], "head": run.head_keys["target"],
              "opset": export.opset, "softmax": export.softmax, "precisions": list(precisions),
              "images": run.split_keys.get("test") or run.split_keys["train"]}
    key_external_data(inputs, threshold)
    key_lineage(inputs, run.lineage)
    run.keys["onnx"] = run.steps.run("onnx", inputs, [run.onnx_dir / MANIFESTS["export"],
                                                      run.out / REFERENCES / "references.json"], work)


def _drop_unasked(run: ExportRun) -> None:
    """Calibrated graphs an earlier run added that this recipe no longer asks for leave the
    export, with their gate's record."""
    for name in drop_unasked_calibrated(run, run.onnx_dir, "onnx-{}"):
        (run.out / "gates" / f"{name}.json").unlink(missing_ok=True)


def _references(run: ExportRun):
    """What the onnx step's PyTorch run computed on the parity images (pixels, outputs)."""
    from ..deploy.parity import References

    record = read_json(run.out / REFERENCES / "references.json", "parity references")
    tensors = load_tensors(run.out / REFERENCES / "parity.safetensors", record.get("parity.safetensors"),
                           "parity references")
    return References(tensors["pixels"].numpy(), tensors["outputs"].numpy())


def _calibrated(run: ExportRun, name: str, outcome: ExportOutcome):
    """A calibrated precision (int8) added to the export behind its accuracy gate; returns the
    gate's failure (reported, then raised by run_export) or None."""
    from ..deploy.calibration import sample_calibration
    from ..deploy.gate import GateFailed
    from ..deploy.onnx_export import calibration_inputs
    from ..deploy.precision_edits import add_precision
    from ..runtimes.onnx_files import resolve_external_data_threshold

    target, settings = PRECISIONS[name], run.recipe.export.calibration
    threshold = resolve_external_data_threshold(run.recipe.export.external_data_threshold)
    source = settings.data or run.splits["train"]
    gate_file = run.out / "gates" / f"{name}.json"

    def work() -> None:
        gate_file.parent.mkdir(parents=True, exist_ok=True)
        gate, held = gate_images(run)
        model = run.models["target"]
        calibration = sample_calibration(model, source, settings.images, settings.minimum, settings.seed,
                                         exclude=held if settings.data is None else 0)
        try:
            result = add_precision(run.onnx_dir, target, calibration_inputs(model, calibration.pixels),
                                   _references(run), calibration.record, gate, run.log, threshold,
                                   fallback=settings.fallback)
        except GateFailed as exc:
            write_json(gate_file, exc.record)
            raise
        write_json(gate_file, result)

    inputs = {"onnx": run.keys["onnx"], "settings": asdict(settings),
              "data": tree_sha256(settings.data) if settings.data else run.split_keys["train"],
              "gate": run.split_keys.get("test"), "base_classes": run.task.data.base_classes}
    key_external_data(inputs, threshold)
    try:
        run.keys[f"onnx-{name}"] = run.steps.run(f"onnx-{name}", inputs,
                                                 [run.onnx_dir / target.graph_name("model"), gate_file], work)
        failure = None
    except GateFailed as exc:
        run.steps.failed(f"onnx-{name}", str(exc))
        failure = exc
    outcome.gates.append(read_json(gate_file, f"{name} gate"))
    return failure


def _validate(run: ExportRun, engine_keys: list[str]) -> tuple[list[dict], list[str]]:
    """Every available runtime against the PyTorch outputs the onnx step computed."""
    from ..runtimes.compare import judge

    def classifier():
        from ..deploy.fusion import DeployedClassifier, FoldedHead

        return DeployedClassifier(run.models["target"].model.visual,
                                  FoldedHead(run.head("target"), run.adapter(run.final_stage)),
                                  softmax=run.recipe.export.softmax)

    references = []  # read once, when the step runs

    def pixels() -> np.ndarray:
        references.append(_references(run))
        return references[0].pixels

    def judge_rows(candidate, images: np.ndarray) -> list[dict]:
        return [judge(reference_runtime().name, references[0].outputs, candidate, candidate.infer(images), len(images))]

    inputs = {"onnx": [run.keys.get(k) for k in sorted(run.keys) if k.startswith("onnx")], "engines": engine_keys}
    return validation_step(run, inputs, pixels, classifier, lambda: pixel_graphs(run), judge_rows)
