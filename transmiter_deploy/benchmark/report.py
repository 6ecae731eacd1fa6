"""RESULTS.md and plots from the benchmark's JSON files, with the issue's targets checked.

Ratios compare variants timed in one interleaved loop (see :mod:`.timing`): the
ratio of their medians, and for the overhead targets also the median and
quartiles of the per-round ratios, which show how much of a 1% difference is
noise on this machine.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ..errors import DependencyError, InputError
from ..runtimes.registry import RUNTIMES, runtime_names

# The targets: the runtime/target/batch each is measured at, and its bound.
OVERHEAD_TARGET = {"target": "ViT-B-16", "runtime": "onnxruntime-cpu", "batch": 8, "max_percent": 1.0}
HEAD_TARGET_MS = 0.5
EFT_TARGET = {"target": "ViT-L-14", "variant": "eft:ViT-B-16", "min_ratio": 1.2}
GPU_OVERHEAD_BATCHES = (1, 64)
INT8_TARGET = {"target": "ViT-B-16", "runtime": "onnxruntime-cpu", "batch": 8, "max_ratio": 0.42}
# the best CPU path (any CPU runtime, any precision of the fused graph) against ONNX Runtime fp32
CPU_PATH_TARGET = {"target": "ViT-B-16", "batch": 8, "max_ratio": 0.25}
CPU_REFERENCE = ("onnxruntime-cpu", "fused")


def slug(text: str) -> str:
    """Lower-case letters and digits joined by dashes: file and folder names from model names."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cells(latency: dict) -> dict[tuple[str, str, int], dict[str, dict]]:
    """Rows grouped by (target, runtime, batch), then by variant."""
    grouped: dict[tuple[str, str, int], dict[str, dict]] = {}
    for row in latency["rows"]:
        grouped.setdefault((row["target"], row["runtime"], row["batch"]), {})[row["variant"]] = row
    return grouped


def paired_ratio(numerator: dict, denominator: dict) -> dict:
    """Median and quartiles of per-round ratios (the samples of one round were taken together)."""
    ratios = np.asarray(numerator["samples_ms"]) / np.asarray(denominator["samples_ms"])
    q25, q50, q75 = (float(np.percentile(ratios, q)) for q in (25, 50, 75))
    return {"median": q50, "q25": q25, "q75": q75}


def ratios(variants: dict[str, dict]) -> dict[str, float]:
    """fused/backbone, unfolded/backbone and EFT/fused from medians, where both were timed."""
    p50 = {name: row["p50_ms"] for name, row in variants.items()}
    out = {}
    if "backbone" in p50:
        for name in ("fused", "unfolded"):
            if name in p50:
                out[f"{name}/backbone"] = p50[name] / p50["backbone"]
    if "fused" in p50:
        for name in p50:
            if name.startswith("eft:"):
                out[f"{name}/fused"] = p50[name] / p50["fused"]
    for name in p50:  # reduced precisions: against fp32, and their own fused/backbone
        if name.startswith("fused@"):
            suffix = name.partition("@")[2]
            if "fused" in p50:
                out[f"{name}/fused"] = p50[name] / p50["fused"]
            if f"backbone@{suffix}" in p50:
                out[f"{name}/backbone@{suffix}"] = p50[name] / p50[f"backbone@{suffix}"]
    return out


def target_checks(latency: dict, gpu_runtimes: tuple[str, ...]) -> list[dict]:
    """One row per target of the issue: what was measured, and whether the bound holds
    (``met`` is None when this host could not measure it)."""
    grouped = cells(latency)
    checks = []

    where = OVERHEAD_TARGET
    key = (where["target"], where["runtime"], where["batch"])
    label = (f"fused vs backbone alone, {where['runtime']}, {where['target']}, batch {where['batch']}: "
             f"median overhead <= {where['max_percent']:g}%")
    if key in grouped and {"fused", "backbone"} <= set(grouped[key]):
        overhead = 100 * (ratios(grouped[key])["fused/backbone"] - 1)
        paired = paired_ratio(grouped[key]["fused"], grouped[key]["backbone"])
        checks.append({"target": label, "met": overhead <= where["max_percent"],
                       "measured": f"{overhead:+.2f}% (per-round ratios: median {100 * (paired['median'] - 1):+.2f}%, "
                                   f"quartiles {100 * (paired['q25'] - 1):+.2f}% .. {100 * (paired['q75'] - 1):+.2f}%)"})
    else:
        checks.append({"target": label, "met": None, "measured": "not measured in this run"})

    heads = [(t, r, v["head"]["p50_ms"]) for (t, r, b), v in grouped.items()
             if b == 1 and "head" in v and r in runtime_names("cpu")]
    label = f"head + adapter alone, batch 1, CPU: median < {HEAD_TARGET_MS} ms"
    if heads:
        worst = max(ms for _, _, ms in heads)
        checks.append({"target": label, "met": worst < HEAD_TARGET_MS,
                       "measured": "; ".join(f"{t} {r} {ms:.3f} ms" for t, r, ms in heads)})
    else:
        checks.append({"target": label, "met": None, "measured": "not measured in this run"})

    where = EFT_TARGET
    found = [(r, b, v[where["variant"]]["p50_ms"] / v["fused"]["p50_ms"]) for (t, r, b), v in grouped.items()
             if t == where["target"] and where["variant"] in v and "fused" in v]
    label = f"EFT / fused TransMiter, ViT-B-16 -> ViT-L-14, every batch: ratio >= {where['min_ratio']}"
    if found:
        checks.append({"target": label, "met": min(ratio for _, _, ratio in found) >= where["min_ratio"],
                       "measured": "; ".join(f"{r} b{b} {ratio:.2f}" for r, b, ratio in sorted(found))})
    else:
        checks.append({"target": label, "met": None, "measured": "not measured in this run"})

    where = INT8_TARGET
    key = (where["target"], where["runtime"], where["batch"])
    label = (f"fused int8 / fused fp32, {where['runtime']}, {where['target']}, batch {where['batch']}: "
             f"ratio <= {where['max_ratio']}")
    if key in grouped and {"fused@int8", "fused"} <= set(grouped[key]):
        ratio = ratios(grouped[key])["fused@int8/fused"]
        others = "; ".join(f"{t} b{b} {ratios(v)['fused@int8/fused']:.2f}" for (t, r, b), v in sorted(grouped.items())
                           if r == where["runtime"] and {"fused@int8", "fused"} <= set(v) and (t, r, b) != key)
        checks.append({"target": label, "met": ratio <= where["max_ratio"],
                       "measured": f"{ratio:.2f}" + (f" (also {others})" if others else "")})
    else:
        checks.append({"target": label, "met": None, "measured": "not measured in this run (--precision int8)"})

    label = f"GPU: fused vs backbone alone at batch {' and '.join(map(str, GPU_OVERHEAD_BATCHES))}: overhead <= 1%"
    found = [(t, r, b, 100 * (ratios(v)["fused/backbone"] - 1)) for (t, r, b), v in grouped.items()
             if r in gpu_runtimes and b in GPU_OVERHEAD_BATCHES and {"fused", "backbone"} <= set(v)]
    if found:
        checks.append({"target": label, "met": max(o for *_, o in found) <= 1.0,
                       "measured": "; ".join(f"{t} {r} b{b} {o:+.2f}%" for t, r, b, o in sorted(found))})
    else:
        skipped = "; ".join(f"{s['runtime']}: {s['reason']}" for s in latency.get("skipped", [])
                            if s["runtime"] in gpu_runtimes)
        checks.append({"target": label, "met": None, "measured": f"not measured ({skipped or 'no GPU runtime ran'})"})
    return checks


def cpu_paths(latency: dict) -> dict[tuple[str, int], list[dict]]:
    """Per (target, batch): the fused graph on every CPU runtime and precision, with its time
    against ONNX Runtime's fp32 fused graph (the ratio of medians, as every ratio of the report), and
    the median and quartiles of per-round ratios where the two were timed in one loop (the same
    number of rounds: ``paired``); fastest first."""
    grouped, paths = cells(latency), {}
    for (target, runtime, batch), variants in grouped.items():
        reference = grouped.get((target, CPU_REFERENCE[0], batch), {}).get(CPU_REFERENCE[1])
        if runtime not in runtime_names("cpu") or reference is None:
            continue
        for name, row in variants.items():
            if name != "fused" and not name.startswith("fused@"):
                continue
            together = len(row.get("samples_ms", ())) == len(reference.get("samples_ms", ())) > 0
            paths.setdefault((target, batch), []).append(
                {"runtime": runtime, "precision": name.partition("@")[2] or "fp32", "p50_ms": row["p50_ms"],
                 "arithmetic": RUNTIMES[runtime].arithmetic,
                 "vs_reference": row["p50_ms"] / reference["p50_ms"],
                 "paired": paired_ratio(row, reference) if together else None})
    return {key: sorted(rows, key=lambda r: r["vs_reference"]) for key, rows in sorted(paths.items())}


def cpu_path_check(latency: dict) -> dict:
    """The target row of the best CPU path on ViT-B-16 at batch 8."""
    where = CPU_PATH_TARGET
    label = (f"best CPU path (runtime, precision) / onnxruntime-cpu fp32, fused, {where['target']}, batch "
             f"{where['batch']}: ratio <= {where['max_ratio']}")
    rows = cpu_paths(latency).get((where["target"], where["batch"]))
    if not rows or len(rows) == 1:
        return {"target": label, "met": None, "measured": "not measured in this run (--precision int8, a CPU runtime)"}
    best = rows[0]
    return {"target": label, "met": best["vs_reference"] <= where["max_ratio"],
            "measured": f"{best['vs_reference']:.3f} ({best['runtime']} {_precision_cell(best)})"}


def cpu_paths_markdown(latency: dict) -> list[str]:
    """The CPU deployment table and what it recommends, from the figures of this run."""
    paths = cpu_paths(latency)
    if not any(len(rows) > 1 for rows in paths.values()):
        return []
    lines = ["## CPU deployment: the fused graph per runtime and precision", "",
             "Against ONNX Runtime fp32 (`onnxruntime-cpu`, `fused`) at the same batch, as a ratio of medians; "
             "runtimes and precisions are timed in one interleaved loop, and the per-round ratios' median and "
             "quartiles show how much of a difference is noise (- where the two were not timed together). int8 "
             "ships only behind its export's accuracy gate (docs/export.md).", "",
             "| target | batch | runtime | precision | p50 ms | x ONNX Runtime fp32 | per round: median (quartiles) |",
             "| --- | ---: | --- | --- | ---: | ---: | --- |"]
    for (target, batch), rows in paths.items():
        lines += [f"| {target} | {batch} | {r['runtime']} | {_precision_cell(r)} | {r['p50_ms']:.2f} | "
                  f"{r['vs_reference']:.3f} | " + (f"{r['paired']['median']:.3f} ({r['paired']['q25']:.3f} .. "
                                                  f"{r['paired']['q75']:.3f})" if r["paired"] else "-") + " |"
                  for r in rows]
    lines.append("")
    lines += ["What this run recommends for CPU deployment on this machine, fastest first: the calibrated "
              "path where the export's gate passes, else the fp32 graph in a lower arithmetic where top-1 "
              "agreement is enough, else fp32 parity.", ""]
    for (target, batch), rows in paths.items():
        fp32 = [r for r in rows if r["precision"] == "fp32" and not r.get("arithmetic")]
        uncalibrated = [r for r in rows if r["precision"] == "fp32" and r.get("arithmetic")]
        calibrated = "" if rows[0]["precision"] == "fp32" else f", where the export's {rows[0]['precision']} gate passes"
        lines.append(f"- {target}, batch {batch}: {rows[0]['runtime']} {_precision_cell(rows[0])} "
                     f"({rows[0]['vs_reference']:.3f}x ONNX Runtime fp32){calibrated}"
                     + "".join(f"; without calibration, the fp32 graph in {r['arithmetic']} arithmetic on {r['runtime']} "
                               f"({r['vs_reference']:.3f}x, judged by top-1)" for r in uncalibrated[:1])
                     + f"; at fp32 parity, {fp32[0]['runtime']} ({fp32[0]['vs_reference']:.3f}x).")
    return lines + [""]


def _precision_cell(row: dict) -> str:
    """The graph's precision, and the arithmetic where the runtime computes in a lower one."""
    return f"{row['precision']} ({row['arithmetic']} arithmetic)" if row.get("arithmetic") else row["precision"]


def verdict(met) -> str:
    """A target's verdict cell: met, missed, or not measured (``met`` is None)."""
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def targets_table(checks: list[dict]) -> list[str]:
    """The Targets section: one row per check (``target``, ``measured``, ``met``); a check's
    ``also_met`` (name -> met) adds the verdicts of what was measured beside it."""
    return ["## Targets", "", "| target | measured | verdict |", "| --- | --- | --- |"] + [
        f"| {c['target']} | {c['measured']} | {verdict(c['met'])}"
        + "".join(f"; {name}: {verdict(met)}" for name, met in c.get("also_met", {}).items()) + " |"
        for c in checks]


def version_list(versions: dict) -> str:
    """The library versions a result depends on, as ``name version, ...``."""
    return ", ".join(f"{name} {versions[name]}" for name in
                     ("transmiter-deploy", "torch", "open_clip_torch", "onnx", "onnxruntime-gpu") if name in versions)


def _environment_lines(env: dict) -> list[str]:
    gpu = env["gpu"]["name"] + f" (sm {env['gpu']['compute_capability']}, CUDA {env['gpu']['cuda']})" if env["gpu"] else "none"
    return [
        f"- Date: {env['date']}; host label `{env['host_label']}`; profile `{env['profile']['name']}`",
        f"- CPU: {env['cpu']} ({env['cpu_count']} logical cores); GPU: {gpu}",
        f"- Threads: torch {env['torch_threads']}, ONNX Runtime intra-op {env['onnxruntime_intra_op_threads']} "
        "(inter-op 1, sequential)",
        f"- Versions: {version_list(env['versions'])}, Python {env['python']}",
        f"- {env['weights']}",
    ]


def latency_markdown(latency: dict, flops: dict | None) -> list[str]:
    grouped = cells(latency)
    lines = ["## Latency: medians and ratios", "",
             "p50 latency in ms per batch. The whole-model variants of a target are timed in one interleaved "
             "loop; `head` (the fused head + adapter on image features) in a loop of its own. `fused` is the "
             "deployed graph; ratios are of medians.", ""]
    for target in dict.fromkeys(t for t, _, _ in grouped):
        keys = sorted(k for k in grouped if k[0] == target)
        variants = list(dict.fromkeys(v for k in keys for v in grouped[k]))
        ratio_names = list(dict.fromkeys(r for k in keys for r in ratios(grouped[k])))
        shape = ""
        if flops and target in flops["targets"]:
            info = flops["targets"][target]
            shape = (f" (d = {info['feature_dim']}, C = D = {info['logit_width']}, K = {info['classes']}, "
                     f"input {info['image_size'][0]} px; pairs: {', '.join(info['pairs'])})")
        lines += [f"### {target}{shape}", "",
                  "| runtime | batch | " + " | ".join(variants) + " | " + " | ".join(ratio_names) + " | fused img/s |",
                  "| --- | ---: | " + " | ".join("---:" for _ in variants + ratio_names) + " | ---: |"]
        for key in keys:
            row = grouped[key]
            ratio = ratios(row)
            throughput = f"{row['fused']['images_per_s']:.1f}" if "fused" in row else "-"
            lines.append(f"| {key[1]} | {key[2]} | "
                         + " | ".join(f"{row[v]['p50_ms']:.3f}" if v in row else "-" for v in variants) + " | "
                         + " | ".join(f"{ratio[r]:.3f}" if r in ratio else "-" for r in ratio_names)
                         + f" | {throughput} |")
        lines.append("")
    if latency.get("skipped"):
        lines += ["Not timed here: " + "; ".join(
            f"{s.get('variant', s['runtime'])}{' on ' + s['target'] if 'target' in s else ''} ({s['reason']})"
            for s in latency["skipped"]) + ".", ""]
    return lines


def flops_markdown(flops: dict) -> list[str]:
    lines = ["## Cost: multiply-accumulates counted from the exported graphs (batch 1)", "",
             "GFLOPs = 2 x MACs / 1e9. `head+adapter` is every node outside the image tower in the fused graph; "
             "EFT is the sum of its three graphs.", "",
             "| target | backbone alone GFLOPs | fused GFLOPs | head+adapter MFLOPs (fused) | overhead vs backbone alone "
             "| unfolded head MFLOPs | EFT GFLOPs (source) | EFT / fused |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for target, info in flops["targets"].items():
        variants = info["variants"]
        backbone, fused = variants["backbone"][0], variants["fused"][0]
        unfolded = variants["unfolded"][0] if "unfolded" in variants else None
        efts = {name: sum(part["total"] for part in parts) for name, parts in variants.items() if name.startswith("eft:")}
        overhead = 100 * (fused["total"] - backbone["total"]) / backbone["total"]
        eft_cells = ", ".join(f"{2 * macs / 1e9:.2f} ({name[4:]})" for name, macs in efts.items())
        eft_ratio = ", ".join(f"{macs / fused['total']:.2f}" for macs in efts.values())
        unfolded_cell = f"{2 * unfolded.get('head+adapter', 0) / 1e6:.2f}" if unfolded else "not built"
        lines.append(f"| {target} | {2 * backbone['total'] / 1e9:.3f} | {2 * fused['total'] / 1e9:.3f} | "
                     f"{2 * fused.get('head+adapter', 0) / 1e6:.2f} | {overhead:.4f}% | {unfolded_cell} | "
                     f"{eft_cells} | {eft_ratio} |")
    return lines + [""]


def accuracy_markdown(accuracy: dict) -> list[str]:
    lines = ["## Accuracy: the demo world (test split, trained demo models)", "",
             f"Settings: {accuracy['settings']}. Base / novel accuracy with the argmax over that half's classes; "
             "HM their harmonic mean.", "",
             "| task | model | base | novel | HM |", "| --- | --- | ---: | ---: | ---: |"]
    for row in accuracy["rows"]:
        lines.append(f"| {row['task']} | {row['model']} | {row['base']:.1f} | {row['novel']:.1f} | {row['hm']:.1f} |")
    return lines + [""]


def detail_markdown(latency: dict) -> list[str]:
    lines = ["## Every measurement", "",
             "| target | runtime | batch | variant | p50 ms | p90 ms | p99 ms | img/s | rounds | copies |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in latency["rows"]:
        lines.append(f"| {r['target']} | {r['runtime']} | {r['batch']} | {r['variant']} | {r['p50_ms']:.3f} | "
                     f"{r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['images_per_s']:.1f} | {r['rounds']} | "
                     f"{'host<->device' if r['includes_copies'] else '-'} |")
    return lines + [""]


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _batch_ticks(axis, batches: list[int]) -> None:
    """Log-scaled batch axis labelled with the measured batch sizes only."""
    from matplotlib.ticker import NullFormatter

    axis.set_xscale("log")
    axis.set_xticks(batches, [str(b) for b in batches])
    axis.xaxis.set_minor_formatter(NullFormatter())


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only), or DependencyError saying what to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DependencyError("plots need matplotlib: pip install 'transmiter-deploy[bench]' (or pass --no-plots)") from exc
    return plt


def save_figure(figure, path: Path) -> Path:
    """``figure`` written atomically as the PNG ``path``, then closed."""
    staging = path.with_name(f".{path.stem}.partial.png")
    figure.savefig(staging, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt  # a figure exists: matplotlib is there (pyplot())

    plt.close(figure)
    os.replace(staging, path)
    return path


def write_markdown(path: Path, text: str) -> Path:
    """``text`` written atomically as ``path`` (a results folder's RESULTS.md)."""
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)
    return path


def plot(latency: dict, out_dir: Path) -> list[Path]:
    """latency_<target>.png (p50 vs batch per runtime, backbone alone dashed) and overhead.png."""
    plt = pyplot()
    grouped = cells(latency)
    written = []

    def save(figure, name: str) -> None:
        written.append(save_figure(figure, out_dir / name))

    for target in dict.fromkeys(t for t, _, _ in grouped):
        runtimes = list(dict.fromkeys(r for t, r, _ in grouped if t == target))
        figure, axes = plt.subplots(1, len(runtimes), figsize=(5.2 * len(runtimes), 4.0), squeeze=False)
        for axis, runtime in zip(axes[0], runtimes):
            keys = sorted(k for k in grouped if k[0] == target and k[1] == runtime)
            batches = [k[2] for k in keys]
            for variant in dict.fromkeys(v for k in keys for v in grouped[k]):
                values = [grouped[k][variant]["p50_ms"] if variant in grouped[k] else np.nan for k in keys]
                style = {"color": "black", "linestyle": "--", "linewidth": 2} if variant == "backbone" else {"marker": "o"}
                axis.plot(batches, values, label=variant, **style)
            axis.set(xscale="log", yscale="log", xlabel="batch", ylabel="p50 latency (ms)", title=f"{target}, {runtime}")
            _batch_ticks(axis, batches)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
        save(figure, f"latency_{slug(target)}.png")

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    _batch_ticks(axis, sorted({b for _, _, b in grouped}))
    for target, runtime in dict.fromkeys((t, r) for t, r, _ in grouped):
        keys = sorted(k for k in grouped if k[:2] == (target, runtime) and {"fused", "backbone"} <= set(grouped[k]))
        if keys:
            axis.plot([k[2] for k in keys], [100 * (ratios(grouped[k])["fused/backbone"] - 1) for k in keys],
                      marker="o", label=f"{target}, {runtime}")
    axis.axhline(1.0, color="red", linestyle=":", label="1% target")
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set(xlabel="batch", ylabel="fused / backbone alone - 1 (%)",
             title="Latency overhead of the fused TransMiter head (p50)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    save(figure, "overhead.png")
    return written


def write_report(out_dir: Path, command: str, plots: bool = True) -> Path:
    """RESULTS.md (and plots) from whichever of latency/flops/accuracy.json are in ``out_dir``."""
    from .runtimes import GPU_RUNTIMES

    out_dir = Path(out_dir)
    latency, flops, accuracy = (_read(out_dir / f"{name}.json") for name in ("latency", "flops", "accuracy"))
    env = next((part["environment"] for part in (latency, flops, accuracy) if part), None)
    if env is None:
        raise InputError(f"no benchmark results in {out_dir}: run the benchmark first")
    commands = list(dict.fromkeys(part["environment"].get("command", "not recorded")
                                  for part in (latency, flops, accuracy) if part))
    lines = [f"# Benchmark results: {env['host_label']}", "",
             "Measured by: " + "; ".join(f"`{c}`" for c in commands) + f". Report written by `{command}`.", "",
             *_environment_lines(env), ""]
    if latency:
        lines += targets_table([*target_checks(latency, GPU_RUNTIMES), cpu_path_check(latency)])
        lines += ["", f"Latency sweep: {latency['seconds']:.0f} s.", ""]
        lines += latency_markdown(latency, flops)
        lines += cpu_paths_markdown(latency)
    if flops:
        lines += flops_markdown(flops)
    if accuracy:
        lines += accuracy_markdown(accuracy)
        lines += [f"Accuracy run: {accuracy['seconds']:.0f} s ({accuracy['environment']['date']}).", ""]
    if latency:
        if plots:
            images = plot(latency, out_dir)
            lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
        lines += detail_markdown(latency)
    return write_markdown(out_dir / "RESULTS.md", "\n".join(lines))
