"""The bank sweep (``transmiter bench --bank-sweep``) on the tiny demo target: files, real
composition against the parts, MACs that add up."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from transmiter_deploy.benchmark import bank, bank_checks, bank_compact, bank_report
from transmiter_deploy.benchmark.timing import TimingPlan
from transmiter_deploy.cli import main
from transmiter_deploy.deploy.bank import FEATURES, compose_bank
from transmiter_deploy.deploy.graph_cost import count_macs
from transmiter_deploy.errors import DependencyError, InputError
from transmiter_deploy.runtimes import registry
from transmiter_deploy.runtimes.onnx_files import graph_structure
from transmiter_deploy.runtimes.onnxruntime import OnnxRuntimeRunner, ort_session

SETTINGS = bank.BankSettings("TM-Demo-Target", tasks=(1, 2), batches=(1, 3), width=64, classes=8,
                             compact={"q8i": (2,)}, plan=TimingPlan(warmup=0, min_rounds=2, max_rounds=2, budget_s=0.01))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank-sweep")
    path = bank.run_bank_sweep(SETTINGS, root / "out", root / "work", threads=1, runtimes=("onnxruntime-cpu",),
                               command="test", log=lambda _: None)
    return root, json.loads(path.read_text(encoding="utf-8"))


def test_sweep_writes_its_files_and_times_every_variant_in_one_loop(sweep):
    root, result = sweep
    report = bank_report.write_bank_report(root / "out", plots=True)
    for name in (bank_report.RESULTS_JSON, "RESULTS.md", bank_report.PLOT):
        assert (root / "out" / name).stat().st_size > 0
    text = report.read_text(encoding="utf-8")
    assert "Measured by `test`" in text and "| 2 | q8i |" in text
    variants = {"backbone", "bank1", "bank2", "bank2@q8i"}
    for batch in SETTINGS.batches:
        rows = {r["variant"]: r for r in result["rows"] if r["batch"] == batch}
        assert set(rows) == variants
        assert {r["rounds"] for r in rows.values()} == {2}  # one loop: every variant each round
        assert rows["bank2"]["ratio_vs_backbone"] == pytest.approx(rows["bank2"]["p50_ms"] / rows["backbone"]["p50_ms"])
    required = {name: c for name, c in result["checks"].items() if c["required"]}
    assert set(required) == {"onnxruntime-cpu_bank1_vs_parts", "onnxruntime-cpu_bank2_vs_parts"}
    assert all(c["passed"] for c in required.values())
    compact = result["checks"]["onnxruntime-cpu_bank2@q8i_vs_bank2"]
    assert np.isfinite(compact["max_abs"]) and 0 <= compact["top1_agreement"] <= 1
    targets = bank_report.target_checks(result)
    assert [t["met"] for t in targets[:2]] == [None, None]  # ViT-B-16's targets: not this model
    assert targets[2]["met"] is True  # the d = 768 head graph of C = D = 64 is far below 9.3 M MACs


def test_bank_macs_and_weights_are_the_backbone_plus_n_heads(sweep):
    _, result = sweep
    costs = result["costs"]
    backbone, head = costs["backbone"], costs["head"]
    d, width, classes = result["settings"]["feature_dim"], SETTINGS.width, SETTINGS.classes
    assert head["macs"] == d * width + d + 2 * 4 * width * width + width * classes
    reference = costs["head_reference_d"]
    assert reference["macs"] == 768 * width + 768 + 2 * 4 * width * width + width * classes
    for n in SETTINGS.tasks:
        fp32 = costs["banks"][f"bank{n}"]
        assert fp32["macs"] == backbone["macs"]["total"] + n * head["macs"]
        assert fp32["weight_bytes"] == backbone["weight_bytes"] + n * head["weight_bytes"]
    compact = costs["banks"]["bank2@q8i"]
    per_head = costs["compact_heads"]["q8i"]["weight_bytes"]
    assert compact["weight_bytes"] == backbone["weight_bytes"] + 2 * per_head
    assert per_head < head["weight_bytes"] / 2  # int8 MLP weights


def test_composed_bank_equals_the_heads_run_separately(sweep):
    root, _ = sweep
    graphs = bank.build_graphs(SETTINGS, root / "work", log=lambda _: None)  # cached by the sweep
    assert len(graphs.heads) == 2
    composed = compose_bank(graphs.backbone, graphs.heads)
    assert count_macs(composed)["total"] == count_macs(graphs.backbone)["total"] + sum(
        count_macs(head)["total"] for _, head in graphs.heads)
    paths = {}
    for name, model in [("bank", composed), ("backbone", graphs.backbone), *graphs.heads]:
        paths[name] = root / f"{name}.onnx"
        onnx.save(model, paths[name])
    pixels = np.random.default_rng(1).standard_normal((5, 3, *graphs.image_size), dtype=np.float32)
    session = ort_session(paths["bank"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"pixel_values": pixels})))
    assert list(outputs) == ["logits_task00", "logits_task01"]
    features = ort_session(paths["backbone"]).run(None, {"pixel_values": pixels})[0]
    assert np.allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    logits = [ort_session(paths[name]).run(None, {FEATURES: features})[0] for name, _ in graphs.heads]
    assert logits[0].shape == (5, SETTINGS.classes)
    assert not np.allclose(logits[0], logits[1])  # each task its own seeded head
    for (name, _), separate in zip(graphs.heads, logits):
        np.testing.assert_allclose(outputs[f"logits_{name}"], separate, rtol=0, atol=1e-5)


def test_compact_heads_keep_statistics_fp32_and_quantise_only_the_mlp(sweep):
    root, _ = sweep
    graphs = bank.build_graphs(SETTINGS, root / "work", log=lambda _: None)
    head = graphs.heads[0][1]
    rewritten = bank_compact.mlp_gemms_to_matmuls(head)
    features = np.random.default_rng(2).standard_normal((4, graphs.feature_dim)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    exact = []
    for model in (head, rewritten):
        with bank_checks.head_runner(model, 1) as runner:
            exact.append(runner.infer(features))
    np.testing.assert_allclose(exact[0], exact[1], rtol=0, atol=1e-5)
    quantised = bank_compact.compact_head(head, bank_compact.COMPACT["q8"])
    kinds = {n.name: n.op_type for n in quantised.graph.node}
    assert sorted(name for name, op in kinds.items() if op == "MatMulNBits") == [
        "/blocks.0/fc1/MatMul_Q8", "/blocks.0/fc2/MatMul_Q8"]
    assert kinds["/MatMul"] == kinds["/MatMul_1"] == kinds["/stats/MatMul"] == "MatMul"  # push, pull, mean: fp32


def test_task_and_compact_options_are_checked(sweep, tmp_path):
    assert bank.parse_tasks("8,1,2,2") == (1, 2, 8)
    assert bank.parse_compact(("q8i", "q8@16", "q4@2,3"), (1, 2, 16)) == {"q8i": (1, 2, 16), "q8": (16,), "q4": (2,)}
    assert bank.parse_compact(("q8@16",), (1, 2), strict=False) == {}
    for bad in ("", "0,1", "a"):
        with pytest.raises(InputError):
            bank.parse_tasks(bad)
    with pytest.raises(InputError, match="unknown compact"):
        bank.parse_compact(("q3",), (1,))
    with pytest.raises(InputError, match="none of"):
        bank.parse_compact(("q8@16",), (1, 2))
    root, _ = sweep
    # the CLI's --report-only path rewrites RESULTS.md from bank.json without timing anything
    assert main(["bench", "--bank-sweep", "1,2", "--report-only", "--no-plots", "--out", str(root / "out")]) == 0
    assert main(["bench", "--bank-sweep", "1,2", "--report-only", "--out", str(tmp_path / "empty")]) != 0


def test_the_sweep_times_the_registrys_graph_runtimes():
    # every runtime that runs graphs (ONNX files or engines made from them), none of the modules'
    for name, entry in registry.RUNTIMES.items():
        assert (name in bank.default_runtimes()) == (entry.loads in ("onnx", "engine")), name
    assert {"onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"} <= set(bank.default_runtimes())
    available, skipped = bank.choose_runtimes(("pytorch-cpu", "onnxruntime-cpu"), log=lambda _: None)
    assert available == ["onnxruntime-cpu"]
    assert skipped == [{"runtime": "pytorch-cpu", "reason": "the bank sweep times graphs; pytorch-cpu runs torch modules"}]
    with pytest.raises(DependencyError, match="no graph runtime"):
        bank.choose_runtimes(("pytorch-cpu",), log=lambda _: None)
    with pytest.raises(InputError, match="unknown runtime"):
        bank.choose_runtimes(("no-such-runtime",), log=lambda _: None)


class NoContribOps(OnnxRuntimeRunner):
    """ONNX Runtime's CPU runner refusing graphs with MatMulNBits, as a graph runtime without
    ONNX Runtime's contrib operators (TensorRT, OpenVINO) refuses a compact bank."""

    def load_impl(self, graph):
        if any(node.op_type == "MatMulNBits" for node in graph_structure(graph.path).graph.node):
            raise InputError(f"{self.graph}: no kernel for com.microsoft MatMulNBits here")
        return super().load_impl(graph)


def test_a_runtime_that_cannot_load_compact_banks_times_the_fp32_ones_and_says_why(sweep, monkeypatch):
    root, _ = sweep
    monkeypatch.setitem(registry.RUNTIMES, "no-contrib-cpu", registry.Runtime(
        "no-contrib-cpu", "onnxruntime", f"{__name__}:NoContribOps", "onnx", "cpu", (("provider", "cpu"),)))
    out = root / "out-no-contrib"
    path = bank.run_bank_sweep(replace(SETTINGS, batches=(1,)), out, root / "work", threads=1,
                               runtimes=("onnxruntime-cpu", "no-contrib-cpu"), command="test", log=lambda _: None)
    result = json.loads(path.read_text(encoding="utf-8"))
    timed = {runtime: {r["variant"] for r in result["rows"] if r["runtime"] == runtime}
             for runtime in ("onnxruntime-cpu", "no-contrib-cpu")}
    assert timed == {"onnxruntime-cpu": {"backbone", "bank1", "bank2", "bank2@q8i"},
                     "no-contrib-cpu": {"backbone", "bank1", "bank2"}}
    [skipped] = result["skipped"]
    assert skipped["runtime"] == "no-contrib-cpu" and skipped["variant"] == "bank2@q8i"
    assert "no kernel for com.microsoft MatMulNBits" in skipped["reason"]
    assert result["checks"]["no-contrib-cpu_bank2_vs_parts"]["passed"]
    assert "no-contrib-cpu_bank2@q8i_vs_bank2" not in result["checks"]
    assert not (root / "work" / bank.STAGING_DIR).exists()  # composed banks removed after the sweep
    text = bank_report.write_bank_report(out, plots=False).read_text(encoding="utf-8")
    assert "Not timed: no-contrib-cpu bank2@q8i (" in text


def test_the_committed_bank_results_render_as_committed(tmp_path):
    # --report-only on the project's own record gives the RESULTS.md committed beside it
    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu-2core-bank"
    shutil.copy(committed / bank_report.RESULTS_JSON, tmp_path / bank_report.RESULTS_JSON)
    report = bank_report.write_bank_report(tmp_path, plots=True)
    assert report.read_text(encoding="utf-8") == (committed / "RESULTS.md").read_text(encoding="utf-8")
