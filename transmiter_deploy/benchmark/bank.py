"""The bank sweep behind ``transmiter bench --bank-sweep``: what N task heads cost on one backbone.

One backbone graph (random-weight open_clip image tower, :class:`~..deploy.bank.Backbone`) and
N synthetic folded TransMiter heads (C = D = 1024, K = 100 by default; random MLP weights, a
seed per task) are composed with :func:`~..deploy.bank.compose_bank` exactly as a bank export
composes them. The backbone alone and the bank of every N are timed in ONE interleaved loop
per runtime and batch (:func:`.timing.time_interleaved`), so the ratios bank(N) / backbone are
fair on a shared machine. Costs come from the graphs: MACs by :func:`~..deploy.graph_cost.count_macs`
(the backbone, one head at the backbone's d and one at d = 768, every bank), weight bytes as
the sum of a head graph's initializers.

Compact heads: ONNX Runtime's weight-only quantiser (``MatMulNBitsQuantizer``) applied to the
MLP's two big MatMuls of each head (the exported Gemms are first rewritten as MatMul + Add,
which is all the quantiser takes); the push, the pull and every statistics node
(``/stats/``, ``/normalise/``, ``/destandardise/``) stay fp32, which is checked on the graph.
A compact bank is compared with the fp32 bank on the same inputs (max abs, top-1 agreement).

Results: ``bank.json``, ``RESULTS.md`` and ``bank_latency.png`` in the results folder, each
written atomically. Composed banks are written to the work folder only to load them, and
removed once their sessions exist (a 32-task fp32 bank of ViT-B-16 is 1.5 GB).
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from .. import demo  # noqa: F401  (registers the demo architectures, for small sweeps and tests)
from ..artifacts import library_versions, sha256_file, utc_now, write_json
from ..deploy.bank import FEATURES, Backbone, compose_bank
from ..deploy.fusion import FP32_NODES, FoldedHead
from ..deploy.graph_cost import count_macs
from ..deploy.onnx_export import DEFAULT_OPSET, FP32_LOGIT_ATOL, save_graph, to_onnx
from ..errors import DependencyError, InputError, VerificationError
from ..features.adapter_artifact import AdapterArtifact
from ..features.heads import ZeroShotHead
from ..features.models import ModelIdentity, ModelSpec, load_model
from ..host import cpu_model
from ..method.adapter import AdapterConfig, TransMiterAdapter
from ..runtimes.compare import compare_outputs
from ..runtimes.onnxruntime import PROVIDERS, ort_session
from ..runtimes.registry import runtime as registered_runtime
from .graphs import cached_record, code_digest, save_cached_graph
from .report import paired_ratio, slug
from .timing import TimingPlan, summarise, time_interleaved

DEFAULT_TASKS = (1, 2, 4, 8, 16, 32)
DEFAULT_BATCHES = (1, 8)
RESULTS_JSON = "bank.json"
PLOT = "bank_latency.png"
# The targets (measured and reported, never asserted).
RATIO_TARGET = {"target": "ViT-B-16", "runtime": "onnxruntime-cpu", "tasks": 16, "batches": (1, 8), "max_ratio": 1.02}
HEAD_MACS_TARGET = {"feature_dim": 768, "max_macs": 9.3e6}
REFERENCE_FEATURE_DIM = 768  # the d the MAC target is stated at (ViT-L-14's); ViT-B-16 has 512
MLP_NODE = re.compile(r".*/blocks\.\d+/fc\d/")  # the residual MLP's linear layers: the big weights
ONNX_RUNTIMES = {"onnxruntime-cpu": "cpu", "onnxruntime-cuda": "cuda"}
HEAD_CHECK_ROWS = 1024  # L2-normalised random features each compact head is compared on
# what shapes the cached graphs: these modules, and this one's graph makers (_code_digest)
_SOURCES = ("deploy/fusion.py", "method/adapter.py", "deploy/onnx_export.py", "deploy/bank.py")


@dataclass(frozen=True)
class Compact:
    """One setting of ONNX Runtime's weight-only quantiser for the heads' MLP MatMuls."""

    name: str
    bits: int
    block_size: int
    accuracy_level: int | None  # None/0: fp32 arithmetic on dequantised weights; 4: int8 activations
    description: str
    symmetric: bool = True


COMPACT = {c.name: c for c in (
    Compact("q8", 8, 128, None, "int8 weights (MatMulNBits, blocks of 128), fp32 arithmetic"),
    Compact("q8i", 8, 128, 4, "int8 weights, int8-quantised activations and int8 dot products (accuracy_level 4)"),
    Compact("q4", 4, 32, None, "int4 weights (blocks of 32), fp32 arithmetic"),
)}
# Timed in the sweep by default: q8i at N = 8, 16, 32 (the slope and the target's N); q8 (fp32
# arithmetic) at the target's N only, as its CPU kernel is over 10x slower than the fp32 head's
# (see the report). Fewer variants per loop leave more rounds in the same wall time.
DEFAULT_COMPACT = ("q8i@8,16,32", "q8@16")


def parse_tasks(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> (1, 2, 4): the bank sizes of the sweep."""
    try:
        tasks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"--bank-sweep takes task counts separated by commas (e.g. 1,2,4,8,16,32), got {text!r}")
    if not tasks or min(tasks) < 1:
        raise InputError(f"--bank-sweep needs positive task counts, got {text!r}")
    return tuple(sorted(set(tasks)))


def parse_compact(specs: tuple[str, ...], tasks: tuple[int, ...], strict: bool = True) -> dict[str, tuple[int, ...]]:
    """``("q8i", "q8@16")`` -> {compact name: the N it is timed at}; ``none`` times none. A
    setting whose N are not in ``tasks`` is refused, or with ``strict=False`` left out."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec == "none":
            continue
        name, _, at = spec.partition("@")
        if name not in COMPACT:
            raise InputError(f"unknown compact head setting '{name}' (known: {', '.join(COMPACT)}, or none)")
        chosen = tasks if not at else tuple(n for n in parse_tasks(at) if n in tasks)
        if at and not chosen:
            if not strict:
                continue
            raise InputError(f"--bank-compact {spec}: none of {at} is a task count of the sweep {list(tasks)}")
        out[name] = tuple(sorted(set(out.get(name, ())) | set(chosen)))
    return out


@dataclass(frozen=True)
class BankSettings:
    model: str = "ViT-B-16"
    tasks: tuple[int, ...] = DEFAULT_TASKS
    batches: tuple[int, ...] = DEFAULT_BATCHES
    width: int = 1024  # C = D
    classes: int = 100  # K per task
    seed: int = 0
    compact: dict[str, tuple[int, ...]] = field(default_factory=lambda: parse_compact(DEFAULT_COMPACT, DEFAULT_TASKS))
    # per batch: at least min_rounds, then rounds until budget_s is spent (at most max_rounds)
    # (2-core ViT-B-16, 11 variants: ~80 rounds at batch 1 and 20 at batch 8 in about 8 minutes)
    plan: TimingPlan = TimingPlan(warmup=1, min_rounds=20, max_rounds=80, budget_s=160.0)
    opset: int = DEFAULT_OPSET

    def __post_init__(self) -> None:
        if not self.tasks or min(self.tasks) < 1 or not self.batches or min(self.batches) < 1:
            raise InputError(f"the bank sweep needs positive task counts and batches, got {self.tasks}, {self.batches}")
        if self.classes > self.width:
            raise InputError(f"{self.classes} task classes do not fit in a logit width of {self.width}")
        for name, at in self.compact.items():
            if name not in COMPACT or not set(at) <= set(self.tasks):
                raise InputError(f"compact setting {name} at {at}: not a known setting or not a task count of the sweep")


# ---- graphs ---------------------------------------------------------------------------------

def synthetic_folded_head(feature_dim: int, width: int, classes: int, seed: int,
                          identity: ModelIdentity | None = None, latent_dim: int | None = None,
                          mlp_scale: float = 0.02, source: ModelIdentity | None = None) -> FoldedHead:
    """A folded TransMiter head for ``feature_dim``-dim features: a CLIP-like C-row head (unit
    rows x 100) and an adapter (D = C) whose MLP weights are random (fc2 is zero at init, so
    the adapter would be the identity). Like :func:`.variants.synthetic_head_and_adapter`, for
    any d without a model."""
    identity = identity or ModelIdentity(f"synthetic-d{feature_dim}", init_seed=seed)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.functional.normalize(torch.randn(width, feature_dim, generator=generator), dim=1) * 100.0
    names = [f"class {i}" for i in range(width)]
    head = ZeroShotHead(weight, names[:classes], names[classes:], identity, ("{}",), 100.0)
    adapter = TransMiterAdapter(AdapterConfig(num_task_classes=classes, logit_width=width,
                                              latent_dim=latent_dim or width), seed=seed)
    with torch.no_grad():
        for parameter in adapter.blocks.parameters():
            parameter.add_(mlp_scale * torch.randn(parameter.shape, generator=generator))
    artifact = AdapterArtifact(adapter, head.class_names, head.auxiliary_names, "transferred",
                               source or ModelIdentity("synthetic-source"), identity)
    return FoldedHead(head, artifact)


def head_graph(feature_dim: int, width: int, classes: int, seed: int, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    folded = synthetic_folded_head(feature_dim, width, classes, seed)
    example = torch.nn.functional.normalize(torch.randn(2, feature_dim, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return to_onnx(folded, example, FEATURES, "logits", opset, f"synthetic folded head (seed {seed})")


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer as stored (packed int4/int8 blobs count as their bytes)."""
    return int(sum(numpy_helper.to_array(init).nbytes for init in model.graph.initializer))


def _code_digest() -> str:
    digest = hashlib.sha256(code_digest(_SOURCES).encode())
    for function in (synthetic_folded_head, head_graph, build_graphs):
        digest.update(inspect.getsource(function).encode())
    return digest.hexdigest()


def _cached_graph(folder: Path, key: str, make: Callable[[], onnx.ModelProto], log) -> onnx.ModelProto:
    """``make()`` saved as ``<folder>/<key>.onnx``, reused while the code and libraries that made
    it are unchanged (the record beside it) and its sha256 matches."""
    path, record_path = folder / f"{key}.onnx", folder / f"{key}.json"
    versions = library_versions()
    expected = {"key": key, "code_sha256": _code_digest(),
                **{name: versions.get(name) for name in ("torch", "onnx", "onnxslim", "open_clip_torch")}}
    if cached_record(path, record_path, expected) is not None:
        return onnx.load(path)
    start = time.perf_counter()
    model = make()
    folder.mkdir(parents=True, exist_ok=True)
    data = save_cached_graph(model, path)
    write_json(record_path, {**expected, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                             **({"external_data": data} if data else {})})
    log(f"exported {key} in {time.perf_counter() - start:.1f} s")
    return model


@dataclass
class BankGraphs:
    backbone: onnx.ModelProto
    heads: list[tuple[str, onnx.ModelProto]]  # (task name, fp32 head graph), task i of seed + i
    feature_dim: int
    image_size: tuple[int, int]
    identity: dict


def build_graphs(settings: BankSettings, work_dir: Path, log: Callable[[str], None] = print) -> BankGraphs:
    """The backbone graph and max(N) head graphs (cached under ``<work>/bank-graphs``)."""
    model = load_model(ModelSpec(settings.model, init_seed=settings.seed))
    d = int(model.model.visual.output_dim)
    size = tuple(int(v) for v in model.preprocess_config["image_size"])
    folder = Path(work_dir) / "bank-graphs"
    backbone_module = Backbone(model.model.visual)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(settings.seed))
    backbone = _cached_graph(folder, f"{settings.model}-s{settings.seed}-backbone-o{settings.opset}",
                             lambda: to_onnx(backbone_module, pixels, "pixel_values", FEATURES, settings.opset,
                                             f"image tower {settings.model}"), log)
    del backbone_module, model
    gc.collect()
    heads = []
    for i in range(max(settings.tasks)):
        seed = settings.seed + i
        key = f"head-d{d}-C{settings.width}-K{settings.classes}-s{seed}-o{settings.opset}"
        heads.append((f"task{i:02d}", _cached_graph(folder, key, lambda s=seed: head_graph(
            d, settings.width, settings.classes, s, settings.opset), log)))
    return BankGraphs(backbone, heads, d, size, {"name": settings.model, "init_seed": settings.seed})


# ---- compact heads --------------------------------------------------------------------------

def mlp_gemms_to_matmuls(model: onnx.ModelProto) -> onnx.ModelProto:
    """The MLP's ``Gemm(x, W, b, transB=1)`` nodes as ``MatMul(x, W^T)`` + ``Add(b)``: the
    weight-only quantiser takes MatMul nodes only. Exact (same products, same sums)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    initializers = {init.name: init for init in out.graph.initializer}
    nodes = []
    for node in out.graph.node:
        if node.op_type != "Gemm" or not MLP_NODE.match(node.name):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 \
                or node.input[1] not in initializers:
            raise VerificationError(f"cannot rewrite Gemm node '{node.name}' ({attrs}) as MatMul + Add")
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        out.graph.initializer.remove(initializers[node.input[1]])
        transposed = numpy_helper.from_array(np.ascontiguousarray(weight), f"{node.input[1]}.kxn")
        out.graph.initializer.append(transposed)
        base = node.name.rsplit("/", 1)[0]
        product = f"{node.output[0]}.matmul"
        nodes.append(helper.make_node("MatMul", [node.input[0], transposed.name], [product], name=f"{base}/MatMul"))
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{base}/Add"))
        else:
            nodes[-1].output[0] = node.output[0]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _fp32_nodes(model: onnx.ModelProto) -> list[str]:
    patterns = [re.compile(p) for p in FP32_NODES]
    return [onnx.helper.printable_node(n) for n in model.graph.node if any(p.match(n.name) for p in patterns)]


def compact_head(model: onnx.ModelProto, setting: Compact) -> onnx.ModelProto:
    """``model`` (a head graph) with its MLP MatMuls' weights quantised by ONNX Runtime's
    ``MatMulNBitsQuantizer``; every other node unchanged (checked)."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        raise DependencyError(f"compact heads need onnxruntime.quantization: {exc}") from exc
    import logging

    rewritten = mlp_gemms_to_matmuls(model)
    mlp = [n.name for n in rewritten.graph.node if n.op_type == "MatMul" and MLP_NODE.match(n.name)]
    if not mlp:
        raise VerificationError("the head graph has no MLP MatMul to quantise")
    others = [n.name for n in rewritten.graph.node if n.op_type == "MatMul" and n.name not in mlp]
    quantiser_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quantiser_log.level
    quantiser_log.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        quantiser = MatMulNBitsQuantizer(rewritten, bits=setting.bits, block_size=setting.block_size,
                                         is_symmetric=setting.symmetric, accuracy_level=setting.accuracy_level,
                                         nodes_to_exclude=others, op_types_to_quantize=("MatMul",))
        quantiser.process()
    finally:
        quantiser_log.setLevel(level)
    quantised = quantiser.model.model
    done = [n.name for n in quantised.graph.node if n.op_type == "MatMulNBits"]
    if len(done) != len(mlp):
        raise VerificationError(f"the quantiser replaced {len(done)} of the {len(mlp)} MLP MatMuls")
    if _fp32_nodes(quantised) != _fp32_nodes(model):
        raise VerificationError("the quantiser changed a statistics node (/stats/, /normalise/, /destandardise/)")
    return quantised


def compact_heads(graphs: BankGraphs, setting: Compact, count: int) -> list[tuple[str, onnx.ModelProto]]:
    return [(name, compact_head(head, setting)) for name, head in graphs.heads[:count]]


# ---- costs ----------------------------------------------------------------------------------

def graph_costs(graphs: BankGraphs, settings: BankSettings, compact: dict[str, list]) -> dict:
    """MACs at batch 1 and weight bytes: backbone, one head at the backbone's d and at d = 768,
    each compact head."""
    head = graphs.heads[0][1]
    reference = head_graph(REFERENCE_FEATURE_DIM, settings.width, settings.classes, settings.seed, settings.opset)
    costs = {
        "backbone": {"macs": count_macs(graphs.backbone), "weight_bytes": weight_bytes(graphs.backbone)},
        "head": {"feature_dim": graphs.feature_dim, "macs": count_macs(head)["total"], "weight_bytes": weight_bytes(head)},
        "head_reference_d": {"feature_dim": REFERENCE_FEATURE_DIM, "macs": count_macs(reference)["total"],
                             "weight_bytes": weight_bytes(reference)},
        "head_macs_formula": "d*D + d (mean) + 2*4*D*D (MLP) + D*K (pull)",
        "compact_heads": {name: {"weight_bytes": weight_bytes(heads[0][1]),
                                 "weight_bytes_fp32": weight_bytes(head), **asdict(COMPACT[name])}
                          for name, heads in compact.items() if heads},
    }
    return costs


def head_accuracy(graphs: BankGraphs, compact: dict[str, list], threads: int, batches: tuple[int, ...],
                  tasks: int = 4, plan: TimingPlan = TimingPlan(warmup=2, min_rounds=30, max_rounds=30, budget_s=1.0)) -> dict:
    """Every compact setting on its own: the first ``tasks`` heads against their fp32 graphs on
    the same L2-normalised random features (max abs, top-1 agreement), and each head alone timed
    against the fp32 head (ONNX Runtime CPU, one interleaved loop per batch)."""
    rows = np.random.default_rng(0).standard_normal((HEAD_CHECK_ROWS, graphs.feature_dim)).astype(np.float32)
    features = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    out = {}
    fp32 = [_session_from_proto(head, threads) for _, head in graphs.heads[:tasks]]
    references = [s.run(None, {FEATURES: features})[0] for s in fp32]
    for name, heads in compact.items():
        sessions = [_session_from_proto(head, threads) for _, head in heads[:tasks]]
        outputs = [s.run(None, {FEATURES: features})[0] for s in sessions]
        results = [compare_outputs(ref, out) for ref, out in zip(references, outputs)]
        # rows whose top-1 flips: how close their fp32 top two logits were (near-ties flip first)
        flipped = np.concatenate([_margins(ref)[ref.argmax(1) != out.argmax(1)] for ref, out in zip(references, outputs)])
        all_margins = np.concatenate([_margins(ref) for ref in references])
        timing = {}
        for batch in batches:
            x = features[:batch]
            samples = time_interleaved({"fp32": lambda: fp32[0].run(None, {FEATURES: x}),
                                        name: lambda: sessions[0].run(None, {FEATURES: x})}, plan)
            timing[str(batch)] = {k: float(np.median(v) * 1000) for k, v in samples.items()}
        out[name] = {**asdict(COMPACT[name]), "rows": HEAD_CHECK_ROWS, "tasks": len(results),
                     "max_abs": max(r["max_abs"] for r in results),
                     "max_abs_over_max_reference": max(r["max_abs_over_max_reference"] for r in results),
                     "top1_agreement": min(r["top1_agreement"] for r in results),
                     "flipped_rows": int(len(flipped)),
                     "flipped_max_fp32_margin": float(flipped.max()) if len(flipped) else None,
                     "rows_with_fp32_margin_below_max_abs": float(np.mean(all_margins < max(r["max_abs"] for r in results))),
                     "head_alone_p50_ms": timing, "weight_bytes": weight_bytes(heads[0][1])}
    return out


def _session_from_proto(model: onnx.ModelProto, threads: int):
    return ort_session(model.SerializeToString(), threads=threads, spinning=False)


# ---- the sweep ------------------------------------------------------------------------------

@dataclass
class _Variant:
    name: str  # "backbone", "bank16", "bank16@q8i"
    tasks: int  # 0 for the backbone
    weights: str  # "fp32" or a compact setting's name
    session: object = None
    outputs: list[str] = field(default_factory=list)


def _variant_name(tasks: int, weights: str) -> str:
    return "backbone" if tasks == 0 else f"bank{tasks}" + ("" if weights == "fp32" else f"@{weights}")


def _session(path: Path, runtime: str, threads: int):
    provider = PROVIDERS[ONNX_RUNTIMES[runtime]]
    if provider == "CPUExecutionProvider":
        return ort_session(path, threads=threads, spinning=False)
    return ort_session(path, provider=provider)  # pragma: no cover - needs a GPU


def _peak_rss_mib() -> float | None:
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return round(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024, 1)
    except (OSError, StopIteration, ValueError):
        return None


def _environment(threads: int, command: str) -> dict:
    import onnxruntime as ort

    from .suite import host_label

    return {"date": utc_now(), "host": platform.node(), "host_label": host_label(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "onnxruntime_intra_op_threads": threads, "onnxruntime_providers": ort.get_available_providers(),
            "python": platform.python_version(), "versions": library_versions(), "command": command}


def run_bank_sweep(settings: BankSettings, out_dir: Path, work_dir: Path, threads: int,
                   runtimes: tuple[str, ...] = ("onnxruntime-cpu", "onnxruntime-cuda"), command: str = "",
                   log: Callable[[str], None] = print) -> Path:
    """Build, verify and time the sweep; writes ``bank.json`` in ``out_dir`` and returns its path."""
    started = time.perf_counter()
    available, skipped = [], []
    for name in runtimes:
        if name not in ONNX_RUNTIMES:
            skipped.append({"runtime": name, "reason": "the bank sweep times ONNX graphs on ONNX Runtime only"})
            continue
        reason = registered_runtime(name).unavailable()
        (skipped.append({"runtime": name, "reason": reason}) if reason else available.append(name))
    for s in skipped:
        log(f"bank sweep: skipping {s['runtime']}: {s['reason']}")
    if not available:
        raise DependencyError("no ONNX Runtime execution provider to time the bank sweep on")
    graphs = build_graphs(settings, work_dir, log)
    compact = {name: compact_heads(graphs, COMPACT[name], max(at)) for name, at in settings.compact.items()}
    costs = graph_costs(graphs, settings, compact)
    log(f"bank sweep: backbone {costs['backbone']['macs']['total'] / 1e9:.2f} GMACs, head {costs['head']['macs'] / 1e6:.2f} "
        f"MMACs and {costs['head']['weight_bytes'] / 1e6:.1f} MB at d = {graphs.feature_dim}")
    accuracy = head_accuracy(graphs, compact, threads, settings.batches) if compact else {}
    for name, row in accuracy.items():
        log(f"compact {name}: max abs {row['max_abs']:.3g}, top-1 agreement {row['top1_agreement']:.2%} vs fp32 heads")

    rng = np.random.default_rng(settings.seed)
    pixels = {b: rng.standard_normal((b, 3, *graphs.image_size), dtype=np.float32) for b in settings.batches}
    check_pixels = pixels[max(settings.batches)]
    rows, checks, bank_costs = [], {}, {}
    staging = Path(work_dir) / "bank-sessions"
    staging.mkdir(parents=True, exist_ok=True)
    variants = [_Variant("backbone", 0, "fp32")]
    variants += [_Variant(_variant_name(n, "fp32"), n, "fp32") for n in settings.tasks]
    variants += [_Variant(_variant_name(n, name), n, name) for name, at in settings.compact.items() for n in at]
    # Every graph composed and saved before any session exists: composing (with its full
    # onnx.checker pass) a 32-task ViT-B-16 bank peaks at several GB, on top of nothing else.
    paths = {}
    try:
        for variant in variants:
            build = time.perf_counter()
            paths[variant.name] = staging / f"{variant.name}.onnx"
            if variant.tasks == 0:
                save_graph(graphs.backbone, paths[variant.name], probe=False)
                continue
            heads = graphs.heads if variant.weights == "fp32" else compact[variant.weights]
            model = compose_bank(graphs.backbone, heads[: variant.tasks])
            # ONNX shape inference cannot type com.microsoft's MatMulNBits, so graph_cost counts
            # fp32 banks only; a compact bank does the same multiply-accumulates
            macs = count_macs(model)["total"] if variant.weights == "fp32" else None
            bank_costs[variant.name] = {"tasks": variant.tasks, "weights": variant.weights, "macs": macs,
                                        "weight_bytes": weight_bytes(model)}
            save_graph(model, paths[variant.name], probe=False)  # work files: external data past 2 GB
            del model
            gc.collect()
            log(f"bank sweep: composed {variant.name} in {time.perf_counter() - build:.1f} s")
        for runtime in available:
            references: dict[int, dict[str, np.ndarray]] = {}
            features = None
            for variant in variants:
                variant.session = _session(paths[variant.name], runtime, threads)
                variant.outputs = [o.name for o in variant.session.get_outputs()]
                outputs = variant.session.run(None, {"pixel_values": check_pixels})
                if variant.tasks == 0:
                    features = outputs[0]
                elif variant.weights == "fp32":
                    references[variant.tasks] = dict(zip(variant.outputs, outputs))
                checks.update(_check_variant(variant, runtime, outputs, features, graphs, compact, references,
                                             threads))
            log(f"bank sweep {runtime}: {len(variants)} sessions ready and checked")
            failed = [name for name, c in checks.items() if c.get("required") and not c["passed"]]
            if failed:
                raise VerificationError(f"bank sweep: composed banks do not match their parts ({', '.join(failed)})")
            for batch in settings.batches:
                x = {"pixel_values": pixels[batch]}
                calls = {v.name: (lambda s=v.session: s.run(None, x)) for v in variants}
                loop = time.perf_counter()
                samples = time_interleaved(calls, settings.plan)
                by_name = {}
                for variant in variants:
                    row = {"runtime": runtime, "batch": batch, "variant": variant.name, "tasks": variant.tasks,
                           "weights": variant.weights, **summarise(samples[variant.name], batch)}
                    by_name[variant.name] = row
                    rows.append(row)
                for row in by_name.values():
                    if row["variant"] != "backbone":
                        row["ratio_vs_backbone"] = row["p50_ms"] / by_name["backbone"]["p50_ms"]
                        row["paired_ratio_vs_backbone"] = paired_ratio(row, by_name["backbone"])
                log(f"bank sweep {runtime} batch {batch} ({len(samples['backbone'])} rounds, "
                    f"{time.perf_counter() - loop:.0f} s): p50 ms " + ", ".join(
                        f"{r['variant']} {r['p50_ms']:.1f}" for r in by_name.values()))
            for variant in variants:
                variant.session = None
            gc.collect()
    finally:
        for variant in variants:
            variant.session = None
        for path in paths.values():
            path.unlink(missing_ok=True)
        gc.collect()
    body = {
        "format": "transmiter-deploy/bank-sweep", "format_version": 1,
        "environment": _environment(threads, command), "seconds": time.perf_counter() - started,
        "peak_rss_mib": _peak_rss_mib(),
        "settings": {**asdict(replace(settings, compact={})), "compact": {k: list(v) for k, v in settings.compact.items()},
                     "feature_dim": graphs.feature_dim, "image_size": list(graphs.image_size), "threads": threads},
        "costs": {**costs, "banks": bank_costs}, "compact_heads": accuracy, "checks": checks,
        "rows": rows, "skipped": skipped,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / RESULTS_JSON, body)
    return out_dir / RESULTS_JSON


def _margins(logits: np.ndarray) -> np.ndarray:
    """Per row: the top logit minus the runner-up."""
    top = np.sort(logits, axis=1)[:, -2:]
    return top[:, 1] - top[:, 0]


def _check_variant(variant: _Variant, runtime: str, outputs: list[np.ndarray], features: np.ndarray | None,
                   graphs: BankGraphs, compact: dict, references: dict, threads: int) -> dict:
    """fp32 banks against the backbone then each head run separately (required: max abs <= the
    fp32 tolerance, top-1 100%); compact banks against the fp32 bank of the same N (reported)."""
    checks = {}
    if variant.tasks == 0:
        return checks
    named = dict(zip(variant.outputs, outputs))
    if variant.weights == "fp32":
        worst = None
        for task, head in graphs.heads[: variant.tasks]:
            parts = _session_from_proto(head, threads).run(None, {FEATURES: features})[0]
            result = compare_outputs(parts, named[f"logits_{task}"])
            if worst is None or result["max_abs"] > worst["max_abs"] or result["top1_agreement"] < worst["top1_agreement"]:
                worst = result
        checks[f"{runtime}_{variant.name}_vs_parts"] = {
            **worst, "required": True, "passed": worst["max_abs"] <= FP32_LOGIT_ATOL and worst["top1_agreement"] == 1.0,
            "criterion": f"every task: max_abs <= {FP32_LOGIT_ATOL}, top-1 agreement 100% (backbone, then the head, "
                         "each its own session)"}
    else:
        reference = references.get(variant.tasks)
        if reference is None:
            return checks
        results = [compare_outputs(reference[name], named[name]) for name in variant.outputs]
        margins = np.concatenate([_margins(reference[name]) for name in variant.outputs])
        flipped = np.concatenate([_margins(reference[name])[reference[name].argmax(1) != named[name].argmax(1)]
                                  for name in variant.outputs])
        checks[f"{runtime}_{variant.name}_vs_{_variant_name(variant.tasks, 'fp32')}"] = {
            "max_abs": max(r["max_abs"] for r in results),
            "max_abs_over_max_reference": max(r["max_abs_over_max_reference"] for r in results),
            "top1_agreement": min(r["top1_agreement"] for r in results), "samples": int(len(outputs[0])),
            "flipped": int(len(flipped)), "of": int(len(margins)),
            "flipped_max_fp32_margin": float(flipped.max()) if len(flipped) else None,
            "fp32_margin_median": float(np.median(margins)),
            "required": False, "passed": all(r["top1_agreement"] == 1.0 for r in results),
            "criterion": "every task: top-1 agreement 100% with the fp32 bank on the same images (reported)"}
    return checks


# ---- the report -----------------------------------------------------------------------------

def _rows(result: dict) -> dict[tuple[str, int], dict[str, dict]]:
    grouped: dict[tuple[str, int], dict[str, dict]] = {}
    for row in result["rows"]:
        grouped.setdefault((row["runtime"], row["batch"]), {})[row["variant"]] = row
    return grouped


def target_checks(result: dict) -> list[dict]:
    """The issue's targets: bank(16)/backbone <= 1.02 at batch 1 and 8 (ORT CPU, ViT-B-16), and
    MACs per added task <= 9.3 M at d = 768."""
    where, grouped, checks = RATIO_TARGET, _rows(result), []
    model = result["settings"]["model"]
    for batch in where["batches"]:
        label = (f"bank({where['tasks']}) / backbone, {where['runtime']}, {where['target']}, batch {batch}: "
                 f"<= {where['max_ratio']}")
        cell = grouped.get((where["runtime"], batch), {})
        fp32 = cell.get(f"bank{where['tasks']}")
        if model != where["target"] or fp32 is None:
            checks.append({"target": label, "met": None, "measured": "not measured in this run"})
            continue
        compact = [r for r in cell.values() if r["tasks"] == where["tasks"] and r["weights"] != "fp32"]
        also = "; ".join(f"{r['weights']} weights {r['ratio_vs_backbone']:.3f}" for r in compact)
        paired = fp32["paired_ratio_vs_backbone"]
        checks.append({"target": label, "met": fp32["ratio_vs_backbone"] <= where["max_ratio"],
                       "measured": f"fp32 heads {fp32['ratio_vs_backbone']:.3f} (per-round ratios: median "
                                   f"{paired['median']:.3f}, quartiles {paired['q25']:.3f} .. {paired['q75']:.3f})"
                                   + (f"; compact heads: {also}" if also else ""),
                       "met_compact": {r["weights"]: r["ratio_vs_backbone"] <= where["max_ratio"] for r in compact}})
    reference = result["costs"]["head_reference_d"]
    checks.append({"target": f"MACs per added task at d = {HEAD_MACS_TARGET['feature_dim']}, C = D = "
                             f"{result['settings']['width']}, K = {result['settings']['classes']}: "
                             f"<= {HEAD_MACS_TARGET['max_macs'] / 1e6:g} M",
                   "met": reference["macs"] <= HEAD_MACS_TARGET["max_macs"],
                   "measured": f"{reference['macs']:,} (synthetic head graph at d = {reference['feature_dim']}); "
                               f"{result['costs']['head']['macs']:,} at d = {result['costs']['head']['feature_dim']}"})
    return checks


def _verdict(met) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def bank_markdown(result: dict, plot_name: str | None) -> str:
    s, costs, env = result["settings"], result["costs"], result["environment"]
    versions = env["versions"]
    lines = [f"# Bank sweep: {s['model']}, {env['host_label']}", "",
             f"Measured by `{env['command'] or 'run_bank_sweep'}` ({result['seconds']:.0f} s"
             + (f", peak RSS {result['peak_rss_mib'] / 1024:.1f} GiB" if result.get("peak_rss_mib") else "")
             + "); rerun it to refresh this folder (`--report-only` rewrites this file from bank.json).", "",
             f"- Date: {env['date']}; CPU: {env['cpu']} ({env['cpu_count']} logical cores); GPU: {env['gpu'] or 'none'}",
             f"- ONNX Runtime intra-op threads {s['threads']} (inter-op 1, sequential, no spinning); versions: "
             + ", ".join(f"{n} {versions[n]}" for n in ("transmiter-deploy", "torch", "open_clip_torch", "onnx",
                                                          "onnxruntime-gpu") if n in versions),
             f"- {s['model']} with random weights (init seed {s['seed']}), d = {s['feature_dim']}, input "
             f"{s['image_size'][0]} px; N synthetic folded TransMiter heads, C = D = {s['width']}, K = {s['classes']} "
             "per task, random MLP weights, task i from seed + i; banks composed by `compose_bank` as `transmiter "
             "export` composes them.",
             "- The backbone alone (pixels -> L2-normalised features) and every bank are timed in one interleaved "
             "loop per batch (shuffled order each round); ratios are of medians from that loop, per-round ratios "
             "in brackets (median, quartiles).", ""]
    lines += ["## Targets", "", "| target | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {c['target']} | {c['measured']} | {_verdict(c['met'])}"
              + ("".join(f"; {k}: {_verdict(v)}" for k, v in c.get("met_compact", {}).items())) + " |"
              for c in target_checks(result)]
    lines += ["", "## Latency", ""]
    for (runtime, batch), cell in _rows(result).items():
        backbone = cell["backbone"]
        lines += [f"### {runtime}, batch {batch} ({backbone['rounds']} rounds)", "",
                  "| N | head weights | p50 ms | p90 ms | ratio vs backbone | per-round ratio (q25 .. q75) | ms per task |",
                  "| ---: | --- | ---: | ---: | ---: | --- | ---: |",
                  f"| 0 (backbone) | - | {backbone['p50_ms']:.2f} | {backbone['p90_ms']:.2f} | 1 | - | - |"]
        for row in sorted((r for r in cell.values() if r["tasks"]), key=lambda r: (r["weights"] != "fp32", r["weights"], r["tasks"])):
            p = row["paired_ratio_vs_backbone"]
            lines.append(f"| {row['tasks']} | {row['weights']} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | "
                         f"{row['ratio_vs_backbone']:.4f} | {p['median']:.4f} ({p['q25']:.4f} .. {p['q75']:.4f}) | "
                         f"{(row['p50_ms'] - backbone['p50_ms']) / row['tasks']:.3f} |")
        lines.append("")
    if result.get("skipped"):
        lines += ["Not timed: " + "; ".join(f"{x['runtime']} ({x['reason']})" for x in result["skipped"]) + ".", ""]
    head, ref = costs["head"], costs["head_reference_d"]
    lines += ["## Cost from the graphs", "",
              f"MACs at batch 1 (`count_macs`: MatMul, Gemm, Conv). Per head: {costs['head_macs_formula']}.", "",
              "| graph | MACs | weight bytes |", "| --- | ---: | ---: |",
              f"| backbone ({s['model']}) | {costs['backbone']['macs']['total']:,} | {costs['backbone']['weight_bytes']:,} |",
              f"| one head, d = {head['feature_dim']} (fp32) | {head['macs']:,} | {head['weight_bytes']:,} |",
              f"| one head, d = {ref['feature_dim']} (fp32, synthetic) | {ref['macs']:,} | {ref['weight_bytes']:,} |"]
    for name, c in costs["compact_heads"].items():
        lines.append(f"| one head, d = {head['feature_dim']}, {name} ({c['description']}) | {head['macs']:,} | "
                     f"{c['weight_bytes']:,} |")
    lines += ["", "| bank | MACs | MACs - backbone - N x head | weight bytes | bytes - backbone - N x head |",
              "| --- | ---: | ---: | ---: | ---: |"]
    backbone_macs, backbone_bytes = costs["backbone"]["macs"]["total"], costs["backbone"]["weight_bytes"]
    for name, bank in costs["banks"].items():
        per = head["weight_bytes"] if bank["weights"] == "fp32" else costs["compact_heads"][bank["weights"]]["weight_bytes"]
        macs = (f"{bank['macs']:,} | {bank['macs'] - backbone_macs - bank['tasks'] * head['macs']:,}"
                if bank["macs"] is not None else "as the fp32 bank (MatMulNBits: not costed by shape inference) | -")
        lines.append(f"| {name} | {macs} | {bank['weight_bytes']:,} | "
                     f"{bank['weight_bytes'] - backbone_bytes - bank['tasks'] * per:,} |")
    lines.append("")
    if result.get("compact_heads"):
        batches = sorted({b for c in result["compact_heads"].values() for b in c["head_alone_p50_ms"]}, key=int)
        lines += ["## Compact heads: ONNX Runtime's weight-only quantiser", "",
                  "`MatMulNBitsQuantizer` on the two MLP MatMuls of each head (the exported Gemms rewritten as "
                  "MatMul + Add first); push, pull and the statistics nodes (`/stats/`, `/normalise/`, "
                  "`/destandardise/`) stay fp32 (checked node for node). Accuracy: the first "
                  f"{next(iter(result['compact_heads'].values()))['tasks']} heads against their fp32 graphs on "
                  f"{HEAD_CHECK_ROWS} L2-normalised random feature rows. Head alone: p50 ms, interleaved with the "
                  "fp32 head, ONNX Runtime CPU.", "",
                  "A row's top-1 can only flip when its fp32 top-two margin is within about twice the max abs; "
                  "`flipped: largest margin` gives the largest fp32 margin among flipped rows, `near ties` the "
                  "share of rows whose fp32 margin is below the max abs.", "",
                  "| setting | what | weight bytes per head | max abs | max abs / max ref | top-1 agreement "
                  "| flipped: largest margin | near ties | "
                  + " | ".join(f"head alone b{b}: fp32 / compact ms" for b in batches) + " |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in batches) + " |"]
        for name, c in result["compact_heads"].items():
            timing = " | ".join(f"{c['head_alone_p50_ms'][b]['fp32']:.3f} / {c['head_alone_p50_ms'][b][name]:.3f}"
                                for b in batches)
            lines.append(f"| {name} | {c['description']} | {c['weight_bytes']:,} | {c['max_abs']:.3g} | "
                         f"{c['max_abs_over_max_reference']:.2e} | {c['top1_agreement']:.2%} | "
                         f"{'-' if c['flipped_max_fp32_margin'] is None else format(c['flipped_max_fp32_margin'], '.3g')} | "
                         f"{c['rows_with_fp32_margin_below_max_abs']:.2%} | {timing} |")
        lines.append("")
    lines += ["## Checks", "",
              "fp32 banks against the backbone then each head in its own session; compact banks against the fp32 "
              "bank of the same N, on the sweep's noise images (every task; top-1 agreement is the worst task's; "
              "flipped: rows of all tasks whose top-1 changed, with the largest fp32 top-two margin among them and "
              "the median margin of all rows).", "",
              "| check | max abs | top-1 agreement | samples | flipped (largest fp32 margin; median margin) | result |",
              "| --- | ---: | ---: | ---: | --- | --- |"]
    for name, c in result["checks"].items():
        verdict = ("pass" if c["passed"] else "FAIL") + ("" if c["required"] else " (reported)")
        flips = "-" if "flipped" not in c else (
            f"{c['flipped']} of {c['of']}" + (f" ({c['flipped_max_fp32_margin']:.3g}; {c['fp32_margin_median']:.3g})"
                                              if c["flipped"] else f" (-; {c['fp32_margin_median']:.3g})"))
        lines.append(f"| {name} | {c['max_abs']:.3g} | {c['top1_agreement']:.2%} | {c.get('samples', '')} | {flips} | "
                     f"{verdict} |")
    lines.append("")
    if plot_name:
        lines += ["## Plot", "", f"![latency against N]({plot_name})", ""]
    return "\n".join(lines)


def plot_bank(result: dict, path: Path) -> Path:
    """p50 latency against N, one panel per runtime and batch, one line per kind of head weights;
    the backbone alone as a horizontal line and the 1.02 x backbone target dotted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DependencyError("plots need matplotlib: pip install 'transmiter-deploy[bench]' (or pass --no-plots)") from exc
    grouped = _rows(result)
    figure, axes = plt.subplots(1, len(grouped), figsize=(5.2 * len(grouped), 4.0), squeeze=False)
    for axis, ((runtime, batch), cell) in zip(axes[0], grouped.items()):
        backbone = cell["backbone"]["p50_ms"]
        axis.axhline(backbone, color="black", linestyle="--", linewidth=1.5, label="backbone alone")
        axis.axhline(backbone * RATIO_TARGET["max_ratio"], color="red", linestyle=":", label="1.02 x backbone")
        for weights in dict.fromkeys(r["weights"] for r in cell.values() if r["tasks"]):
            points = sorted((r["tasks"], r["p50_ms"]) for r in cell.values() if r["tasks"] and r["weights"] == weights)
            axis.plot([n for n, _ in points], [ms for _, ms in points], marker="o",
                      label=f"bank, {weights} heads" if weights == "fp32" else f"bank, {weights} heads (compact)")
        tasks = sorted({r["tasks"] for r in cell.values() if r["tasks"]})
        axis.set_xscale("log", base=2)
        axis.set_xticks(tasks, [str(n) for n in tasks])
        axis.set(xlabel="tasks N", ylabel="p50 latency (ms)", title=f"{result['settings']['model']}, {runtime}, batch {batch}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    staging = path.with_name(f".{path.stem}.partial.png")
    figure.savefig(staging, dpi=110, bbox_inches="tight")
    plt.close(figure)
    os.replace(staging, path)
    return path


def write_bank_report(out_dir: Path, plots: bool = True) -> Path:
    """RESULTS.md (and the plot) from ``bank.json`` in ``out_dir``."""
    out_dir = Path(out_dir)
    source = out_dir / RESULTS_JSON
    if not source.is_file():
        raise InputError(f"no bank sweep results in {out_dir}: run transmiter bench --bank-sweep first")
    result = json.loads(source.read_text(encoding="utf-8"))
    plot_name = plot_bank(result, out_dir / PLOT).name if plots else None
    path = out_dir / "RESULTS.md"
    staging = path.with_name(".RESULTS.md.partial")
    staging.write_text(bank_markdown(result, plot_name), encoding="utf-8")
    os.replace(staging, path)
    return path


def default_out(model: str) -> Path:
    from .suite import host_label

    return Path("benchmarks") / "results" / (f"{host_label()}-bank" if model == RATIO_TARGET["target"]
                                             else f"{host_label()}-bank-{slug(model)}")
