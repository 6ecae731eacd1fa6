"""The bank sweep's RESULTS.md and plot, from ``bank.json``, with the issue's targets checked.

Rendered from the JSON alone (``transmiter bench --bank-sweep N,... --report-only``), through the
report helpers the suite's RESULTS.md uses (:mod:`.report`: the targets table, the version list,
atomic figure and markdown writes).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..runtimes.registry import RUNTIMES
from .report import pyplot, save_figure, targets_table, version_list, write_markdown

RESULTS_JSON = "bank.json"
RESULTS_MD = "RESULTS.md"
PLOT = "bank_latency.png"
# The targets (measured and reported, never asserted).
RATIO_TARGET = {"target": "ViT-B-16", "runtime": "onnxruntime-cpu", "tasks": 16, "batches": (1, 8), "max_ratio": 1.02}
HEAD_MACS_TARGET = {"feature_dim": 768, "max_macs": 9.3e6}
COMPACT_FAMILY = "onnxruntime"  # whose operator (MatMulNBits) and settings the compact heads are


def bank_cells(result: dict) -> dict[tuple[str, int], dict[str, dict]]:
    """The sweep's rows grouped by (runtime, batch), then by variant."""
    grouped: dict[tuple[str, int], dict[str, dict]] = {}
    for row in result["rows"]:
        grouped.setdefault((row["runtime"], row["batch"]), {})[row["variant"]] = row
    return grouped


def target_checks(result: dict) -> list[dict]:
    """The issue's targets: bank(16)/backbone <= 1.02 at batch 1 and 8 (ORT CPU, ViT-B-16), and
    MACs per added task <= 9.3 M at d = 768."""
    grouped = bank_cells(result)
    checks = [_ratio_check(result["settings"]["model"], batch, grouped.get((RATIO_TARGET["runtime"], batch), {}))
              for batch in RATIO_TARGET["batches"]]
    settings, costs = result["settings"], result["costs"]
    reference = costs["head_reference_d"]
    checks.append({"target": f"MACs per added task at d = {HEAD_MACS_TARGET['feature_dim']}, C = D = "
                             f"{settings['width']}, K = {settings['classes']}: "
                             f"<= {HEAD_MACS_TARGET['max_macs'] / 1e6:g} M",
                   "met": reference["macs"] <= HEAD_MACS_TARGET["max_macs"],
                   "measured": f"{reference['macs']:,} (synthetic head graph at d = {reference['feature_dim']}); "
                               f"{costs['head']['macs']:,} at d = {costs['head']['feature_dim']}"})
    return checks


def _ratio_check(model: str, batch: int, cell: dict[str, dict]) -> dict:
    """bank(N)/backbone at ``batch`` against its bound; the compact banks of that N beside it."""
    where = RATIO_TARGET
    label = (f"bank({where['tasks']}) / backbone, {where['runtime']}, {where['target']}, batch {batch}: "
             f"<= {where['max_ratio']}")
    fp32 = cell.get(f"bank{where['tasks']}")
    if model != where["target"] or fp32 is None:
        return {"target": label, "met": None, "measured": "not measured in this run"}
    compact = [r for r in cell.values() if r["tasks"] == where["tasks"] and r["weights"] != "fp32"]
    also = "; ".join(f"{r['weights']} weights {r['ratio_vs_backbone']:.3f}" for r in compact)
    paired = fp32["paired_ratio_vs_backbone"]
    return {"target": label, "met": fp32["ratio_vs_backbone"] <= where["max_ratio"],
            "measured": f"fp32 heads {fp32['ratio_vs_backbone']:.3f} (per-round ratios: median "
                        f"{paired['median']:.3f}, quartiles {paired['q25']:.3f} .. {paired['q75']:.3f})"
                        + (f"; compact heads: {also}" if also else ""),
            "also_met": {r["weights"]: r["ratio_vs_backbone"] <= where["max_ratio"] for r in compact}}


def bank_markdown(result: dict, plot_name: str | None) -> str:
    lines = [*_header(result), *targets_table(target_checks(result)), "", *_latency(result), *_costs(result),
             *_compact_heads(result), *_checks(result)]
    if plot_name:
        lines += ["## Plot", "", f"![latency against N]({plot_name})", ""]
    return "\n".join(lines)


def _header(result: dict) -> list[str]:
    s, env = result["settings"], result["environment"]
    return [f"# Bank sweep: {s['model']}, {env['host_label']}", "",
            f"Measured by `{env['command'] or 'run_bank_sweep'}` ({result['seconds']:.0f} s"
            + (f", peak RSS {result['peak_rss_mib'] / 1024:.1f} GiB" if result.get("peak_rss_mib") else "")
            + "); rerun it to refresh this folder (`--report-only` rewrites this file from bank.json).", "",
            f"- Date: {env['date']}; CPU: {env['cpu']} ({env['cpu_count']} logical cores); GPU: {env['gpu'] or 'none'}",
            f"- ONNX Runtime intra-op threads {s['threads']} (inter-op 1, sequential, no spinning); versions: "
            + version_list(env["versions"]),
            f"- {s['model']} with random weights (init seed {s['seed']}), d = {s['feature_dim']}, input "
            f"{s['image_size'][0]} px; N synthetic folded TransMiter heads, C = D = {s['width']}, K = {s['classes']} "
            "per task, random MLP weights, task i from seed + i; banks composed by `compose_bank` as `transmiter "
            "export` composes them.",
            "- The backbone alone (pixels -> L2-normalised features) and every bank are timed in one interleaved "
            "loop per batch (shuffled order each round); ratios are of medians from that loop, per-round ratios "
            "in brackets (median, quartiles).", ""]


def _latency(result: dict) -> list[str]:
    lines = ["## Latency", ""]
    for (runtime, batch), cell in bank_cells(result).items():
        backbone = cell["backbone"]
        copies = "; host<->device copies included" if runtime in RUNTIMES and RUNTIMES[runtime].includes_copies else ""
        lines += [f"### {runtime}, batch {batch} ({backbone['rounds']} rounds{copies})", "",
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
        # a runtime skipped whole, or one variant on it (a compact bank it cannot load)
        lines += ["Not timed: " + "; ".join(f"{x['runtime']}{' ' + x['variant'] if 'variant' in x else ''} ({x['reason']})"
                                            for x in result["skipped"]) + ".", ""]
    others = sorted({r["runtime"] for r in result["rows"] if r["weights"] != "fp32" and r["runtime"] in RUNTIMES
                     and RUNTIMES[r["runtime"]].family != COMPACT_FAMILY})
    if others:
        lines += [f"Compact banks on {', '.join(others)}: the same MatMulNBits graphs, run by that runtime's own "
                  "kernels; q8i's int8 arithmetic (`accuracy_level` 4) is an ONNX Runtime setting, which another "
                  "runtime may not follow (see its max abs against q8's under Checks).", ""]
    return lines


def _costs(result: dict) -> list[str]:
    s, costs = result["settings"], result["costs"]
    head, ref = costs["head"], costs["head_reference_d"]
    lines = ["## Cost from the graphs", "",
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
    return lines + [""]


def _compact_heads(result: dict) -> list[str]:
    compact = result.get("compact_heads")
    if not compact:
        return []
    batches = sorted({b for c in compact.values() for b in c["head_alone_p50_ms"]}, key=int)
    first = next(iter(compact.values()))
    lines = ["## Compact heads: ONNX Runtime's weight-only quantiser", "",
             "`MatMulNBitsQuantizer` on the two MLP MatMuls of each head (the exported Gemms rewritten as "
             "MatMul + Add first); push, pull and the statistics nodes (`/stats/`, `/normalise/`, "
             "`/destandardise/`) stay fp32 (checked node for node). Accuracy: the first "
             f"{first['tasks']} heads against their fp32 graphs on {first['rows']} L2-normalised random feature "
             "rows. Head alone: p50 ms, interleaved with the fp32 head, ONNX Runtime CPU.", "",
             "A row's top-1 can only flip when its fp32 top-two margin is within about twice the max abs; "
             "`flipped: largest margin` gives the largest fp32 margin among flipped rows, `near ties` the "
             "share of rows whose fp32 margin is below the max abs.", "",
             "| setting | what | weight bytes per head | max abs | max abs / max ref | top-1 agreement "
             "| flipped: largest margin | near ties | "
             + " | ".join(f"head alone b{b}: fp32 / compact ms" for b in batches) + " |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in batches) + " |"]
    for name, c in compact.items():
        timing = " | ".join(f"{c['head_alone_p50_ms'][b]['fp32']:.3f} / {c['head_alone_p50_ms'][b][name]:.3f}"
                            for b in batches)
        flipped = "-" if c["flipped_max_fp32_margin"] is None else format(c["flipped_max_fp32_margin"], ".3g")
        lines.append(f"| {name} | {c['description']} | {c['weight_bytes']:,} | {c['max_abs']:.3g} | "
                     f"{c['max_abs_over_max_reference']:.2e} | {c['top1_agreement']:.2%} | {flipped} | "
                     f"{c['rows_with_fp32_margin_below_max_abs']:.2%} | {timing} |")
    return lines + [""]


def _checks(result: dict) -> list[str]:
    lines = ["## Checks", "",
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
    return lines + [""]


def plot_bank(result: dict, path: Path) -> Path:
    """p50 latency against N, one panel per runtime and batch, one line per kind of head weights;
    the backbone alone as a horizontal line and the 1.02 x backbone target dotted."""
    plt = pyplot()
    grouped = bank_cells(result)
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
    return save_figure(figure, path)


def write_bank_report(out_dir: Path, plots: bool = True) -> Path:
    """RESULTS.md (and the plot) from ``bank.json`` in ``out_dir``."""
    out_dir = Path(out_dir)
    source = out_dir / RESULTS_JSON
    if not source.is_file():
        raise InputError(f"no bank sweep results in {out_dir}: run transmiter bench --bank-sweep first")
    result = json.loads(source.read_text(encoding="utf-8"))
    plot_name = plot_bank(result, out_dir / PLOT).name if plots else None
    return write_markdown(out_dir / RESULTS_MD, bank_markdown(result, plot_name))
