"""The benchmark harness: timing, the variants it compares, their graphs, and the report."""

from __future__ import annotations

import json
import time

import numpy as np
import onnx
import pytest
import torch

from transmiter_deploy.benchmark.graphs import export_graphs
from transmiter_deploy.benchmark.report import (cells, cpu_path_check, cpu_paths, cpu_paths_markdown, paired_ratio,
                                               ratios, target_checks)
from transmiter_deploy.runtimes import registry
from transmiter_deploy.benchmark.runtimes import GPU_RUNTIMES, Caller, unavailable
from transmiter_deploy.benchmark.timing import TimingPlan, summarise, time_interleaved
from transmiter_deploy.benchmark.variants import build_group, targets_of
from transmiter_deploy.cli import main
from transmiter_deploy.method.eft import eft_logits
from transmiter_deploy.errors import InputError


@pytest.fixture(scope="module")
def demo_group():
    return build_group("TM-Demo-Target", ["demo"])


@pytest.fixture(scope="module")
def demo_graphs(demo_group, tmp_path_factory):
    work = tmp_path_factory.mktemp("bench-work")
    paths, macs = export_graphs(demo_group, work)
    return work, paths, macs


def test_interleaved_timing_separates_fast_from_slow_and_respects_the_plan():
    calls = {"fast": lambda: None, "slow": lambda: time.sleep(0.003)}
    samples = time_interleaved(calls, TimingPlan(warmup=1, min_rounds=4, max_rounds=6, budget_s=0.001))
    assert {len(v) for v in samples.values()} == {4}  # budget spent: stops at min_rounds
    assert min(samples["slow"]) >= 0.003 > max(samples["fast"])
    samples = time_interleaved(calls, TimingPlan(warmup=0, min_rounds=1, max_rounds=7, budget_s=60))
    assert {len(v) for v in samples.values()} == {7}  # budget left: stops at max_rounds
    order = []
    time_interleaved({name: (lambda n=name: order.append(n)) for name in "abcd"},
                     TimingPlan(warmup=0, min_rounds=8, max_rounds=8, budget_s=1))
    rounds = [order[i : i + 4] for i in range(0, 32, 4)]
    assert all(sorted(r) == list("abcd") for r in rounds) and len({tuple(r) for r in rounds}) > 1
    with pytest.raises(InputError):
        TimingPlan(min_rounds=5, max_rounds=2)
    with pytest.raises(InputError):
        time_interleaved({}, TimingPlan())


def test_summary_percentiles_and_throughput():
    seconds = list(np.linspace(0.001, 0.1, 100))
    summary = summarise(seconds, batch=8)
    assert summary["p50_ms"] == pytest.approx(np.percentile(np.asarray(seconds) * 1000, 50))
    assert summary["p50_ms"] < summary["p90_ms"] < summary["p99_ms"]
    assert summary["images_per_s"] == pytest.approx(8000 / summary["p50_ms"])
    assert summary["rounds"] == 100 and len(summary["samples_ms"]) == 100


def test_eft_is_logit_arithmetic_on_tensors_and_arrays():
    a, b, c = (torch.randn(3, 5, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch.testing.assert_close(eft_logits(a, b, c), a + b - c)
    np.testing.assert_allclose(eft_logits(a.numpy(), b.numpy(), c.numpy()), (a + b - c).numpy(), rtol=1e-6)
    with pytest.raises(InputError, match="one shape"):
        eft_logits(a, b, c[:, :4])


def test_variants_compute_what_they_claim(demo_group):
    group = demo_group
    assert list(group.variants) == ["backbone", "fused", "unfolded", "eft:TM-Demo-Source", "head"]
    pixels = group.example("pixels", 3)
    with torch.no_grad():
        run = {name: variant.combine([part.module(pixels) for part in variant.parts])
               for name, variant in group.variants.items() if variant.takes == "pixels"}
        features = torch.nn.functional.normalize(group.variants["backbone"].parts[0].module.visual(pixels), dim=-1)
        head = group.variants["head"].parts[0].module
        torch.testing.assert_close(head(features), run["fused"], atol=1e-4, rtol=1e-4)
    assert all(r.shape == (3, group.classes) for r in run.values())
    torch.testing.assert_close(run["fused"], run["unfolded"], atol=1e-4, rtol=1e-4)
    assert (run["fused"] - run["backbone"]).abs().max() > 1e-2  # the adapter changes the logits
    eft = group.variants["eft:TM-Demo-Source"]
    assert eft.parts[0] is group.variants["backbone"].parts[0]  # EFT's target part is the backbone alone
    with torch.no_grad():
        target, finetuned, zero_shot = (part.module(pixels) for part in eft.parts)
    torch.testing.assert_close(run["eft:TM-Demo-Source"], target + finetuned - zero_shot)
    # the two source towers are separate modules (own weights in memory), equal in value
    finetuned_module, zero_shot_module = (part.module for part in eft.parts[1:])
    assert finetuned_module is not zero_shot_module
    assert all(a.data_ptr() != b.data_ptr() and torch.equal(a, b)
               for a, b in zip(finetuned_module.parameters(), zero_shot_module.parameters()))
    with pytest.raises(InputError, match="unknown benchmark pair"):
        targets_of(["demo", "vit-b-16_to_vit-l-99"])
    assert targets_of(["vit-b-32_to_vit-b-16", "demo", "rn50_to_vit-b-16"]) == {
        "ViT-B-16": ["vit-b-32_to_vit-b-16", "rn50_to_vit-b-16"], "TM-Demo-Target": ["demo"]}


def test_graphs_are_cached_counted_and_reexported_when_damaged(demo_group, demo_graphs):
    work, paths, macs = demo_graphs
    keys = {part.graph_key for variant in demo_group.variants.values() for part in variant.parts}
    assert set(paths) == keys and all(path.is_file() for path in paths.values())
    backbone = macs[demo_group.variants["backbone"].parts[0].graph_key]
    fused = macs[demo_group.variants["fused"].parts[0].graph_key]
    unfolded = macs[demo_group.variants["unfolded"].parts[0].graph_key]
    assert fused["backbone"] == backbone["backbone"] > 0
    assert 0 < fused["head+adapter"] < unfolded["head+adapter"]  # folding saves the C-wide head
    fused_path = paths[demo_group.variants["fused"].parts[0].graph_key]
    stamp = fused_path.stat().st_mtime_ns
    assert export_graphs(demo_group, work)[0] == paths and fused_path.stat().st_mtime_ns == stamp
    fused_path.write_bytes(fused_path.read_bytes()[:-10])  # damaged: the record's sha256 no longer matches
    export_graphs(demo_group, work)
    assert fused_path.stat().st_mtime_ns != stamp
    assert json.loads(fused_path.with_suffix(".json").read_text())["macs_batch1"] == fused


def test_onnxruntime_calls_match_pytorch_for_every_variant(demo_group, demo_graphs):
    work, paths, _ = demo_graphs
    torch_caller = Caller("pytorch-cpu", demo_group, paths, 1, work, 4)
    ort_caller = Caller("onnxruntime-cpu", demo_group, paths, 1, work, 4)
    for variant in demo_group.variants.values():
        expected = torch_caller.call(variant, 4)().numpy()
        np.testing.assert_allclose(ort_caller.call(variant, 4)(), expected, atol=1e-3, rtol=1e-4)
    ort_caller.release()


def test_gpu_runtimes_are_skipped_with_a_reason_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    assert all("no CUDA GPU" in unavailable(runtime) for runtime in GPU_RUNTIMES)


def _row(target, runtime, batch, variant, samples):
    return {"target": target, "runtime": runtime, "batch": batch, "variant": variant,
            **summarise([s / 1000 for s in samples], batch)}


def test_target_checks_judge_measured_rows():
    rows = [_row("ViT-B-16", "onnxruntime-cpu", 8, "backbone", [100, 101, 99]),
            _row("ViT-B-16", "onnxruntime-cpu", 8, "fused", [100.5, 101.5, 99.5]),
            _row("ViT-B-16", "onnxruntime-cpu", 8, "fused@int8", [40, 41, 39]),
            _row("ViT-B-16", "onnxruntime-cpu", 8, "backbone@int8", [39, 40, 38]),
            _row("ViT-L-14", "onnxruntime-cpu", 1, "head", [0.2, 0.3, 0.25]),
            _row("ViT-L-14", "onnxruntime-cpu", 1, "fused", [10, 10, 10]),
            _row("ViT-L-14", "onnxruntime-cpu", 1, "eft:ViT-B-16", [14, 14, 14]),
            _row("ViT-L-14", "onnxruntime-cpu", 8, "fused", [80, 80, 80]),
            _row("ViT-L-14", "onnxruntime-cpu", 8, "eft:ViT-B-16", [90, 90, 90])]
    checks = target_checks({"rows": rows, "skipped": [{"runtime": "tensorrt", "reason": "no GPU"}]}, GPU_RUNTIMES)
    assert [c["met"] for c in checks] == [True, True, False, True, None]  # EFT only 1.125x at batch 8
    assert "+0.50%" in checks[0]["measured"] and checks[3]["measured"] == "0.40" and "no GPU" in checks[4]["measured"]
    assert ratios(cells({"rows": rows})[("ViT-B-16", "onnxruntime-cpu", 8)])["fused@int8/backbone@int8"] == pytest.approx(40 / 39)
    grouped = cells({"rows": rows})
    assert ratios(grouped[("ViT-L-14", "onnxruntime-cpu", 1)])["eft:ViT-B-16/fused"] == pytest.approx(1.4)
    paired = paired_ratio(grouped[("ViT-B-16", "onnxruntime-cpu", 8)]["fused"],
                          grouped[("ViT-B-16", "onnxruntime-cpu", 8)]["backbone"])
    assert paired["q25"] <= paired["median"] <= paired["q75"] and paired["median"] == pytest.approx(1.005, abs=1e-4)


def test_cpu_paths_rank_every_cpu_runtime_and_precision_against_onnx_runtime_fp32():
    rows = [_row("ViT-B-16", "onnxruntime-cpu", 8, "fused", [100, 110, 90]),
            _row("ViT-B-16", "onnxruntime-cpu", 8, "fused@int8", [31, 33, 29]),
            _row("ViT-B-16", "openvino-cpu", 8, "fused", [90, 99, 81]),
            _row("ViT-B-16", "openvino-cpu", 8, "fused@int8", [20, 26, 18]),  # per round: 0.2, 0.236, 0.2
            _row("ViT-B-16", "openvino-cpu-bf16", 8, "fused", [50, 55, 45]),  # the fp32 graph in bf16
            _row("ViT-B-16", "openvino-cpu", 8, "backbone", [89, 98, 80]),  # not a deployed graph
            _row("ViT-B-16", "tensorrt", 8, "fused", [5, 5, 5]),  # a GPU runtime: not a CPU path
            _row("ViT-B-16", "openvino-cpu", 1, "fused", [10, 10])]  # no reference at batch 1
    latency = {"rows": rows}
    (key, paths), = cpu_paths(latency).items()
    assert key == ("ViT-B-16", 8)
    assert [(p["runtime"], p["precision"]) for p in paths] == [
        ("openvino-cpu", "int8"), ("onnxruntime-cpu", "int8"), ("openvino-cpu-bf16", "fp32"), ("openvino-cpu", "fp32"),
        ("onnxruntime-cpu", "fp32")]
    assert paths[0]["vs_reference"] == pytest.approx(0.2)  # the ratio of medians
    assert paths[0]["paired"]["median"] == pytest.approx(0.2) and paths[0]["paired"]["q75"] == pytest.approx(0.218, abs=1e-3)
    check = cpu_path_check(latency)
    assert check["met"] and check["measured"] == "0.200 (openvino-cpu int8)"
    text = "\n".join(cpu_paths_markdown(latency))
    # bf16 arithmetic is not fp32 parity: named apart, judged by top-1
    assert ("- ViT-B-16, batch 8: openvino-cpu int8 (0.200x ONNX Runtime fp32), where the export's int8 gate passes; "
            "without calibration, the fp32 graph in bf16 arithmetic on openvino-cpu-bf16 (0.500x, judged by top-1); "
            "at fp32 parity, openvino-cpu (0.900x).") in text
    assert "| ViT-B-16 | 8 | openvino-cpu-bf16 | fp32 (bf16 arithmetic) | 50.00 | 0.500 |" in text
    assert "| ViT-B-16 | 8 | openvino-cpu | int8 | 20.00 | 0.200 | 0.200 (0.200 .. 0.218) |" in text
    rows[3] = _row("ViT-B-16", "openvino-cpu", 8, "fused@int8", [30, 28])  # another loop: no per-round ratios
    rows[4] = _row("ViT-B-16", "openvino-cpu-bf16", 8, "fused", [60, 70, 50])
    paths = cpu_paths({"rows": rows})[("ViT-B-16", 8)]
    assert not cpu_path_check({"rows": rows})["met"]
    assert next(p for p in paths if p["precision"] == "int8" and p["runtime"] == "openvino-cpu")["paired"] is None
    assert cpu_path_check({"rows": rows[:1]})["met"] is None and cpu_paths_markdown({"rows": rows[:1]}) == []


@pytest.mark.slow
def test_bench_command_writes_results_report_and_plots(tmp_path, capsys):
    out, work = tmp_path / "results", tmp_path / "work"
    code = main(["--quiet", "bench", "--pair", "demo", "--part", "latency", "--part", "flops", "--batch", "1",
                 "--batch", "3", "--threads", "1", "--out", str(out), "--work", str(work)])
    assert code == 0, capsys.readouterr().err
    latency = json.loads((out / "latency.json").read_text())
    measured = {(r["runtime"], r["batch"], r["variant"]) for r in latency["rows"]}
    variants = ["backbone", "fused", "unfolded", "eft:TM-Demo-Source", "head"]
    # every CPU runtime of the registry that can run here, timed without naming it (OpenVINO too)
    cpu = [name for name in registry.runtime_names("cpu") if registry.runtime(name).unavailable() is None]
    assert {"pytorch-cpu", "onnxruntime-cpu"} <= set(cpu)
    assert measured == {(rt, b, v) for rt in cpu for b in (1, 3) for v in variants}
    assert all(r["p50_ms"] > 0 and r["rounds"] >= 5 for r in latency["rows"])
    # the runtimes timing a batch share its loop (whole-model variants; the head in one of its own)
    for batch in (1, 3):
        for takes in ("pixels", "features"):
            assert len({r["rounds"] for r in latency["rows"] if r["batch"] == batch and r["input"] == takes}) == 1
    env = latency["environment"]
    assert env["torch_threads"] == 1 and env["onnxruntime_intra_op_threads"] == 1 and env["versions"]["torch"]
    assert env["profile"]["cpu_batches"] == [1, 3] and env["command"].startswith("transmiter")
    if not torch.cuda.is_available():  # the GPU runtimes, and any CPU runtime this CPU cannot run (bf16)
        unavailable = {name for name in registry.runtime_names("cpu") if name not in cpu}
        assert {s["runtime"] for s in latency["skipped"]} == set(GPU_RUNTIMES) | unavailable
    flops = json.loads((out / "flops.json").read_text())
    assert set(flops["targets"]["TM-Demo-Target"]["variants"]) == set(variants)
    report = (out / "RESULTS.md").read_text()
    assert "## Targets" in report and "eft:TM-Demo-Source/fused" in report and "## Cost" in report
    assert "## CPU deployment" in report and "| TM-Demo-Target | 3 | pytorch-cpu | fp32 |" in report
    for image in ("latency_tm-demo-target.png", "overhead.png"):
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    narrow = tmp_path / "narrow"
    assert main(["--quiet", "bench", "--pair", "demo", "--part", "latency", "--runtime", "onnxruntime-cpu",
                 "--variant", "backbone", "--variant", "eft", "--batch", "2", "--rounds", "3", "--no-plots",
                 "--out", str(narrow), "--work", str(work)]) == 0
    rows = json.loads((narrow / "latency.json").read_text())["rows"]
    assert {(r["variant"], r["batch"], r["rounds"]) for r in rows} == {("backbone", 2, 3), ("eft:TM-Demo-Source", 2, 3)}
    assert main(["bench", "--report-only", "--no-plots", "--out", str(out)]) == 0
    assert main(["bench", "--report-only", "--out", str(tmp_path / "empty")]) == 2
    assert "no benchmark results" in capsys.readouterr().err
    assert main(["bench", "--pair", "nonsense", "--out", str(out)]) == 2
    assert main(["bench", "--threads", "0", "--out", str(out)]) == 2
    assert main(["bench", "--batch", "0", "--out", str(out)]) == 2


@pytest.mark.slow
def test_reduced_precision_variants_are_converted_graphs_timed_on_graph_runtimes_only(tmp_path):
    group = build_group("TM-Demo-Target", ["demo"], precisions=("int8",))
    # fused@int8 and the fp32 graph it is converted from (each conversion is a child process that
    # imports the toolkit and calibrates: seconds)
    for name in [n for n in group.variants if n not in ("fused", "fused@int8")]:
        del group.variants[name]
    paths, macs = export_graphs(group, tmp_path)
    graph = onnx.load(paths[group.variants["fused@int8"].parts[0].graph_key])
    assert sum(node.op_type == "QuantizeLinear" for node in graph.graph.node) > 10
    record = json.loads(paths[group.variants["fused@int8"].parts[0].graph_key].with_suffix(".json").read_text())
    assert record["precision"] == "int8" and record["made_s"] > 0 and record["conversion_peak_rss_mib"] > 100
    ort_caller = Caller("onnxruntime-cpu", group, paths, 1, tmp_path, 4)
    torch_caller = Caller("pytorch-cpu", group, paths, 1, tmp_path, 4)
    assert not torch_caller.supports(group.variants["fused@int8"]) and ort_caller.supports(group.variants["fused@int8"])
    int8, fp32 = ort_caller.call(group.variants["fused@int8"], 4)(), ort_caller.call(group.variants["fused"], 4)()
    assert int8.shape == fp32.shape and np.isfinite(int8).all() and not np.array_equal(int8, fp32)
    assert ort_caller._runners["fused@int8"][0].precision == "int8"
    ort_caller.release()
