"""Fine-tuned teachers that are not open_clip checkpoints: an ONNX classifier, precomputed logits.

Extraction needs one thing from the teacher: its task logits (N, K) on the
unlabelled training images, paired row by row with the source model's cache.
An open_clip teacher gives them as feature cache @ head; the kinds here give
them directly and are stored as :class:`~..features.teacher_logits.TeacherLogits`,
one artifact per image set:

- ``onnx``: pixels (N, 3, H, W) -> (N, K) logits, any framework; the pixels are
  made by open_clip's eval transform with the preprocessing the recipe states or
  the JSON manifest beside the graph gives (``<graph>.onnx.json``); run on ONNX Runtime's CPU runner.
- ``logits``: a safetensors (tensor ``logits``) or npy file of (N, K) logits and a
  JSON image list (default: beside it, ``<file>.json``), one entry per row: ``{"split", "path", "sha256"}``. Rows are
  matched to the dataset by split, relative path and content hash, never by
  position, so the file's row order does not matter; a missing, extra or changed
  image is refused, naming it.

Each kind has a key (:func:`teacher_key`): its kind and the sha256 of its files,
which the export's steps are keyed by, so a changed file redoes what depends on it.
What a recipe states of each kind, and the checks that read no file, are in
:mod:`.teacher_specs`, which the recipe imports too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from ..artifacts import load_tensors, read_json, sha256_file
from ..errors import InputError, IntegrityError
from ..features.datasets import ImageDataset, PreprocessedImages
from ..features.teacher_logits import Fingerprint, TeacherLogits, check_task_logits
from .teacher_specs import LogitsTeacher, OnnxTeacher, TeacherPreprocess, check_preprocess, images_path, sidecar

# what open_clip's transform produces, which an ONNX teacher's manifest may spell out (the
# project's own models write these keys, features/models.py): any other value is refused
FIXED_PREPROCESS = {"rescale_factor": 1 / 255, "layout": "NCHW", "color_order": "RGB"}


def teacher_kind(ref: Any) -> str:
    """``onnx``, ``logits``, or ``checkpoint`` for an open_clip model (the recipe's ModelRef)."""
    return "onnx" if isinstance(ref, OnnxTeacher) else "logits" if isinstance(ref, LogitsTeacher) else "checkpoint"


def manifest_path(onnx: Path) -> Path:
    """Where an ONNX teacher's manifest is read from when the recipe states no preprocessing."""
    return sidecar(onnx)


def _check_recorded_sha256(recorded: Any, path: Path, subject: str, record: str) -> None:
    """A teacher file against the sha256 its side file records, when it records one."""
    if isinstance(recorded, str) and recorded != sha256_file(path):
        raise IntegrityError(f"{subject} match the sha256 in {record} (replaced or modified since it was written)")


def resolve_preprocess(ref: OnnxTeacher) -> TeacherPreprocess:
    """The recipe's preprocessing, else the ``preprocess`` object of the manifest beside the graph."""
    if ref.preprocess is not None:
        return ref.preprocess
    path = manifest_path(ref.onnx)
    if not path.is_file():
        raise InputError(f"ONNX teacher {ref.onnx}: state its preprocessing in the recipe (finetuned.preprocess) "
                         f"or beside it in {path}")
    manifest = read_json(path, "ONNX teacher manifest")
    _check_recorded_sha256(manifest.get("onnx_sha256"), ref.onnx, f"ONNX teacher {ref.onnx} does not",
                           f"its manifest {path}")
    raw = manifest.get("preprocess")
    if not isinstance(raw, dict):
        raise InputError(f"ONNX teacher manifest {path}: needs a 'preprocess' object")
    try:
        size = raw["image_size"]
        if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
            size = size[0]  # the [height, width] the project's own models record
        if not isinstance(size, int) or isinstance(size, bool):
            raise InputError(f"image_size must be an integer or a square [height, width], got {raw['image_size']!r}")
        for key, wanted in FIXED_PREPROCESS.items():
            if key in raw and raw[key] != wanted and not (isinstance(wanted, float) and isinstance(raw[key], float)
                                                         and abs(raw[key] - wanted) < 1e-12):
                raise InputError(f"{key} {raw[key]!r} is not supported (open_clip's transform makes {wanted!r})")
        if raw.get("crop", "center") not in ("center", "pad-center", "none"):
            raise InputError(f"crop {raw['crop']!r} is not supported")
        preprocess = TeacherPreprocess(size, tuple(float(v) for v in raw["mean"]), tuple(float(v) for v in raw["std"]),
                                       raw.get("resize_mode", "shortest"), raw.get("interpolation", "bicubic"))
        check_preprocess(preprocess)
    except KeyError as exc:
        raise InputError(f"ONNX teacher manifest {path}: 'preprocess' has no {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise InputError(f"ONNX teacher manifest {path}: bad 'preprocess': {exc}") from exc
    except InputError as exc:
        raise InputError(f"ONNX teacher manifest {path}: preprocess: {exc}") from exc
    return preprocess


def teacher_key(ref: Any) -> dict[str, Any]:
    """What identifies an ONNX or precomputed teacher: its kind and its files' content (and the
    preprocessing an ONNX graph is fed)."""
    if isinstance(ref, OnnxTeacher):
        key = {"kind": "onnx", "onnx_sha256": sha256_file(ref.onnx), "preprocess": asdict(resolve_preprocess(ref))}
        data = _external_data_sha256(ref.onnx)
        if data:  # a graph past 2 GiB keeps its weights beside it: they are its content too
            key["external_data_sha256"] = data
        return key
    return {"kind": "logits", "logits_sha256": sha256_file(ref.logits), "images_sha256": sha256_file(images_path(ref))}


def _external_data_sha256(graph: Path) -> dict[str, str]:
    """The sha256 of each external data file ``graph`` points at (relative to it), by name."""
    from ..runtimes.onnx_files import external_data_locations, graph_structure

    digests = {}
    for location in external_data_locations(graph_structure(graph)):
        path = Path(graph).parent / location
        if not path.is_file():
            raise InputError(f"ONNX teacher {graph}: its external data file {location} is missing (expected at {path})")
        digests[location] = sha256_file(path)
    return digests


# ----------------------------------------------------------------------------- ONNX teachers


def pixel_transform(preprocess: TeacherPreprocess) -> Callable:
    """The project's own preprocessing (open_clip's eval transform, features/preprocess.py) with
    these settings."""
    from ..features.preprocess import eval_transform

    return eval_transform(preprocess.image_size, preprocess.mean, preprocess.std, preprocess.resize_mode,
                          preprocess.interpolation)


def onnx_teacher_logits(ref: OnnxTeacher, dataset: ImageDataset, num_classes: int, key: dict[str, Any],
                        batch_size: int = 32, progress: bool = True) -> TeacherLogits:
    """Every image of ``dataset`` through the ONNX teacher on ONNX Runtime (CPU): its (N, K)
    logits in dataset order. The graph's input size must agree with the preprocessing and its
    output width with the task's K, or nothing is computed."""
    from ..runtimes.registry import verification_runtime

    preprocess = resolve_preprocess(ref)
    what = f"ONNX teacher {ref.onnx}"
    runner = verification_runtime().create(ref.onnx)
    with runner:
        shape = runner.input_spec.shape
        if len(shape) != 4 or shape[1] not in (None, 3):
            raise InputError(f"{what}: input must be pixels (N, 3, H, W), the graph takes {_dims(shape)}")
        if any(side is not None and side != preprocess.image_size for side in shape[2:]):
            raise InputError(f"{what} takes {_dims(shape)} images but its stated preprocessing makes "
                             f"{preprocess.image_size}x{preprocess.image_size}")
        fixed_batch = shape[0]  # a graph exported for one batch size is fed exactly that many
        loader = torch.utils.data.DataLoader(PreprocessedImages(dataset, pixel_transform(preprocess)),
                                             batch_size=fixed_batch or batch_size, shuffle=False)
        fingerprint, chunks, labels, index = Fingerprint(), [], [], 0
        with tqdm(total=len(dataset), desc="ONNX teacher", unit="img", disable=not progress) as bar:
            for pixels, batch_labels, digests in loader:
                batch = pixels.numpy().astype(np.float32)
                count = batch.shape[0]
                if fixed_batch and count < fixed_batch:
                    batch = np.concatenate([batch, np.zeros((fixed_batch - count, *batch.shape[1:]), np.float32)])
                out = runner.infer(batch)[:count]
                if out.ndim != 2 or out.shape[1] != num_classes:
                    width = out.shape[1] if out.ndim == 2 else f"{_dims(out.shape[1:])} (not a row of)"
                    raise InputError(f"{what}: outputs {width} logits per image, but the task has {num_classes} "
                                     f"classes (it must output (N, {num_classes}) task logits)")
                bad = (~np.isfinite(out)).any(axis=1).nonzero()[0]
                if len(bad):
                    raise InputError(f"{what}: NaN/inf logits for image {dataset.records[index + int(bad[0])].relpath}")
                for offset, digest in enumerate(digests):
                    record = dataset.records[index + offset]
                    fingerprint.add(record.relpath, record.label, digest)
                chunks.append(torch.from_numpy(out.copy()))
                labels.append(batch_labels.to(torch.int64))
                index += count
                bar.update(count)
    return TeacherLogits(torch.cat(chunks), torch.cat(labels), list(dataset.class_names), key,
                         fingerprint.hexdigest())


def _dims(shape) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


# ----------------------------------------------------------------------------- precomputed logits


@dataclass
class PrecomputedLogits:
    """A precomputed-logits teacher read and checked: logits (N, K) and the image of each row."""

    logits: np.ndarray
    rows: dict[tuple[str, str], tuple[int, str]]  # (split, relative path) -> (row, sha256)
    where: str  # the file, as errors name it

    def splits(self) -> set[str]:
        return {split for split, _ in self.rows}


def read_precomputed(ref: LogitsTeacher, class_names: list[str]) -> PrecomputedLogits:
    """The logits file and its image list, checked against the task (K classes, finite values,
    one entry per row, each image once); no image is matched yet (:func:`match_precomputed`)."""
    where = str(ref.logits)
    if ref.logits.suffix == ".npy":
        try:
            logits = np.load(ref.logits, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"precomputed logits {where}: not a readable .npy file: {exc}") from exc
    else:
        tensors = load_tensors(ref.logits, None, "precomputed logits")
        if "logits" not in tensors:
            raise InputError(f"precomputed logits {where}: no tensor named 'logits' (has: {', '.join(tensors)})")
        logits = tensors["logits"].float().numpy()
    if logits.dtype.kind != "f" or logits.ndim != 2:
        raise InputError(f"precomputed logits {where}: must be a 2-D float array (N, K), got {logits.dtype} "
                         f"{_dims(logits.shape)}")
    listing = images_path(ref)
    manifest = read_json(listing, "precomputed logits image list")
    _check_recorded_sha256(manifest.get("logits_sha256"), ref.logits, f"precomputed logits {where} do not",
                           f"their image list {listing}")
    images = manifest.get("images")
    if not isinstance(images, list):
        raise InputError(f"image list {listing}: needs an 'images' list (one {{split, path, sha256}} per row)")
    if len(images) != logits.shape[0]:
        raise InputError(f"image list {listing} has {len(images)} images but {where} has {logits.shape[0]} rows")
    listed_classes = manifest.get("class_names")
    if listed_classes is not None and listed_classes != class_names:
        raise InputError(f"image list {listing}: its class_names differ from the recipe's classes "
                         f"({len(listed_classes) if isinstance(listed_classes, list) else listed_classes!r} "
                         f"against {len(class_names)})")
    rows: dict[tuple[str, str], tuple[int, str]] = {}
    for row, entry in enumerate(images):
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("split", "path", "sha256"))):
            raise InputError(f"image list {listing}: entry {row} must be {{\"split\", \"path\", \"sha256\"}} strings")
        key = (entry["split"], entry["path"])
        if key in rows:
            raise InputError(f"image list {listing}: image {entry['split']}/{entry['path']} is listed twice "
                             f"(rows {rows[key][0]} and {row})")
        rows[key] = (row, entry["sha256"].lower())
    try:
        check_task_logits(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), len(class_names),
                          f"precomputed logits {where}")
    except InputError as exc:
        bad = (~np.isfinite(logits)).any(axis=1).nonzero()[0] if logits.shape[1] == len(class_names) else []
        if len(bad):
            split, path = next(key for key, (row, _) in rows.items() if row == int(bad[0]))
            raise InputError(f"precomputed logits {where}: NaN/inf logits in {len(bad)} rows "
                             f"(first: image {split}/{path})") from exc
        raise
    return PrecomputedLogits(logits.astype(np.float32), rows, where)


def match_precomputed(logits: PrecomputedLogits, datasets: dict[str, ImageDataset],
                      key: dict[str, Any]) -> dict[str, TeacherLogits | None]:
    """Each split's logits in its dataset's order, matched by relative path and sha256 of the
    image's bytes; None for a split the file holds no rows for (test or few-shot only: the
    training images must all be there). Every image of a split the file covers must have a row
    with the same content, and every row an image: the first one that does not is named."""
    unknown = sorted(logits.splits() - set(datasets))
    if unknown:
        split, path = next(k for k in sorted(logits.rows) if k[0] == unknown[0])
        raise InputError(f"precomputed logits {logits.where}: image {split}/{path} is from a split the recipe has no "
                         f"data for (the recipe's: {', '.join(datasets)})")
    matched: dict[str, TeacherLogits | None] = {}
    for split, dataset in datasets.items():
        if split not in logits.splits():
            if split == "train":
                raise InputError(f"precomputed logits {logits.where}: no rows for the training images "
                                 "(split 'train'); extraction needs the teacher's logits on every one")
            matched[split] = None
            continue
        order, fingerprint, seen = [], Fingerprint(), set()
        for record in dataset.records:
            entry = logits.rows.get((split, record.relpath))
            if entry is None:
                raise InputError(f"precomputed logits {logits.where} have no row for image {split}/{record.relpath} "
                                 "of the dataset (missing)")
            digest = sha256_file(record.path)
            if digest != entry[1]:
                raise InputError(f"precomputed logits {logits.where}: image {split}/{record.relpath} is not the one "
                                 f"its row was computed for (sha256 {digest[:12]}, listed {entry[1][:12]})")
            order.append(entry[0])
            seen.add(record.relpath)
            fingerprint.add(record.relpath, record.label, digest)
        extra = sorted(path for (name, path) in logits.rows if name == split and path not in seen)
        if extra:
            raise InputError(f"precomputed logits {logits.where} have a row for image {split}/{extra[0]}, which is not "
                             f"in the dataset (extra; {len(extra)} in all)")
        labels = torch.tensor([record.label for record in dataset.records], dtype=torch.int64)
        matched[split] = TeacherLogits(torch.from_numpy(logits.logits[order]), labels, list(dataset.class_names),
                                       key, fingerprint.hexdigest())
    return matched


def unavailable_teacher(split: str, key: dict[str, Any], class_names: list[str]) -> TeacherLogits:
    """The artifact of a split a precomputed file has no rows for: no logits, and why."""
    return replace(TeacherLogits(torch.zeros(0, len(class_names)), torch.zeros(0, dtype=torch.int64),
                                 class_names, key, ""),
                   extra={"unavailable": f"the precomputed logits have no rows for the {split} images"})
