"""Old export against new, per task and image by image, and what each costs (docs/upgrade.md).

The predictions compared are the exported adapter's task logits on the task's test images, from
each export's own caches, head and adapter (what the accuracy table of each report was made from):
the same images under both, which the caches' dataset fingerprints prove. The statistics are
method/comparison.py's. Cost: MACs per image counted from each fp32 graph, graph bytes per
precision from the manifests, and latency of the two fp32 graphs timed in one interleaved loop
(benchmark/timing.py) on the same runner kind, so that the ratio is fair on a noisy machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import MANIFESTS
from ..errors import IntegrityError
from ..method.comparison import VerdictRules, compare_labelled, compare_unlabelled, num_base_classes
from ..pipeline.recipe import TaskRecipe
from .settings import LatencySettings

COST_RUNTIME = "onnxruntime-cpu"


def exported_test_logits(root: Path, task: TaskRecipe) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The exported adapter's task logits on the task's test images, their labels (-1 where
    unlabelled) and the dataset fingerprint; None where the export has no test images."""
    import torch

    from ..features.adapter_artifact import load_adapter
    from ..features.cache import load_cache, zero_shot_logits
    from ..features.heads import load_head

    where = root / "caches" / "target-test"
    if not (where / MANIFESTS["cache"]).is_file():
        return None
    cache = load_cache(where)
    stage = "plus" if task.plus.enabled and (root / "adapters" / "plus" / MANIFESTS["adapter"]).is_file() else "transferred"
    adapter = load_adapter(root / "adapters" / stage).adapter
    with torch.no_grad():
        logits = adapter.task_logits(zero_shot_logits(cache, load_head(root / "heads" / "target")))
    return logits.numpy(), cache.labels.numpy(), cache.fingerprint


def judge_task(old_root: Path, new_root: Path, task: TaskRecipe, rules: VerdictRules) -> dict[str, Any]:
    """One task's comparison (method/comparison.py's record) with its name; "no test images" where
    either export has none."""
    old, new = exported_test_logits(old_root, task), exported_test_logits(new_root, task)
    if old is None or new is None:
        return {"task": task.name, "labelled": False, "images": 0, "verdict": "cannot tell",
                "why": "no test images (data.test): nothing to judge the new target on"}
    if old[2] != new[2]:
        raise IntegrityError(f"task '{task.name}': the old and new exports' test caches hold different images "
                             "(dataset fingerprints differ)")
    (before, labels, _), (after, _, _) = old, new
    labelled = labels >= 0
    if not labelled.any():
        return {"task": task.name, **compare_unlabelled(before, after)}
    num_base = task.data.base_classes or num_base_classes(before.shape[1])
    result = compare_labelled(before[labelled], after[labelled], labels[labelled], num_base, rules)
    if not labelled.all():
        result["why"] += f" ({int((~labelled).sum())} unlabelled test images left out)"
    return {"task": task.name, **result}


def graph_bytes(info) -> dict[str, int]:
    """Bytes on disk of each precision's pixels graph (with its external data), from the manifest."""
    files = info.manifest["files"]
    sizes = {}
    for precision, graph in info.graphs.items():
        entry = files.get(graph, {})
        names = [graph, *entry.get("external_data", [])]
        sizes[precision] = int(sum(files.get(name, {}).get("bytes") or (info.directory / name).stat().st_size
                                   for name in names))
    return sizes


def cost(old_export: Path, new_export: Path, latency: LatencySettings) -> dict[str, Any]:
    """MACs per image, graph bytes per precision, and interleaved fp32 latency, old and new."""
    from ..deploy.graph_cost import count_macs_file
    from ..features.models import ModelIdentity
    from ..runtimes.registry import REFERENCE_PRECISION
    from ..serving.deployment import read_export

    infos = {"old": read_export(old_export), "new": read_export(new_export)}
    record: dict[str, Any] = {
        side: {"macs_per_image": int(count_macs_file(info.graph(REFERENCE_PRECISION))["total"]),
               "graph_bytes": graph_bytes(info), "image_size": list(info.image_size),
               "target": ModelIdentity.from_dict(info.manifest["target_model"], str(info.directory)).describe()}
        for side, info in infos.items()}
    record["latency"] = _latency(infos, latency) if latency.enabled() else {"skipped": "not asked for"}
    return record


def _latency(infos: dict[str, Any], settings: LatencySettings) -> dict[str, Any]:
    """Both fp32 graphs on one runner kind, one call of each per round in shuffled order."""
    from ..benchmark.timing import TimingPlan, summarise, time_interleaved
    from ..runtimes.base import RunSettings
    from ..runtimes.registry import REFERENCE_PRECISION, runtime
    from ..serving.deployment import Deployment

    rows, deployments = [], {}
    try:
        for side, info in infos.items():
            deployments[side] = Deployment.open(info.directory, COST_RUNTIME, REFERENCE_PRECISION,
                                                RunSettings(threads=settings.threads), verify=False)
        rng = np.random.default_rng(0)
        for batch in settings.batches:
            pixels = {side: rng.standard_normal((batch, 3, *d.info.image_size)).astype(np.float32)
                      for side, d in deployments.items()}
            calls = {side: (lambda d=d, x=pixels[side]: d.runner.infer_outputs(x)) for side, d in deployments.items()}
            samples = time_interleaved(calls, TimingPlan(warmup=1, min_rounds=settings.min_rounds,
                                                         max_rounds=200, budget_s=settings.budget_s))
            summary = {side: summarise(values, batch) for side, values in samples.items()}
            ratios = np.asarray(samples["new"]) / np.asarray(samples["old"])  # paired by round
            rows.append({"batch": batch, **{side: {k: v for k, v in s.items() if k != "samples_ms"}
                                            for side, s in summary.items()},
                         "new_over_old_p50": float(summary["new"]["p50_ms"] / summary["old"]["p50_ms"]),
                         "new_over_old_paired_median": float(np.median(ratios))})
    finally:
        for deployment in deployments.values():
            deployment.close()
    return {"runtime": runtime(COST_RUNTIME).name, "kind": "interleaved (old and new alternate in one loop)",
            "rows": rows}
