"""An open_clip teacher written out as the other teacher kinds: an ONNX classifier, precomputed logits.

``transmiter teacher onnx|logits RECIPE --out FILE`` run these on a recipe whose
``finetuned:`` is an open_clip model (e.g. ``export/recipes/demo.yaml``): they
make the demo files of the ONNX and precomputed-logits demo recipes
(``make demo-teachers``), and show a user what either kind must contain. Both
compute exactly what the export computes from that teacher (its image tower and
its head's task rows), so an export taught by either file matches one taught by
the checkpoint. Each file is written under a temporary name and renamed, the
data file before its JSON, whose recorded sha256 ties the pair together.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..artifacts import sha256_file, utc_now, library_versions
from ..errors import WRITE_ERRNOS, InputError, VerificationError, write_failure
from .recipe import ModelRef, Recipe, TaskRecipe

ONNX_TEACHER_FORMAT = "transmiter-deploy/onnx-teacher"
LOGITS_IMAGES_FORMAT = "transmiter-deploy/teacher-logits-images"
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
ONNX_TOLERANCE = 1e-4  # max abs difference of the written graph from PyTorch on real images (logit units)


@dataclass
class CheckpointTeacher:
    """A recipe's open_clip teacher as the export builds it: the model, its task-class head,
    the task's image sets and classes."""

    model: object  # LoadedModel
    head: object  # ZeroShotHead over the task classes only
    splits: dict[str, Path]
    classes: list[str]


def checkpoint_teacher(recipe: Recipe, task: TaskRecipe, work: Path, progress: bool,
                       log: Callable[[str], None]) -> CheckpointTeacher:
    """The teacher of ``task``, with its data (a demo task is rendered into ``work``, as the
    export renders it into its output directory: the same images, byte for byte)."""
    from ..features.heads import build_head
    from ..features.models import load_model
    from .export_run import ExportRun, model_specs
    from .task_steps import data_step, head_templates
    from .steps import Steps

    if not isinstance(task.finetuned, ModelRef):
        raise InputError(f"recipe {recipe.path}: finetuned must be an open_clip model (name and weights) to be "
                         "written out as another kind")
    run = ExportRun(recipe, Path(work), Steps(Path(work), False, log), progress, log, task=task)
    data_step(run)
    model = load_model(model_specs(recipe, task)["teacher"])
    head = build_head(model, run.classes, [], head_templates(run), progress=progress)
    return CheckpointTeacher(model, head, dict(run.splits), list(run.classes))


class TeacherClassifier(nn.Module):
    """Pixels to task logits: the teacher's image tower, L2-normalised, times its head's task rows
    (what ``zero_shot_logits(cache, head)[:, :K]`` computes from a cache)."""

    def __init__(self, model, head) -> None:
        super().__init__()
        self.visual = model.model.visual
        self.register_buffer("weight", head.weight[: head.num_task_classes].detach().clone().float())
        self.logit_bias = head.logit_bias

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = nn.functional.normalize(self.visual(pixels).float(), dim=-1)
        logits = features @ self.weight.t()
        return logits + self.logit_bias if self.logit_bias else logits


def export_onnx_teacher(teacher: CheckpointTeacher, out: Path, opset: int = 17) -> float:
    """``out`` (.onnx, batch axis dynamic) and its manifest ``<out>.json`` (preprocessing,
    classes, the graph's sha256). The graph is checked on ONNX Runtime against PyTorch on the
    first training images before anything is published; returns that max abs difference."""
    from ..features.datasets import PreprocessedImages, open_dataset
    from ..deploy.parity import run_graph
    from .teachers import manifest_path

    out = Path(out)
    if out.suffix != ".onnx":
        raise InputError(f"--out must name a .onnx file, got {out}")
    module = TeacherClassifier(teacher.model, teacher.head).eval()
    images = PreprocessedImages(open_dataset(teacher.splits["train"], teacher.classes), teacher.model.preprocess)
    pixels = torch.stack([images[i][0] for i in range(min(8, len(images)))])
    with _staged(manifest_path(out)) as manifest, _staged(out) as graph:  # the graph is published first
        try:
            # grad mode on while tracing: under no_grad, torch's attention takes its fused fast path
            # (aten::_native_multi_head_attention), which has no ONNX symbolic (deploy/trace.py switches the fast path off instead)
            with warnings.catch_warnings(), torch.enable_grad():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                torch.onnx.export(module, (pixels,), str(graph), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                                  do_constant_folding=True)
        except Exception as exc:  # the exporter raises many types; all mean "cannot trace this"
            if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
                raise write_failure(exc, str(out)) from exc
            raise InputError(f"cannot export the teacher to ONNX: {str(exc).strip().splitlines()[0]}") from exc
        with torch.no_grad():
            expected = module(pixels).numpy()
        got = run_graph(graph, pixels.numpy())
        difference = float(np.abs(got - expected).max())
        if difference > ONNX_TOLERANCE:
            raise VerificationError(f"the teacher's ONNX graph differs from PyTorch by {difference:.3g} "
                                    f"(> {ONNX_TOLERANCE}) on {len(pixels)} training images; nothing written")
        _write_json(manifest, {
            "format": ONNX_TEACHER_FORMAT, "format_version": 1, "onnx_file": out.name, "onnx_sha256": sha256_file(graph),
            "input": INPUT_NAME, "output": OUTPUT_NAME, "class_names": teacher.classes,
            "teacher": teacher.model.identity.to_dict(), "preprocess": teacher.model.preprocess_config,
            "max_abs_vs_pytorch": difference, "versions": library_versions(), "created": utc_now()})
    return difference


def write_teacher_logits(teacher: CheckpointTeacher, out: Path, work: Path, progress: bool = True) -> int:
    """The teacher's task logits on every image of every split, in one (N, K) file (``out``:
    .safetensors, tensor "logits", or .npy), and its image list ``<out>.json``: one
    ``{split, path, sha256}`` per row. Returns N."""
    from ..artifacts import save_tensors
    from ..features.cache import build_cache, load_cache, zero_shot_logits
    from ..features.datasets import open_dataset
    from .teacher_specs import LOGITS_FILE_SUFFIXES
    from .teachers import sidecar

    out = Path(out)
    if out.suffix not in LOGITS_FILE_SUFFIXES:
        raise InputError(f"--out must name a .safetensors or .npy file, got {out}")
    rows, entries = [], []
    for split, location in teacher.splits.items():
        dataset = open_dataset(location, teacher.classes)
        cache_dir = Path(work) / "teacher-caches" / split
        build_cache(teacher.model, dataset, cache_dir, progress=progress)
        rows.append(zero_shot_logits(load_cache(cache_dir), teacher.head)[:, : len(teacher.classes)])
        entries += [{"split": split, "path": record.relpath, "sha256": sha256_file(record.path)}
                    for record in dataset.records]
    logits = torch.cat(rows).float()
    with _staged(sidecar(out)) as listing, _staged(out) as data:  # the data is published first
        if out.suffix == ".npy":
            with open(data, "wb") as handle:
                np.save(handle, logits.numpy(), allow_pickle=False)
        else:
            save_tensors(data, {"logits": logits})
        _write_json(listing, {
            "format": LOGITS_IMAGES_FORMAT, "format_version": 1, "logits_file": out.name,
            "logits_sha256": sha256_file(data), "class_names": teacher.classes,
            "teacher": teacher.model.identity.to_dict(), "images": entries,
            "versions": library_versions(), "created": utc_now()})
    return len(entries)


@contextlib.contextmanager
def _staged(final: Path):
    """A temporary path beside ``final``, renamed to it when the block ends without error (the
    blocks nest: the inner file is published first), removed otherwise."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(handle)
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            raise write_failure(exc, str(final)) from exc
        raise InputError(f"cannot write {final}: {exc.strerror}") from exc
    staging = Path(name)
    try:
        yield staging
        os.chmod(staging, 0o644)
        os.replace(staging, final)
    except BaseException as exc:
        staging.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise write_failure(exc, str(final)) from exc
        raise


def _write_json(path: Path, payload: dict) -> None:
    import json

    Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
