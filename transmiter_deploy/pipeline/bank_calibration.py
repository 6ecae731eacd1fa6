"""The calibrated precisions (int8) of a bank export, as steps (deploy/bank_int8.py does the work).

Steps, for a calibrated precision ``<p>``:

- ``backbone-<p>-quantise``: the backbone quantised on a seeded sample across the calibrating
  tasks' training images (``export.calibration.tasks``, default every task; or
  ``export.calibration.data``), into ``backbone-<p>/``. Keyed by the backbone, the sample's
  settings and the calibrating tasks' training splits (their content keys), so adding a task
  re-quantises only when that task calibrates.
- ``<task>.gate-<p>-keep<n>``: the task's gate with ``n`` of the backbone's most sensitive
  quantised nodes kept in fp32, into ``tasks/<task>/gates/<p>-keep<n>.json``. Keyed by the
  candidate graph's sha256, the task's head and its gate images: a task added later is gated
  alone, the others' gates are read back.
- ``backbone-<p>-ranking``: the quantised nodes ranked by sensitivity, only when a gate fails.
- ``backbone-<p>``: the candidate that passed every gate added to ``backbone/``.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import onnx

from ..artifacts import read_json, write_json
from ..deploy import bank_int8, qdq_fallback
from ..deploy.export_format import MANIFEST
from ..deploy.gate import GateFailed
from ..runtimes.base import GraphFile, GraphInMemory
from ..runtimes.registry import Precision
from .deployment_steps import drop_unasked_calibrated, gate_images
from .export_run import ExportRun, key_external_data
from .report import ExportOutcome
from .steps import tree_sha256

def drop_unasked(run: ExportRun, backbone_dir: Path) -> None:
    """Calibrated backbone graphs an earlier run added that this recipe no longer asks for leave
    the backbone export ``backbone_dir`` (and so the bank)."""
    from ..deploy.bank import BACKBONE_FORMAT, FORMAT_VERSION

    drop_unasked_calibrated(run, backbone_dir, "backbone-{}", (BACKBONE_FORMAT, FORMAT_VERSION))


class BankCalibration:
    """One calibrated precision of a bank: quantise, gate the candidates task by task, add the
    one that passes every gate to the backbone export (:meth:`run`)."""

    def __init__(self, run: ExportRun, task_runs: list[ExportRun], backbone: tuple[Path, str],
                 heads: dict[str, tuple[Path, str]], target: Precision, threshold: int) -> None:
        """``backbone``: the backbone export's directory and step key; ``heads``: per task, its
        head graph (fp32) and its head export's step key."""
        self.run, self.task_runs, self.target, self.threshold = run, task_runs, target, threshold
        (self.backbone_dir, self.backbone_key), self.heads = backbone, heads
        self.settings = run.recipe.export.calibration
        self.where = self.backbone_dir.with_name(f"{self.backbone_dir.name}-{target.name}")
        self.ranking_file = self.backbone_dir.with_name(f"{self.backbone_dir.name}-{target.name}-ranking.json")
        # each task's gate images and fp32 logits on them, computed once, when its first gate runs
        self.gate_sets: dict[str, tuple] = {}
        self.sample = None  # the calibration sample, drawn once, when a step needs it

    # ---- quantising ----------------------------------------------------------------------------

    def calibrating(self) -> list[ExportRun]:
        return [t for t in self.task_runs if self.settings.tasks is None or t.task.name in self.settings.tasks]

    def calibration(self):
        """The seeded sample (deploy/calibration.py): of ``export.calibration.data``, or across the
        calibrating tasks' training images less the images each task holds out for its gate."""
        from ..deploy.calibration import CalibrationSource, held_out_count, sample_across

        if self.sample is None:
            settings = self.settings
            sources = ([CalibrationSource(settings.data)] if settings.data is not None else
                       [CalibrationSource(t.splits["train"], t.task.name,
                                          exclude=0 if "test" in t.splits else held_out_count(t.splits["train"]))
                        for t in self.calibrating()])
            self.sample = sample_across(self.run.models["target"], sources, settings.images, settings.minimum,
                                        settings.seed)
        return self.sample

    def quantise(self) -> str:
        from ..deploy.bank import read_backbone

        def work() -> None:
            sample = self.calibration()
            bank_int8.quantise_backbone(read_backbone(self.backbone_dir), self.where, self.target,
                                        sample.pixels.numpy(), sample.record, self.threshold, self.run.log)

        settings = self.settings
        inputs = {"backbone": self.backbone_key, "precision": self.target.name,
                  # what decides the sample: the gate's criteria do not, and the tasks are in "sources"
                  "settings": {k: v for k, v in asdict(settings).items() if k not in ("agreement", "fallback", "tasks")},
                  "sources": tree_sha256(settings.data) if settings.data is not None else
                  [[t.task.name, t.split_keys["train"], "test" in t.splits] for t in self.calibrating()]}
        key_external_data(inputs, self.threshold)
        return self.run.steps.run(f"backbone-{self.target.name}-quantise", inputs, [self.where / MANIFEST], work)

    def ranked(self, quantise_key: str, path) -> list[str]:
        """The quantised nodes, most sensitive first (a step: ranked once per quantised graph)."""
        def work() -> None:
            ranking = bank_int8.rank_nodes(self.backbone_dir / "backbone.onnx", onnx.load(path), self.target,
                                           self.calibration().pixels.numpy())
            write_json(self.ranking_file, {"criterion": FALLBACK_CRITERION, "ranking": ranking})

        self.run.steps.run(f"backbone-{self.target.name}-ranking", {"quantised": quantise_key}, [self.ranking_file], work)
        return [name for name, _ in read_json(self.ranking_file, "sensitivity ranking")["ranking"]]

    # ---- gating --------------------------------------------------------------------------------

    def gate(self, task: ExportRun, size: int, graph: Callable, sha256: str) -> dict:
        """``task``'s gate on the candidate ``graph()`` (sha256 ``sha256``, ``size`` nodes in fp32)."""
        record_file = task.root / "gates" / f"{self.target.name}-keep{size}.json"

        def work() -> None:
            head = self.heads[task.task.name][0]
            if task.task.name not in self.gate_sets:
                images = gate_images(task)[0]
                self.gate_sets[task.task.name] = images, bank_int8.reference_logits(
                    self.backbone_dir / "backbone.onnx", head, images)
            images, reference = self.gate_sets[task.task.name]
            record = bank_int8.gate_task(reference, graph(), head, images, self.target)
            record_file.parent.mkdir(parents=True, exist_ok=True)
            write_json(record_file, {"task": task.task.name, **record})

        task.steps.run(f"gate-{self.target.name}-keep{size}", {
            "backbone": self.backbone_key, "candidate": sha256, "head": self.heads[task.task.name][1],
            "images": task.split_keys.get("test") or [task.split_keys["train"], self.settings.seed],
            "agreement": self.settings.agreement, "base_classes": task.task.data.base_classes}, [record_file], work)
        return read_json(record_file, f"{self.target.name} gate of task {task.task.name}")

    def gate_all(self, size: int, graph: Callable, sha256: str) -> dict[str, dict]:
        """Every task's gate on one candidate, in recipe order, up to the first that fails."""
        records = {}
        for task in self.task_runs:
            records[task.task.name] = self.gate(task, size, graph, sha256)
            if not records[task.task.name]["passed"]:
                break
        return records

    # ---- the whole precision -------------------------------------------------------------------

    def run_steps(self, outcome: ExportOutcome) -> str:
        """Quantise, gate the candidates (0, 1, 2, 4, ... nodes in fp32) until every task passes,
        add that candidate to the backbone export; each task's gate goes into ``outcome``. Returns
        the adding step's key; raises GateFailed (the bank left as it was) when none passes."""
        target, quantise_key = self.target, self.quantise()
        quantised = bank_int8.read_quantised(self.where)
        path, count = self.where / quantised["graph"], len(quantised["quantised_nodes"])
        sizes = [0] + (qdq_fallback.tries(count) if self.settings.fallback and count and bank_int8.fallback_possible(path)
                       else [])
        tries, first, kept, model, source = [], {}, [], None, None
        for size in sizes:
            if size == 0:
                graph, sha256 = (lambda: GraphFile(path, target.name)), quantised["files"][path.name]["sha256"]
            else:
                if source is None:
                    ranking, source = self.ranked(quantise_key, path), onnx.load(path)
                kept = ranking[:size]
                model = bank_int8.candidate(source, kept, target)
                data = model.SerializeToString()
                graph = lambda data=data, size=size: GraphInMemory(data, target.name, f"backbone, {size} node(s) in fp32")  # noqa: E731
                sha256 = hashlib.sha256(data).hexdigest()
            records = self.gate_all(size, graph, sha256)
            first = first or records
            failed = next((name for name, record in records.items() if not record["passed"]), None)
            tries.append({"kept": size, "passed": failed is None, "failed": failed,
                          "top1_agreement": min(record["top1_agreement"] for record in records.values())})
            self.run.log(f"{target.name} gates with {size} of {count} quantised backbone node(s) in fp32: "
                         + ("pass" if failed is None else f"fail (task {failed})"))
            if failed is None:
                break
        self.record(outcome, records, first, tries, kept, count)
        if tries[-1]["failed"] is not None:
            record = records[tries[-1]["failed"]]
            missed = "; ".join(c["criterion"] for c in record["criteria"] if not c["passed"]) or "non-finite outputs"
            raise GateFailed(f"{target.name} accuracy gate failed for task {record['task']} on {record['images']} "
                             f"({missed}) with at most {sizes[-1]} of {count} quantised backbone node(s) in fp32; "
                             f"the bank in {self.run.onnx_dir} is unchanged", record)
        return self.add(quantise_key, quantised, model if kept else path, kept, records)

    def record(self, outcome: ExportOutcome, records: dict[str, dict], first: dict[str, dict], tries: list[dict],
               kept: list[str], count: int) -> None:
        """Each task's gate on the last candidate into ``outcome``; the tasks whose gates failed on
        the way carry the fallback's record, and every task its first try where there were several."""
        passed = tries[-1]["failed"] is None
        fallback = {"criterion": FALLBACK_CRITERION, "quantised_nodes": count, "passed": passed,
                    "kept": kept if passed else [], "tries": tries[1:]}
        if len(tries) == 1 and not passed:
            fallback["reason"] = ("not tried: the recipe turns it off (export.calibration.fallback)"
                                  if not self.settings.fallback else
                                  "not tried: the graph is too large to rewrite in memory" if count else
                                  "not tried: the graph has no quantised node")
        failed_once = {attempt["failed"] for attempt in tries if attempt["failed"]}
        for name, record in records.items():
            if name in first and len(tries) > 1:
                record["first_try"] = {key: first[name][key] for key in ("top1_agreement", "criteria", "passed")}
            if name in failed_once:  # the tasks whose gates made the backbone keep nodes in fp32
                record["fallback"] = fallback
            outcome.gates.append(record)

    def add(self, quantise_key: str, quantised: dict, graph, kept: list[str], records: dict[str, dict]) -> str:
        """The passing candidate added to the backbone export (a step, keyed by what it is)."""
        def work() -> None:
            bank_int8.add_to_backbone(self.backbone_dir, self.target, graph, quantised["calibration"], kept,
                                      {name: record["passed"] for name, record in records.items()}, self.threshold,
                                      self.run.log)

        inputs = {"quantised": quantise_key, "kept": kept}
        key_external_data(inputs, self.threshold)
        return self.run.steps.run(f"backbone-{self.target.name}", inputs, [
            self.backbone_dir / MANIFEST, self.backbone_dir / self.target.graph_name("backbone")], work)


FALLBACK_CRITERION = ("mean |features - fp32 features| on the calibration images, lowered by the node alone in fp32 "
                      "(the features every head reads)")
