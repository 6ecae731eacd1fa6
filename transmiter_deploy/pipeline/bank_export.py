"""`transmiter export RECIPE` on a bank recipe (a ``tasks:`` list): one backbone, many tasks.

Per task, the steps of a single-task export (data, caches, heads, extract, transfer, plus,
evaluate) under ``tasks/<task>/``, named ``<task>.<step>``, then the task's head export. The
backbone export is keyed by the target model, the opset and the precisions only, so adding,
removing or changing a task never re-runs it. The bank (``onnx/``) is assembled from the parts
by hard links plus the composed fused graph, so ``backbone.onnx``, its engine and every
untouched task's head files stay byte-identical (``docs/bank.md``). A calibrated precision (int8)
is added to the backbone export behind every task's gate first (pipeline/bank_calibration.py);
when no candidate passes, the bank is left as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..artifacts import MANIFESTS, read_json
from ..deploy.gate import GateFailed
from ..runtimes.registry import PRECISIONS, reference_runtime
from .bank_calibration import BankCalibration, drop_unasked
from .deployment_steps import engine_steps, validation_step
from .export_run import ExportRun, Models, key_external_data, key_lineage, model_specs, running_export
from .recipe import Recipe
from .report import ExportOutcome
from .task_steps import task_steps

BACKBONE_DIR = "backbone"
TASKS_DIR = "tasks"
HEAD_EXPORT_DIR = "head-export"
PARITY_IMAGES = 16  # seeded synthetic images: the backbone's parity must not depend on any task's data


def run_bank_export(recipe: Recipe, out_dir: Path, force: bool = False, progress: bool = True,
                    log: Callable[[str], None] = print) -> ExportOutcome:
    """Run a validated bank recipe; returns what ran, what was skipped, each task's accuracy."""
    with running_export(recipe, out_dir, force, progress, log) as (shared, outcome):
        out, steps = shared.out, shared.steps
        models = None
        head_keys, task_runs = {}, []
        for task in recipe.tasks:
            specs = model_specs(recipe, task)
            models = models.for_specs(specs) if models is not None else Models(specs)
            run = ExportRun(recipe, out, steps.scoped(f"{task.name}."), progress, log, task=task,
                            root=out / TASKS_DIR / task.name)
            run.models, run.model_keys, run.precisions = models, models.model_keys, shared.precisions
            accuracy = task_steps(run)
            if accuracy:
                outcome.task_accuracy[task.name] = accuracy
            outcome.task_teacher_check[task.name] = run.teacher_check
            outcome.stand_in_tokenizers.update({f"{task.name} {role}": description for role, description
                                                in run.stand_in_tokenizers().items()})
            head_keys[task.name] = _head_export(run)
            task_runs.append(run)
        shared.models, shared.model_keys = models, task_runs[0].model_keys
        backbone_key = _backbone(shared)
        drop_unasked(shared, out / BACKBONE_DIR)
        calibrated_keys, failures = {}, []
        heads = {t.task.name: (t.root / HEAD_EXPORT_DIR / "head.onnx", head_keys[t.task.name]) for t in task_runs}
        for name in shared.precisions:
            if PRECISIONS[name].needs_calibration:
                try:
                    calibrated_keys[name] = BankCalibration(shared, task_runs, (out / BACKBONE_DIR, backbone_key), heads,
                                                            PRECISIONS[name], _threshold(shared)).run_steps(outcome)
                except GateFailed as exc:
                    shared.steps.failed(f"backbone-{name}", str(exc))
                    failures.append(exc)
        if not failures:  # a failed gate leaves the bank as it was: no task goes out ungated
            _assemble(shared, backbone_key, calibrated_keys, head_keys)
            outcome.export_dir = shared.onnx_dir
            outcome.validation, outcome.validation_skipped = _validate(shared, task_runs, engine_steps(shared))
    if failures:  # after the report, which shows the failed gates
        raise failures[0]
    return outcome


def _settings(run: ExportRun):
    from ..deploy.onnx_export import ExportSettings

    return ExportSettings(opset=run.recipe.export.opset, softmax=False, precisions=_converted(run),
                          external_data_threshold=_threshold(run))


def _converted(run: ExportRun) -> list[str]:
    """The precisions converted with the backbone and heads; calibrated ones (int8) are added to
    the backbone afterwards (:func:`_calibrated`), so asking for them re-exports nothing."""
    return [name for name in run.precisions if not PRECISIONS[name].needs_calibration]


def _threshold(run: ExportRun) -> int:
    from ..runtimes.onnx_files import resolve_external_data_threshold

    return resolve_external_data_threshold(run.recipe.export.external_data_threshold)


def _parity_features(run: ExportRun) -> torch.Tensor:
    """The target's features of the task's own images (test, else train): what its head is checked on."""
    split = "test" if "test" in run.splits else "train"
    return run.cache("target", split).features[:PARITY_IMAGES]


def _head_export(run: ExportRun) -> str:
    from ..deploy.bank import export_head

    where = run.root / HEAD_EXPORT_DIR
    inputs = {"adapter": run.keys["final"], "head": run.head_keys["target"], "opset": run.recipe.export.opset,
              "precisions": _converted(run),
              "cache": run.cache_keys.get(("target", "test")) or run.cache_keys[("target", "train")]}
    key_external_data(inputs, _threshold(run))
    return run.steps.run("head-export", inputs, [where / MANIFESTS["export"]], lambda: export_head(
        run.head("target"), run.adapter(run.final_stage), _parity_features(run), where, _settings(run), run.log))


def _backbone(run: ExportRun) -> str:
    from ..deploy.bank import export_backbone
    from ..deploy.onnx_export import parity_pixels

    where = run.out / BACKBONE_DIR
    model = lambda: run.models["target"]  # noqa: E731 (loaded only when the step runs)
    inputs = {"target": run.model_keys["target"], "opset": run.recipe.export.opset, "precisions": _converted(run),
              "parity_images": PARITY_IMAGES}
    key_external_data(inputs, _threshold(run))
    return run.steps.run("backbone", inputs, [where / MANIFESTS["export"]], lambda: export_backbone(
        model(), where, parity_pixels(model(), None, count=PARITY_IMAGES), _settings(run), run.log))


def _assemble(run: ExportRun, backbone_key: str, calibrated_keys: dict[str, str], head_keys: dict[str, str]) -> None:
    from ..deploy.bank import BankTask, assemble_bank, read_backbone, read_head

    def work() -> None:
        tasks = [BankTask(task.name, read_head(run.out / TASKS_DIR / task.name / HEAD_EXPORT_DIR))
                 for task in run.recipe.tasks]
        assemble_bank(run.onnx_dir, read_backbone(run.out / BACKBONE_DIR), tasks, run.recipe.export.softmax, run.log,
                      _threshold(run), lineage=run.lineage)

    inputs = {"backbone": backbone_key, "heads": [[name, key] for name, key in head_keys.items()],
              "softmax": run.recipe.export.softmax}
    if calibrated_keys:  # keyed as before where the bank has no calibrated graph
        inputs["calibrated"] = calibrated_keys
    key_external_data(inputs, _threshold(run))
    key_lineage(inputs, run.lineage)
    run.keys["onnx"] = run.steps.run("bank", inputs, [run.onnx_dir / MANIFESTS["export"]], work)


class BankModule(torch.nn.Module):
    """The bank in PyTorch (the validation reference): pixels -> {output name: tensor}."""

    def __init__(self, visual: torch.nn.Module, heads: dict[str, torch.nn.Module], softmax: bool) -> None:
        super().__init__()
        from ..deploy.bank import Backbone

        self.backbone = Backbone(visual)
        self.heads = torch.nn.ModuleDict(heads)
        self.softmax = softmax
        self.eval()

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(pixel_values)
        outputs = {}
        for name, head in self.heads.items():
            outputs[f"logits_{name}"] = head(features)
            if self.softmax:
                outputs[f"probs_{name}"] = outputs[f"logits_{name}"].softmax(dim=-1)
        return outputs


def _validate(run: ExportRun, task_runs: list[ExportRun], engine_keys: list[str]) -> tuple[list[dict], list[str]]:
    """Every available runtime's bank outputs against PyTorch's, per output, on the first
    images of each task's parity set (test, else train)."""
    from ..deploy.fusion import FoldedHead
    from ..deploy.onnx_export import parity_pixels
    from ..runtimes.compare import judge_outputs

    softmax = run.recipe.export.softmax

    def module() -> BankModule:
        return BankModule(run.models["target"].model.visual,
                          {t.task.name: FoldedHead(t.head("target"), t.adapter(t.final_stage)) for t in task_runs},
                          softmax)

    expected: dict[str, np.ndarray] = {}

    def pixels() -> np.ndarray:
        per_task = max(2, 8 // len(task_runs))
        images = torch.cat([parity_pixels(run.models["target"], t.parity_images(), count=per_task) for t in task_runs])
        with torch.no_grad():
            expected.update({name: value.numpy() for name, value in module()(images).items()})
        return images.numpy()

    def graphs() -> list[str]:
        return list(read_json(run.onnx_dir / MANIFESTS["export"], "bank manifest")["graphs"].values())

    def judge_rows(candidate, images: np.ndarray) -> list[dict]:
        return judge_outputs(reference_runtime().name, expected, candidate, candidate.infer_outputs(images), len(images))

    inputs = {"bank": run.keys["onnx"], "engines": engine_keys,
              "images": [t.split_keys.get("test") or t.split_keys["train"] for t in task_runs]}
    return validation_step(run, inputs, pixels, module, graphs, judge_rows)
