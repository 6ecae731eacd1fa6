"""Task banks: one backbone graph and many task heads, composed into one graph.

Three kinds of artifact, each written atomically with its own manifest:

- a *backbone export* (``backbone.onnx`` and its reduced precisions): pixels -> L2-normalised
  image features, verified against PyTorch;
- a *head export* per task (``head.onnx``, ``head<suffix>.onnx``, ``head.safetensors``):
  features -> that task's logits, verified against PyTorch;
- a *bank* (``docs/bank.md``): the backbone's and every head's files hard-linked in unchanged
  (external data files copied: onnx refuses to read a data file with several links),
  plus ``model<suffix>.onnx``, the fused graph composed from them (pixels -> one output per
  task), verified against the parts run one after the other.

The fused graph is composed in ONNX (the heads' names prefixed with the task's) rather than
traced again: tracing would re-export, and for fp16 re-convert, the whole backbone each time a
task is added, and the backbone inside the bank would no longer be the verified
``backbone.onnx``. Composing keeps adding a task as cheap as its head.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from torch import nn

from ..artifacts import (atomic_directory, check_format, read_consistently, read_json, require_keys,
                         require_string_lists, sha256_file, write_json, write_manifest)
from ..errors import InputError, IntegrityError, VerificationError
from ..features.adapter_artifact import AdapterArtifact, check_adapter_head
from ..features.heads import ZeroShotHead
from ..features.models import LoadedModel
from ..runtimes.base import GraphFile
from ..runtimes.compare import compare_outputs, within_tolerance
from ..runtimes.onnx_files import (check_full, check_graph_files, graph_entries, graph_structure, io_contract,
                                   is_external_data, link_or_copy, probes_batched, save_graph)
from ..runtimes.registry import PRECISIONS, REFERENCE_PRECISION, Precision, precision_from_manifest
from .export_format import FORMAT as EXPORT_FORMAT, FORMAT_VERSION as EXPORT_FORMAT_VERSION, LINEAGE, MANIFEST
from .fusion import FoldedHead, Normalise
from .graph_cost import count_macs
from .head_weights import HEAD_FILE, head_logits_numpy, write_head_safetensors
from .onnx_export import ExportSettings, check_tower_memory
from .parity import FP32_LOGIT_ATOL, Checks, graph_runner, run_graph, run_graph_outputs, tolerance_criterion
from .reparameterise import for_inference
from .precision_edits import convert_graph
from .trace import export_graph, to_onnx

BACKBONE_FORMAT = "transmiter-deploy/backbone-export"
HEAD_EXPORT_FORMAT = "transmiter-deploy/head-export"
BANK_FORMAT = "transmiter-deploy/onnx-bank"
FORMAT_VERSION = 1
FEATURES = "image_features"  # the backbone's output and every head's input
TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
HEADS_DIR = "heads"
CALIBRATION_RECORDS = ("calibration", "fp32_nodes_kept")  # what a backbone records of its calibrated graphs
BANK_CHECK_IMAGES = 8  # seeded noise images: the composition is checked against its parts


def check_task_name(name: Any, where: str) -> str:
    """Task names become tensor names (``logits_<task>``) and directory names."""
    if not isinstance(name, str) or TASK_NAME.fullmatch(name) is None:
        raise InputError(f"{where}: task name {name!r} is not an identifier (letters, digits and _, "
                         "not starting with a digit, at most 64 characters)")
    return name


class Backbone(nn.Module):
    """Pixels (N, 3, H, W) -> L2-normalised image features (N, d): what every head reads."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual  # named as in DeployedClassifier: graph_cost attributes /visual/ to the backbone
        self.normalise = Normalise()
        self.eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.normalise(self.visual(pixel_values))


def _graph_files(staging: Path, files: dict[str, str]) -> dict[str, dict]:
    """Manifest entries of ``files`` (name -> precision name) written in ``staging``, with the
    external data files of each graph that has them (onnx_files.graph_entries)."""
    return {key: entry for name, kind in files.items()
            for key, entry in graph_entries(staging, name, PRECISIONS[kind],
                                            io_contract(graph_structure(staging / name)) if name.endswith(".onnx") else {}
                                            ).items()}


def _listed_data(entry: Any) -> list[str]:
    """The data files a manifest entry lists (checked for type by check_graph_files)."""
    data = entry.get("external_data") if isinstance(entry, dict) else None
    return [str(name) for name in data] if isinstance(data, list) else []


def with_data_files(files: dict[str, dict], names: list[str]) -> dict[str, dict]:
    """The entries of ``names`` from a manifest's ``files`` and, after each graph, the entries of
    the external data files it lists (missing ones are refused when the part is verified)."""
    chosen: dict[str, dict] = {}
    for name in names:
        chosen[name] = files[name]
        prefix = str(Path(name).parent)
        data = files[name].get("external_data", [])
        for location in data if isinstance(data, list) else []:
            key = str(location) if prefix == "." else f"{prefix}/{location}"
            if key in files:
                chosen[key] = files[key]
    return chosen


def _graphs_by_precision(files: dict[str, str], stem: str) -> dict[str, str]:
    return {kind: name for name, kind in files.items() if name.startswith(stem) and name.endswith(".onnx")}


def _reduced(settings: ExportSettings) -> list[Precision]:
    calibrated = settings.calibrated()
    if calibrated:
        raise InputError(f"{calibrated[0].name} is added to a bank's backbone after its export, behind each "
                         "task's gate (deploy/bank_int8.py), not converted with it")
    return settings.reduced()


def _raise_failed(checks: Checks, what: str, out_dir: Path) -> None:
    failed = [name for name, check in checks.items() if check["required"] and not check["passed"]]
    if failed:
        raise VerificationError(f"{what} verification failed ({', '.join(failed)}); nothing was written to {out_dir}")


def export_backbone(model: LoadedModel, out_dir: Path, pixels: torch.Tensor, settings: ExportSettings = ExportSettings(),
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """``backbone.onnx`` (and each reduced precision) of ``model``'s image tower, checked against
    PyTorch on ``pixels``; returns the manifest."""
    reduced = _reduced(settings)
    check_tower_memory(model, settings)
    with torch.no_grad():  # the reference: the tower as trained; the graph: its inference form
        features = Backbone(model.model.visual)(pixels).numpy()
    visual, reparameterised = for_inference(model.model.visual)
    module = Backbone(visual)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, MANIFEST) as staging:
        start = time.perf_counter()
        # written as traced, its weights never in memory beside the tower's
        export_graph(module, pixels[:2], "pixel_values", FEATURES, settings.opset, f"image tower {model.identity.name}",
                     staging / "backbone.onnx", settings.external_data_threshold)
        checks, files = Checks(), {"backbone.onnx": REFERENCE_PRECISION}
        with graph_runner(staging / "backbone.onnx") as runner:
            for rows in (len(pixels), 3):  # two batch sizes: the batch axis is really dynamic
                result = compare_outputs(features[:rows], runner.infer(pixels[:rows].numpy()))
                checks.add(f"backbone_fp32_vs_torch_batch{rows}", result, result["max_abs"] <= FP32_LOGIT_ATOL, True,
                           f"max_abs <= {FP32_LOGIT_ATOL}")
        for target in reduced:
            name = convert_graph(staging, "backbone", target, {"pixel_values": pixels[: settings.calibration_images].numpy()},
                                 settings.external_data_threshold)
            converted = run_graph(GraphFile(staging / name, target.name), pixels.numpy())
            result = compare_outputs(features, converted)
            # features have no classes: the logits each task reads from them are judged on the bank
            checks.add(f"backbone_{target.name}_vs_torch_fp32", result, result["finite"], True, "finite outputs")
            files[name] = target.name
        _raise_failed(checks, "backbone export", out_dir)
        write_json(staging / "parity.json", {"samples": int(len(pixels)), "checks": dict(checks)})
        write_manifest(staging / MANIFEST, BACKBONE_FORMAT, FORMAT_VERSION, {
            "files": _graph_files(staging, files), "graphs": _graphs_by_precision(files, "backbone"),
            "output": FEATURES, "preprocess": model.preprocess_config, "feature_dim": int(features.shape[1]),
            "target_model": model.identity.to_dict(), "opset": settings.opset,
            "image_tower": {"reparameterised_modules": reparameterised},
            "macs": count_macs(graph_structure(staging / "backbone.onnx"))["total"]})
    log(f"exported {', '.join(files)} to {out_dir} in {time.perf_counter() - start:.1f} s")
    return read_json(out_dir / MANIFEST, "backbone manifest")


def export_head(head: ZeroShotHead, artifact: AdapterArtifact, features: torch.Tensor, out_dir: Path,
                settings: ExportSettings = ExportSettings(), log: Callable[[str], None] = print) -> dict[str, Any]:
    """A task's folded head on its own (``head.onnx``, reduced precisions, ``head.safetensors``),
    checked against PyTorch on ``features`` (the target's image features of the task's images);
    returns the manifest."""
    check_adapter_head(artifact, head, "target head")
    reduced = _reduced(settings)
    folded = FoldedHead(head, artifact, settings.sigma_mode)
    features = torch.nn.functional.normalize(features.float(), dim=-1)
    if features.ndim != 2 or len(features) < 2:
        raise InputError("a head export needs at least 2 feature rows to verify on")
    with torch.no_grad():
        reference = folded(features).numpy()
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, MANIFEST) as staging:
        start = time.perf_counter()
        graph = to_onnx(folded, features[:2], FEATURES, "logits", settings.opset, "folded head", staging)
        save_graph(graph, staging / "head.onnx", settings.external_data_threshold)
        write_head_safetensors(folded, staging / HEAD_FILE)
        checks, files = Checks(), {"head.onnx": REFERENCE_PRECISION}
        result = compare_outputs(reference, run_graph(staging / "head.onnx", features.numpy()))
        checks.add("head_onnx_vs_torch", result, result["max_abs"] <= FP32_LOGIT_ATOL, True, f"max_abs <= {FP32_LOGIT_ATOL}")
        result = compare_outputs(reference, head_logits_numpy(staging / HEAD_FILE, features.numpy()).astype(np.float32))
        checks.add("head_safetensors_vs_torch", result, result["max_abs"] <= FP32_LOGIT_ATOL, True,
                   f"max_abs <= {FP32_LOGIT_ATOL}")
        for target in reduced:
            name = convert_graph(staging, "head", target, {FEATURES: features.numpy()}, settings.external_data_threshold)
            result = compare_outputs(reference, run_graph(GraphFile(staging / name, target.name), features.numpy()))
            checks.add(f"head_{target.name}_vs_torch_fp32", result, within_tolerance(result, target.name), True,
                       tolerance_criterion(target))
            files[name] = target.name
        _raise_failed(checks, "head export", out_dir)
        write_json(staging / "parity.json", {"samples": int(len(features)), "checks": dict(checks)})
        files[HEAD_FILE] = REFERENCE_PRECISION
        write_manifest(staging / MANIFEST, HEAD_EXPORT_FORMAT, FORMAT_VERSION, {
            "files": _graph_files(staging, files), "graphs": _graphs_by_precision(files, "head"),
            "class_names": artifact.class_names, "feature_dim": int(features.shape[1]),
            "target_model": head.model.to_dict(), "source_model": artifact.source_model.to_dict(),
            "adapter": {"stage": artifact.stage, "config": artifact.adapter.config.to_dict(),
                        "sigma_mode": folded.sigma_mode, "provenance": artifact.provenance},
            "head_sha256": head.weights_sha256, "adapter_sha256": artifact.weights_sha256,
            "opset": settings.opset, "macs": count_macs(graph)["total"]})
    log(f"exported {', '.join(files)} to {out_dir} in {time.perf_counter() - start:.1f} s")
    return read_json(out_dir / MANIFEST, "head manifest")


# ---- reading parts --------------------------------------------------------------------------

@dataclass
class Part:
    """A verified set of files: where they are, what the manifest says, the graph per precision."""

    directory: Path
    manifest: dict[str, Any]
    graphs: dict[str, str]  # precision name -> file name within directory
    files: dict[str, dict]  # file name within directory -> manifest entry

    def path(self, name: str) -> Path:
        return self.directory / name

    def verify(self, what: str) -> None:
        """Every file the part lists has the size and sha256 its manifest records, and every graph
        points only at the external data files its entry lists (runtimes/onnx_files.check_graph_files)."""
        checked: set[str] = set()  # hashed by check_graph_files: a data file is gigabytes, hash it once
        for name, entry in self.files.items():
            if name.endswith(".onnx"):
                # the graph's sha256 is checked (here or below), so what it points at is what its
                # entry lists: no need to parse a large graph to read its locations
                data = check_graph_files(self.directory, name, self.files, what, locations=_listed_data(entry))
                if data:  # a graph with external data was checked whole, with its data files
                    checked.update([name, *data])
        for name, entry in self.files.items():
            if name in checked:
                continue
            path = self.directory / name
            if not path.is_file():
                raise IntegrityError(f"{what}: {path} is missing")
            if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
                raise IntegrityError(f"{what}: {path} does not match the sha256 its manifest records (modified?)")


def _entries(manifest: dict, where: str) -> dict[str, dict]:
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str)
                                               for v in files.values()):
        raise IntegrityError(f"{where}: 'files' must map file names to entries with a sha256")
    return files


def _precision_graphs(files: dict[str, dict], stem: str, where: str) -> dict[str, str]:
    graphs = {}
    for name, entry in files.items():
        if name.startswith(stem) and name.endswith(".onnx") and "/" not in name:
            try:
                graphs[precision_from_manifest(str(entry.get("precision", "fp32"))).name] = name
            except InputError as exc:
                raise IntegrityError(f"{where}: {name}: {exc}") from exc
    if REFERENCE_PRECISION not in graphs:
        raise IntegrityError(f"{where}: no fp32 {stem}.onnx is listed")
    return graphs


def read_backbone(directory: Path) -> Part:
    """A backbone export, verified."""
    path = Path(directory) / MANIFEST
    manifest = read_json(path, "backbone manifest")
    check_format(manifest, BACKBONE_FORMAT, FORMAT_VERSION, str(path))
    require_keys(manifest, {"feature_dim": int, "target_model": dict, "preprocess": dict, "opset": int}, str(path))
    files = _entries(manifest, str(path))
    part = Part(Path(directory), manifest, _precision_graphs(files, "backbone", str(path)), files)
    part.verify(f"backbone {directory}")
    return part


def read_head(directory: Path, verify: bool = True) -> Part:
    """A task head: a head export, or the head files of a single-task export (``transmiter
    export-onnx`` or a single-task recipe), verified; calibrated graphs are not carried over."""
    path = Path(directory) / MANIFEST
    manifest = read_json(path, "head manifest")
    if manifest.get("format") == EXPORT_FORMAT:
        check_format(manifest, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, str(path))
    else:
        check_format(manifest, HEAD_EXPORT_FORMAT, FORMAT_VERSION, str(path))
    require_keys(manifest, {"feature_dim": int, "target_model": dict, "class_names": list}, str(path))
    require_string_lists(manifest, ("class_names",), str(path))
    listed = _entries(manifest, str(path))
    if HEAD_FILE not in listed:
        raise IntegrityError(f"{path}: {HEAD_FILE} is not listed")
    graphs = {name: graph for name, graph in _precision_graphs(listed, "head", str(path)).items()
              if not PRECISIONS[name].needs_calibration}
    files = with_data_files(listed, [*graphs.values(), HEAD_FILE])
    part = Part(Path(directory), manifest, graphs, files)
    if verify:
        part.verify(f"head {directory}")
    return part


# ---- composing ------------------------------------------------------------------------------

def _opsets(models: list[onnx.ModelProto], names: list[str]) -> list[onnx.OperatorSetIdProto]:
    versions: dict[str, int] = {}
    for model, name in zip(models, names):
        for opset in model.opset_import:
            if versions.setdefault(opset.domain, opset.version) != opset.version:
                raise InputError(f"{name} uses opset {opset.version} of '{opset.domain or 'ai.onnx'}', the backbone "
                                 f"{versions[opset.domain]}: export the head with the backbone's opset")
    return [onnx.helper.make_opsetid(domain, version) for domain, version in versions.items()]


def _default_opset(model: onnx.ModelProto) -> int:
    return next((opset.version for opset in model.opset_import if opset.domain in ("", "ai.onnx")), 0)


def _head_at_backbone_opset(backbone: onnx.ModelProto, head: onnx.ModelProto, task: str) -> onnx.ModelProto:
    """``head`` converted up to the backbone's default opset where it is lower: a quantised backbone
    comes out of ModelOpt at a newer opset than the recipe's (19 for int8 Q/DQ), the heads stay at
    the recipe's. onnx's version converter rewrites each op to its newer form; the composed graph
    is then checked against its parts (:func:`_verify_bank`)."""
    wanted, have = _default_opset(backbone), _default_opset(head)
    if not have or have >= wanted:
        return head
    try:
        return onnx.version_converter.convert_version(head, wanted)
    except Exception as exc:  # the converter raises bare RuntimeErrors from C++: named here
        raise InputError(f"task {task}: its head (opset {have}) cannot be converted to the backbone's opset "
                         f"{wanted}: {exc}") from exc


def output_names(task: str, softmax: bool) -> list[str]:
    return [f"logits_{task}"] + ([f"probs_{task}"] if softmax else [])


def compose_bank(backbone: onnx.ModelProto, heads: list[tuple[str, onnx.ModelProto]], softmax: bool = False) -> onnx.ModelProto:
    """One graph: ``backbone``'s input -> ``logits_<task>`` (and ``probs_<task>``) per head, the
    backbone computed once. Every head's names are prefixed with ``<task>/``."""
    if len(backbone.graph.output) != 1:
        raise InputError("a bank backbone graph must have exactly one output (the image features)")
    features = backbone.graph.output[0].name
    graph = onnx.GraphProto()
    graph.CopyFrom(backbone.graph)
    graph.name = "transmiter_bank"
    del graph.output[:]
    heads = [(task, _head_at_backbone_opset(backbone, head, task)) for task, head in heads]
    for task, head in heads:
        if len(head.graph.input) != 1 or len(head.graph.output) != 1:
            raise InputError(f"task {task}: a head graph must have one input (features) and one output (logits)")
        prefixed = onnx.compose.add_prefix(head, prefix=f"{task}/")
        head_input, head_output = prefixed.graph.input[0].name, prefixed.graph.output[0].name
        for node in prefixed.graph.node:
            for i, name in enumerate(node.input):
                if name == head_input:
                    node.input[i] = features
        graph.node.extend(prefixed.graph.node)
        graph.initializer.extend(prefixed.graph.initializer)
        graph.sparse_initializer.extend(prefixed.graph.sparse_initializer)
        graph.value_info.extend(prefixed.graph.value_info)
        logits, *probs = output_names(task, softmax)
        graph.node.append(onnx.helper.make_node("Identity", [head_output], [logits], name=f"{task}/output"))
        shape = prefixed.graph.output[0].type.tensor_type
        graph.output.append(onnx.helper.make_tensor_value_info(logits, shape.elem_type, [
            d.dim_param or d.dim_value for d in shape.shape.dim]))
        if probs:
            graph.node.append(onnx.helper.make_node("Softmax", [logits], probs, name=f"{task}/softmax", axis=-1))
            graph.output.append(onnx.helper.make_tensor_value_info(probs[0], shape.elem_type, [
                d.dim_param or d.dim_value for d in shape.shape.dim]))
    model = onnx.helper.make_model(graph, opset_imports=_opsets([backbone, *(h for _, h in heads)],
                                                                ["backbone", *(t for t, _ in heads)]))
    model.ir_version = backbone.ir_version
    check_full(model, "the composed bank")
    return model


# ---- the bank -------------------------------------------------------------------------------

@dataclass
class BankTask:
    name: str
    head: Part


@dataclass
class Bank:
    directory: Path
    manifest: dict[str, Any]
    backbone: Part
    tasks: list[BankTask] = field(default_factory=list)

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def output(self, task: str) -> str:
        return output_names(task, bool(self.manifest.get("softmax")))[-1]


def head_graph(head: Part, kind: str) -> str:
    """The head graph a bank composes with its ``kind`` backbone: the head's own graph of that
    precision, or its fp32 graph for a calibrated precision (heads are not quantised:
    deploy/bank_int8.py)."""
    if kind not in head.graphs and PRECISIONS[kind].needs_calibration:
        return head.graphs[REFERENCE_PRECISION]
    return head.graphs[kind]


def _check_compatible(backbone: Part, name: str, head: Part) -> None:
    ours, theirs = backbone.manifest, head.manifest
    if theirs["feature_dim"] != ours["feature_dim"]:
        raise InputError(f"task {name}: its head reads {theirs['feature_dim']}-dim features, the bank's backbone "
                         f"makes {ours['feature_dim']}-dim ones")
    if theirs["target_model"] != ours["target_model"]:
        raise InputError(f"task {name}: its head was built for {theirs['target_model'].get('name')} "
                         f"({_weights(theirs['target_model'])}), the bank's backbone is "
                         f"{ours['target_model'].get('name')} ({_weights(ours['target_model'])})")
    missing = [p for p in backbone.graphs if p not in head.graphs and not PRECISIONS[p].needs_calibration]
    if missing:
        raise InputError(f"task {name}: its head has no {missing[0]} graph, which the bank's backbone has")


def _weights(identity: dict) -> str:
    digest = identity.get("weights_sha256") or identity.get("checkpoint_sha256") or identity.get("pretrained")
    return f"weights {str(digest)[:12]}" if digest else "unknown weights"


def _check_images(backbone: Part, count: int = BANK_CHECK_IMAGES, seed: int = 0) -> np.ndarray:
    """Seeded noise in the backbone's input shape: the composed graph must equal its parts on
    any input, so no real images are needed."""
    preprocess = backbone.manifest["preprocess"]
    size = preprocess.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise IntegrityError(f"backbone {backbone.directory}: preprocess.image_size must be [height, width], got {size!r}")
    return np.random.default_rng(seed).standard_normal((count, 3, int(size[0]), int(size[1])), dtype=np.float32)


def _verify_bank(staging: Path, backbone: Part, tasks: list[BankTask], graphs: dict[str, str], softmax: bool) -> Checks:
    """Each composed graph against its parts run one after the other (ONNX Runtime CPU)."""
    pixels, checks = _check_images(backbone), Checks()
    for kind, graph in graphs.items():
        target = PRECISIONS[kind]
        outputs = run_graph_outputs(GraphFile(staging / graph, kind), pixels)
        features = run_graph(GraphFile(backbone.path(backbone.graphs[kind]), kind), pixels)
        for task in tasks:
            parts = run_graph(task.head.path(head_graph(task.head, kind)), features)
            result = compare_outputs(parts, outputs[f"logits_{task.name}"])
            atol = FP32_LOGIT_ATOL if target.reference else (target.max_abs or FP32_LOGIT_ATOL)
            checks.add(f"bank_{kind}_{task.name}_vs_parts", result,
                       result["max_abs"] <= atol and result["top1_agreement"] == 1.0, True,
                       f"max_abs <= {atol}, top-1 agreement 100% (backbone then head, ONNX Runtime CPU)")
            if softmax:
                probabilities = outputs[f"probs_{task.name}"]
                ok = bool(np.allclose(probabilities.sum(axis=-1), 1.0, atol=1e-4))
                checks.add(f"bank_{kind}_{task.name}_softmax", {**result, "rows_sum_to_one": ok}, ok, True,
                           "probabilities sum to 1")
    return checks


def assemble_bank(out_dir: Path, backbone: Part, tasks: list[BankTask], softmax: bool = False,
                  log: Callable[[str], None] = print, external_data_threshold: int | None = None,
                  lineage: dict[str, Any] | None = None) -> Bank:
    """Write the bank directory atomically: the parts' files linked in byte for byte (external
    data files copied with their graphs, see onnx_files.link_or_copy), the fused graph of every precision the backbone has (external
    data by ``external_data_threshold``, onnx_files.save_graph), the manifest; checked before it
    replaces the previous bank (which stays as it was on any failure). ``lineage``: what an upgrade
    made the bank from (deploy/export_format.py), recorded in its manifest."""
    if not tasks:
        raise InputError("a bank needs at least one task")
    seen: set[str] = set()
    for task in tasks:
        check_task_name(task.name, "bank")
        if task.name in seen:
            raise InputError(f"bank: task '{task.name}' is given twice")
        seen.add(task.name)
        _check_compatible(backbone, task.name, task.head)
    out_dir, start = Path(out_dir), time.perf_counter()
    with atomic_directory(out_dir, MANIFEST) as staging:
        entries: dict[str, dict] = {}
        for name in backbone.files:
            link_or_copy(backbone.path(name), staging / name, copy=is_external_data(backbone.files[name]))
            entries[name] = backbone.files[name]
        task_records = []
        for task in tasks:
            where = Path(HEADS_DIR) / task.name
            (staging / where).mkdir(parents=True)
            for name, entry in task.head.files.items():
                link_or_copy(task.head.path(name), staging / where / name, copy=is_external_data(entry))
                entries[str(where / name)] = entry
            head_manifest = _head_manifest(task.head)
            if head_manifest is None:
                link_or_copy(task.head.path(MANIFEST), staging / where / MANIFEST)
            else:  # a single-task export: its head files get a head manifest of their own
                write_manifest(staging / where / MANIFEST, HEAD_EXPORT_FORMAT, FORMAT_VERSION, head_manifest)
            entries[str(where / MANIFEST)] = {"sha256": sha256_file(staging / where / MANIFEST),
                                              "bytes": (staging / where / MANIFEST).stat().st_size}
            task_records.append(_task_record(task, str(where), softmax))
        graphs = {}
        with probes_batched():
            for kind, graph_file in backbone.graphs.items():
                composed = compose_bank(onnx.load(backbone.path(graph_file)),
                                        [(t.name, onnx.load(t.head.path(head_graph(t.head, kind)))) for t in tasks],
                                        softmax)
                name = PRECISIONS[kind].graph_name("model")
                save_graph(composed, staging / name, external_data_threshold)
                del composed
                graphs[kind] = name
        checks = _verify_bank(staging, backbone, tasks, graphs, softmax)
        _raise_failed(checks, "bank", out_dir)
        entries.update(_graph_files(staging, {name: kind for kind, name in graphs.items()}))
        write_json(staging / "parity.json", {"samples": BANK_CHECK_IMAGES, "inputs": "seeded noise", "checks": dict(checks),
                                             "macs": {"backbone": backbone.manifest.get("macs"),
                                                      "tasks": {t.name: t.head.manifest.get("macs") for t in tasks}}})
        b = backbone.manifest
        write_manifest(staging / MANIFEST, BANK_FORMAT, FORMAT_VERSION, {
            "files": entries, "graphs": graphs,
            "backbone": {"graphs": dict(backbone.graphs), "output": FEATURES,
                         "sha256": backbone.files[backbone.graphs[REFERENCE_PRECISION]]["sha256"],
                         "macs": b.get("macs"),
                         # calibrated graphs: their calibration and the quantised nodes kept in fp32
                         **{key: b[key] for key in CALIBRATION_RECORDS if b.get(key)}},
            "tasks": task_records, "output": "probabilities" if softmax else "logits", "softmax": softmax,
            "preprocess": b["preprocess"], "feature_dim": b["feature_dim"], "target_model": b["target_model"],
            "opset": b["opset"], **({LINEAGE: lineage} if lineage else {})})
    log(f"assembled the bank of {len(tasks)} task(s) ({', '.join(t.name for t in tasks)}) in {out_dir} "
        f"in {time.perf_counter() - start:.1f} s")
    return read_bank(out_dir, verify=False)  # the parts were verified when read, then linked in


def _head_manifest(head: Part) -> dict | None:
    """None for a head export (its manifest is linked as is); for a single-task export, the
    head manifest its files get inside a bank."""
    m = head.manifest
    if m.get("format") == HEAD_EXPORT_FORMAT:
        return None
    return {"files": head.files, "graphs": dict(head.graphs), "class_names": m["class_names"],
            "feature_dim": m["feature_dim"], "target_model": m["target_model"],
            "source_model": m.get("source_model"), "adapter": m.get("adapter"), "head_sha256": m.get("head_sha256"),
            "adapter_sha256": m.get("adapter_sha256"), "opset": m.get("opset"),
            "macs": (read_json(head.path("parity.json"), "parity report").get("macs", {}).get("head_folded")
                     if head.path("parity.json").is_file() else None),
            "from": f"{EXPORT_FORMAT} {head.directory}"}


def _task_record(task: BankTask, where: str, softmax: bool) -> dict[str, Any]:
    m = task.head.manifest
    logits, *probs = output_names(task.name, softmax)
    return {"name": task.name, "class_names": list(m["class_names"]), "output": logits,
            "probabilities": probs[0] if probs else None,
            "head": {"graphs": {kind: f"{where}/{name}" for kind, name in task.head.graphs.items()},
                     "safetensors": f"{where}/{HEAD_FILE}", "manifest": f"{where}/{MANIFEST}"},
            "source_model": m.get("source_model"), "adapter": m.get("adapter"),
            "head_sha256": m.get("head_sha256"), "adapter_sha256": m.get("adapter_sha256"),
            "macs": m.get("macs")}


def _check_graph_names(graphs: Any, where: str) -> None:
    if not isinstance(graphs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in graphs.items()):
        raise IntegrityError(f"{where} must map precisions to graph file names")


def read_bank(directory: Path, verify: bool = True) -> Bank:
    """A bank directory, every file checked against its manifest (``verify=False``: only the
    manifests, for a bank this process has just assembled from verified parts). A bank replaced
    meanwhile (``transmiter bank add`` elsewhere): the old one or the new one, read whole."""
    return read_consistently(directory, lambda: _read_bank(Path(directory), verify))


def _read_bank(directory: Path, verify: bool) -> Bank:
    path = directory / MANIFEST
    manifest = read_json(path, "bank manifest")
    check_format(manifest, BANK_FORMAT, FORMAT_VERSION, str(path))
    require_keys(manifest, {"tasks": list, "backbone": dict, "graphs": dict, "feature_dim": int, "target_model": dict,
                        "preprocess": dict, "opset": int}, str(path))
    files = _entries(manifest, str(path))
    _check_graph_names(manifest["graphs"], f"{path}: graphs")
    _check_graph_names(manifest["backbone"].get("graphs", {}), f"{path}: backbone.graphs")
    backbone_files = with_data_files(files, [name for name in manifest["backbone"].get("graphs", {}).values()
                                             if name in files])
    backbone = Part(directory, {key: manifest[key] for key in ("feature_dim", "target_model", "preprocess", "opset")}
                    | {key: manifest["backbone"].get(key) for key in ("macs", *CALIBRATION_RECORDS)},
                    _precision_graphs(backbone_files, "backbone", str(path)), backbone_files)
    bank = Bank(directory, manifest, backbone)
    seen = set()
    for index, record in enumerate(manifest["tasks"]):
        where = f"{path}: tasks[{index}]"
        if not isinstance(record, dict):
            raise IntegrityError(f"{where} must be an object")
        name = record.get("name")
        try:
            check_task_name(name, where)
        except InputError as exc:
            raise IntegrityError(str(exc)) from exc
        if name in seen:
            raise IntegrityError(f"{where}: task '{name}' is listed twice")
        seen.add(name)
        head_dir = directory / HEADS_DIR / name
        if not (head_dir / MANIFEST).is_file():
            raise IntegrityError(f"{where}: the head manifest {head_dir / MANIFEST} is missing")
        if files.get(f"{HEADS_DIR}/{name}/{MANIFEST}", {}).get("sha256") != sha256_file(head_dir / MANIFEST):
            raise IntegrityError(f"{where}: {head_dir / MANIFEST} does not match the sha256 the bank records")
        bank.tasks.append(BankTask(name, read_head(head_dir, verify)))
    if not verify:
        return bank
    backbone.verify(f"bank {directory}")
    for kind, name in manifest["graphs"].items():
        entry = files.get(name)
        if not isinstance(entry, dict) or not (directory / name).is_file() or sha256_file(directory / name) != entry["sha256"]:
            raise IntegrityError(f"bank {directory}: {directory / name} is missing or does not match its sha256 (modified?)")
        check_graph_files(directory, name, files, f"bank {directory}", locations=_listed_data(entry))
    return bank


def add_task(bank_dir: Path, name: str, head_dir: Path, log: Callable[[str], None] = print) -> Bank:
    """The bank with one more task, its head read from a head export or a single-task export."""
    bank = read_bank(bank_dir)
    check_task_name(name, "bank add")
    calibrated = [kind for kind in bank.backbone.graphs if PRECISIONS[kind].needs_calibration]
    if calibrated:
        raise InputError(f"bank {bank_dir} has {calibrated[0]} graphs, gated task by task on labelled images: add "
                         f"'{name}' to the bank's recipe and run transmiter export, which gates it")
    if name in bank.task_names:
        raise InputError(f"bank {bank_dir} already has a task '{name}' (remove it first)")
    return assemble_bank(bank_dir, bank.backbone, [*bank.tasks, BankTask(name, read_head(head_dir))],
                         bool(bank.manifest.get("softmax")), log, lineage=bank.manifest.get(LINEAGE))


def remove_task(bank_dir: Path, name: str, log: Callable[[str], None] = print) -> Bank:
    """The bank without ``name``; the last task cannot be removed (a bank needs one)."""
    bank = read_bank(bank_dir)
    if name not in bank.task_names:
        raise InputError(f"bank {bank_dir} has no task '{name}' (tasks: {', '.join(bank.task_names)})")
    if len(bank.tasks) == 1:
        raise InputError(f"'{name}' is the only task of {bank_dir}; a bank needs at least one")
    return assemble_bank(bank_dir, bank.backbone, [t for t in bank.tasks if t.name != name],
                         bool(bank.manifest.get("softmax")), log, lineage=bank.manifest.get(LINEAGE))
