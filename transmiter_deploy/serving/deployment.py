"""An export opened for inference: images in, per task the scores and the top-k class names.

```python
from transmiter_deploy.serving.deployment import Deployment

with Deployment.open("export/out/demo/onnx", runtime="onnxruntime-cpu", precision="fp32") as deployment:
    for image in deployment.classify(["cat.png", "dog.jpg"], topk=3):
        print(image["default"].top)          # [("tabby", 23.1), ...]; a bank: one entry per task
```

:func:`read_export` reads a single-task export or a task bank (``docs/export.md``, ``docs/bank.md``)
and checks every file against its manifest's sha256 before anything runs; the graph of a
precision comes from the manifest (never from a file name). Images are decoded and preprocessed
as the export's models were (features/datasets.py, features/preprocess.py: open_clip's eval
transform from the manifest's record, which the C++ runtime matches bit for bit). The graph runs
on any graph runtime of the registry (``runtimes/``), one runner for the deployment's lifetime.
Scores are the graph's outputs (logits, or probabilities for a softmax export); top-k is highest
first, ties in class order, as the C++ runtime's ``top_k``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..artifacts import MANIFESTS, read_json
from ..errors import InputError, IntegrityError
from ..runtimes.base import GraphFile, Runner, RunSettings
from ..runtimes.registry import PRECISIONS, REFERENCE_PRECISION, precision_from_manifest, runtime

SINGLE_TASK = "default"  # the name of a single-task export's one task
DEFAULT_BATCH = 8  # images per run when the runner takes any batch


@dataclass(frozen=True)
class Task:
    """One task of an export: its output tensor and class names (a bank has one per task)."""

    name: str
    output: str  # the graph's output tensor with this task's scores
    class_names: list[str]
    probabilities: str | None = None  # a softmax bank's probabilities output, beside the logits


@dataclass
class ExportInfo:
    """An export as its manifest describes it, every file checked against the manifest."""

    directory: Path
    kind: str  # "single" or "bank"
    manifest: dict[str, Any]
    tasks: list[Task]
    graphs: dict[str, str]  # precision name -> the pixels graph's file, relative to directory
    input_name: str = "pixel_values"
    preprocess: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.preprocess["image_size"]
        return (int(size[0]), int(size[1])) if isinstance(size, list) else (int(size), int(size))

    def task(self, name: str) -> Task:
        for task in self.tasks:
            if task.name == name:
                return task
        raise InputError(f"{self.directory} has no task '{name}' (tasks: {', '.join(t.name for t in self.tasks)})")

    def backbone_graph(self, precision: str) -> str:
        """A bank's backbone graph of ``precision`` (pixels -> features), relative to the directory."""
        graphs = self.manifest.get("backbone", {}).get("graphs", {}) if self.kind == "bank" else {}
        if precision not in graphs:
            raise InputError(f"{self.directory} has no {precision} backbone graph"
                             + (f" (it has: {', '.join(graphs)})" if graphs else " (only a task bank has one)"))
        return graphs[precision]

    def graph(self, precision: str) -> Path:
        """The pixels graph of ``precision``, as the manifest records it."""
        if precision not in PRECISIONS:
            raise InputError(f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})")
        if precision not in self.graphs:
            raise InputError(f"{self.directory} has no {precision} graph (it has: {', '.join(self.graphs)})")
        return self.directory / self.graphs[precision]


def export_directory(path: Path) -> Path:
    """The directory holding an export's manifest: ``path`` itself, or the ``onnx/`` folder of a
    ``transmiter export`` output directory."""
    path = Path(path)
    if (path / MANIFESTS["export"]).is_file():
        return path
    if (path / "onnx" / MANIFESTS["export"]).is_file():
        return path / "onnx"
    raise InputError(f"{path} is not an export: no {MANIFESTS['export']} in it or in {path / 'onnx'}")


def read_export(path: Path, verify: bool = True) -> ExportInfo:
    """The export at ``path`` (a single-task export or a bank), its files checked against the
    manifest (``verify``); IntegrityError naming the first file that does not match."""
    from ..deploy.bank import BANK_FORMAT, read_bank
    from ..deploy.export_format import FORMAT

    directory = export_directory(path)
    manifest = read_json(directory / MANIFESTS["export"], "export manifest")
    if manifest.get("format") == BANK_FORMAT:
        bank = read_bank(directory, verify=verify)
        tasks = [Task(record["name"], record["output"], list(record["class_names"]), record.get("probabilities"))
                 for record in bank.manifest["tasks"]]
        return ExportInfo(directory, "bank", bank.manifest, tasks, dict(bank.manifest["graphs"]),
                          preprocess=dict(bank.manifest["preprocess"]))
    if manifest.get("format") != FORMAT:
        raise InputError(f"{directory / MANIFESTS['export']} is not an export manifest (format "
                         f"{manifest.get('format')!r})")
    return _single_task(directory, manifest, verify)


def _single_task(directory: Path, manifest: dict[str, Any], verify: bool) -> ExportInfo:
    from ..deploy.bank import Part
    from ..deploy.export_format import FORMAT, FORMAT_VERSION
    from ..artifacts import check_format, require_keys

    where = str(directory / MANIFESTS["export"])
    check_format(manifest, FORMAT, FORMAT_VERSION, where)
    require_keys(manifest, {"files": dict, "class_names": list, "output": str, "preprocess": dict}, where)
    graphs = {}
    for name, entry in manifest["files"].items():
        if name.startswith("model") and name.endswith(".onnx") and "/" not in name and isinstance(entry, dict):
            graphs[precision_from_manifest(str(entry.get("precision", REFERENCE_PRECISION))).name] = name
    if REFERENCE_PRECISION not in graphs:
        raise IntegrityError(f"{where} lists no fp32 pixels graph (model.onnx)")
    if verify:
        Part(directory, manifest, graphs, manifest["files"]).verify(f"export {directory}")
    task = Task(SINGLE_TASK, manifest["output"], [str(name) for name in manifest["class_names"]])
    return ExportInfo(directory, "single", manifest, [task], graphs, preprocess=dict(manifest["preprocess"]))


@dataclass
class Prediction:
    """One image's result for one task."""

    task: str
    scores: np.ndarray  # (K,) float32: logits, or probabilities for a softmax export
    top: list[tuple[str, float]]  # (class name, score), highest first


def top_k(scores: np.ndarray, class_names: list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` highest scores with their class names, highest first, ties in class order."""
    if k < 1:
        raise InputError(f"top-k needs k >= 1, got {k}")
    order = np.argsort(-scores, kind="stable")[: min(k, len(class_names))]
    return [(class_names[int(index)], float(scores[int(index)])) for index in order]


class Deployment:
    """An export and a runner of its graph for one precision on one registered runtime."""

    def __init__(self, info: ExportInfo, runner: Runner, precision: str) -> None:
        from ..features.preprocess import record_transform

        self.info, self.runner, self.precision = info, runner, precision
        self.transform = record_transform(info.preprocess, f"{info.directory / MANIFESTS['export']}")

    @classmethod
    def open(cls, path: Path, runtime_name: str = "onnxruntime-cpu", precision: str = REFERENCE_PRECISION,
             settings: RunSettings = RunSettings(), verify: bool = True) -> "Deployment":
        """The export at ``path`` verified and its ``precision`` graph loaded on ``runtime_name``
        (a graph runtime of the registry; its engine folder, for a runtime that compiles graphs,
        is the export run's ``engines/``)."""
        entry = runtime(runtime_name)
        if entry.loads == "module":
            raise InputError(f"{runtime_name} runs PyTorch modules; an export is served by a graph runtime "
                             f"(e.g. onnxruntime-cpu)")
        info = read_export(path, verify)
        graph = info.graph(precision)
        if settings.compiled_dir is None:
            settings = RunSettings(settings.threads, settings.shares_process, settings.max_batch,
                                   info.directory.parent / "engines")
        runner = entry.create(GraphFile(graph, precision), settings).activate()
        return cls(info, runner, precision)

    def close(self) -> None:
        self.runner.deactivate()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def max_batch(self) -> int:
        limit = self.runner.input_spec.max_batch
        return min(DEFAULT_BATCH, limit) if limit else DEFAULT_BATCH

    def decode(self, data: bytes) -> np.ndarray:
        """Encoded image bytes (PNG, JPEG, ...) as the graph's pixels (3, H, W), float32."""
        from ..features.datasets import decode_image_bytes

        return self.transform(decode_image_bytes(data)).numpy()

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        """Images (paths, PIL images, HxWx3 or HxW uint8 arrays) as pixels (N, 3, H, W), float32."""
        return np.stack([self.transform(_as_image(image)).numpy() for image in images]).astype(np.float32, copy=False)

    def infer(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the graph on ``pixels`` (N, 3, H, W), by name."""
        outputs: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(pixels), self.max_batch):
            for name, value in self.runner.infer_outputs(pixels[start:start + self.max_batch]).items():
                outputs.setdefault(name, []).append(value)
        return {name: np.concatenate(parts) for name, parts in outputs.items()}

    def classify(self, images: Sequence[Any], topk: int = 5, tasks: Iterable[str] | None = None
                 ) -> list[dict[str, Prediction]]:
        """Per image, per task (all, or ``tasks``): its scores and top-k class names."""
        return self.classify_pixels(self.preprocess(images), topk, tasks)

    def classify_pixels(self, pixels: np.ndarray, topk: int = 5, tasks: Iterable[str] | None = None
                        ) -> list[dict[str, Prediction]]:
        """:meth:`classify` on preprocessed pixels (N, 3, H, W)."""
        chosen = [self.info.task(name) for name in tasks] if tasks is not None else self.info.tasks
        outputs = self.infer(pixels)
        missing = [task.output for task in chosen if task.output not in outputs]
        if missing:
            raise IntegrityError(f"{self.info.graph(self.precision)} has no output '{missing[0]}' "
                                 f"(outputs: {', '.join(outputs)})")
        return [{task.name: Prediction(task.name, outputs[task.output][row],
                                       top_k(outputs[task.output][row], task.class_names, topk))
                 for task in chosen} for row in range(len(pixels))]


def _as_image(image: Any):
    """A path, PIL image or uint8 array as an RGB PIL image."""
    from PIL import Image

    from ..features.datasets import as_rgb, decode_image

    if isinstance(image, (str, Path)):
        return decode_image(Path(image))[0]
    if isinstance(image, Image.Image):
        return as_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise InputError(f"an image array must be uint8, HxW or HxWx3 (or x4), got {image.dtype} "
                             f"{tuple(image.shape)}")
        return as_rgb(Image.fromarray(image))
    raise InputError(f"an image must be a path, a PIL image or a uint8 array, got {type(image).__name__}")
