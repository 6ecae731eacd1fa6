"""int8 task banks: one backbone quantised for every task, each task behind its own gate.

``backbone_int8.onnx`` is the bank's ``backbone.onnx`` quantised as a single-task export's image
tower is (deploy/precisions/int8.py: weights stored as int8 behind a DequantizeLinear,
activations behind calibrated Q/DQ pairs), calibrated on a seeded sample across the bank's
tasks' training images (deploy/calibration.py: ``sample_across``). The heads are not quantised:
ModelOpt selects none of a folded head's GEMMs (deploy/precision_edits.py drops such a graph
from single-task exports), so ``model_int8.onnx`` composes ``backbone_int8.onnx`` with each
task's fp32 head and no ``head_int8.onnx`` is written.

A task's gate (deploy/gate.py) runs the backbone and the task's head one after the other, as the
composed graph computes them (deploy/bank.py checks each composition against its parts): the
logits through the int8 backbone against those through ``backbone.onnx``, on the task's own gate
images. A gate depends on the backbone graph, the head and the images only, so a task added later
is gated alone against the same backbone graph.

Where a gate fails, the backbone's most sensitive quantised nodes are kept in fp32
(deploy/qdq_fallback.py: exact graph surgery, the calibration unchanged), ranked on the
calibration images by how much each lowers the mean absolute error of the image features. The
features are what every head reads, so the ranking does not depend on the tasks and a task added
later does not re-rank. The candidates keep 0, 1, 2, 4, ... nodes in fp32 and are tried in that
order against every task's gate until all pass, within qdq_fallback's bound.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from ..artifacts import atomic_directory, read_manifest, write_manifest
from ..runtimes.base import GraphFile, GraphInMemory
from ..runtimes.onnx_files import (PROTOBUF_LIMIT, check_qdq_scales, external_data_locations, graph_entries,
                                   graph_structure, io_contract, link_or_copy, save_graph, stored_bytes)
from ..runtimes.registry import Precision
from . import qdq_fallback
from .bank import BACKBONE_FORMAT, FORMAT_VERSION, Part
from .export_format import MANIFEST
from .gate import GateImages, accuracy_gate
from .parity import run_graph
from .precision_edits import convert_graph, rewritten

QUANTISED_FORMAT = "transmiter-deploy/backbone-quantised"
QUANTISED_VERSION = 1

Graph = GraphFile | GraphInMemory


def quantise_backbone(backbone: Part, out_dir: Path, target: Precision, pixels: np.ndarray, calibration_record: dict,
                      external_data_threshold: int | None = None, log: Callable[[str], None] = print) -> dict:
    """``out_dir`` (atomically): the bank backbone's fp32 graph converted to ``target`` (a Q/DQ
    precision) on the calibration ``pixels``, with a manifest naming its quantised nodes and the
    calibration; returns the manifest. Not yet a bank artifact: the gates decide what of it ships."""
    start = time.perf_counter()
    source = backbone.path(backbone.graphs["fp32"])
    with atomic_directory(Path(out_dir), MANIFEST) as staging:
        # the converter reads <stem>.onnx beside its output: the verified graph linked in, then gone
        linked = [source.name, *external_data_locations(graph_structure(source))]
        for name in linked:
            link_or_copy(source.parent / name, staging / name, copy=name != source.name)
        name = convert_graph(staging, "backbone", target, {"pixel_values": pixels}, external_data_threshold)
        for leftover in linked:
            (staging / leftover).unlink()
        structure = graph_structure(staging / name)
        files = graph_entries(staging, name, target, io_contract(structure))
        write_manifest(staging / MANIFEST, QUANTISED_FORMAT, QUANTISED_VERSION, {
            "graph": name, "files": files, "precision": target.name, "calibration": calibration_record,
            "backbone_sha256": backbone.files[backbone.graphs["fp32"]]["sha256"],
            "quantised_nodes": qdq_fallback.quantised_nodes(structure)})
    log(f"quantised the bank's backbone to {target.name} ({name}) in {time.perf_counter() - start:.1f} s")
    return read_quantised(out_dir)


def read_quantised(directory: Path) -> dict:
    return read_manifest(Path(directory) / MANIFEST, QUANTISED_FORMAT, QUANTISED_VERSION, "quantised backbone manifest")


def fallback_possible(path: Path) -> bool:
    """Whether a quantised graph can be rewritten in memory (qdq_fallback works on a ModelProto,
    which protobuf caps at 2 GiB)."""
    return stored_bytes(graph_structure(path)) <= PROTOBUF_LIMIT - (64 << 20)


def rank_nodes(backbone_fp32: Path, quantised: onnx.ModelProto, target: Precision,
               pixels: np.ndarray) -> list[tuple[str, float]]:
    """The quantised nodes, most sensitive first, by how much keeping each alone in fp32 lowers the
    mean absolute difference of the image features from the fp32 backbone's on ``pixels``."""
    pixels = pixels[: qdq_fallback.RANKING_IMAGES]
    reference = run_graph(backbone_fp32, pixels)
    return qdq_fallback.rank_by_sensitivity(
        quantised, lambda graph: run_graph(in_memory(graph, target, "backbone variant"), pixels), reference)


def in_memory(graph: onnx.ModelProto, target: Precision, what: str) -> GraphInMemory:
    return GraphInMemory(graph.SerializeToString(), target.name, what)


def candidate(quantised: onnx.ModelProto, kept: list[str], target: Precision) -> onnx.ModelProto:
    """The quantised backbone with ``kept`` nodes computing in fp32, its scales checked."""
    graph = qdq_fallback.keep_fp32(quantised, kept)
    check_qdq_scales(graph, f"{target.graph_name('backbone')} with {len(kept)} node(s) in fp32")
    return graph


def reference_logits(backbone_fp32: Path, head: Path, images: GateImages) -> np.ndarray:
    """A task's fp32 logits on its gate images: its head on the fp32 backbone's features (what
    every candidate of the task's gate is compared with)."""
    return run_graph(head, run_graph(backbone_fp32, images.pixels))


def gate_task(reference: np.ndarray, backbone: Graph, head: Path, images: GateImages, target: Precision) -> dict:
    """One task's gate: its head's logits on ``images`` through ``backbone`` (a candidate int8
    backbone) against ``reference`` (:func:`reference_logits`)."""
    candidate_logits = run_graph(head, run_graph(backbone, images.pixels))
    return accuracy_gate(reference, candidate_logits, target, images)


def add_to_backbone(backbone_dir: Path, target: Precision, graph: Path | onnx.ModelProto, calibration_record: dict,
                    kept: list[str], gates: dict[str, bool], external_data_threshold: int | None = None,
                    log: Callable[[str], None] = print) -> None:
    """The backbone export with ``graph`` as its ``target`` graph (replacing an earlier one),
    the calibration, the nodes kept in fp32 and each task's gate verdict recorded, atomically."""
    name = target.graph_name("backbone")
    with rewritten(Path(backbone_dir), target, (BACKBONE_FORMAT, FORMAT_VERSION)) as rewrite:
        staging = rewrite.staging
        if isinstance(graph, onnx.ModelProto):
            save_graph(graph, staging / name, external_data_threshold)
        else:  # the quantised graph as converted: copied with its data files, byte for byte
            for file in [name, *external_data_locations(graph_structure(graph))]:
                link_or_copy(graph.parent / file, staging / file, copy=True)
        rewrite.body["files"].update(graph_entries(staging, name, target, io_contract(graph_structure(staging / name))))
        rewrite.body.setdefault("graphs", {})[target.name] = name
        rewrite.body.setdefault("calibration", {})[target.name] = calibration_record
        rewrite.body.setdefault("fp32_nodes_kept", {})[target.name] = list(kept)
        rewrite.parity.setdefault("gates", {})[target.name] = gates
    log(f"added {name} to {backbone_dir} ({len(kept)} quantised node(s) kept in fp32)")
