"""Peak memory, time and size of the int8 conversion (ModelOpt PTQ) of an exported graph.

Each conversion runs in a fresh process and reports its own peak resident memory (VmHWM), so
the figures are what a user's machine must hold. Random calibration pixels (the benchmark's
graphs have random weights; memory and time do not depend on values).

    python benchmarks/int8_memory.py build/bench/graphs/ViT-L-14-C1024-K100-s0-fused.onnx \\
        --images 32 --images 128 --per-node --out benchmarks/results/cpu-2core-precisions-vit-l-14/int8_memory.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import time
from pathlib import Path


def convert(graph: str, images: int, per_node: bool) -> dict:
    import numpy as np
    import onnx

    from transmiter_deploy.deploy.precisions.int8 import convert as to_int8

    model = onnx.load(graph, load_external_data=False)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    name = model.graph.input[0].name
    del model
    pixels = np.random.default_rng(0).standard_normal((images, *dims)).astype(np.float32)
    start = time.perf_counter()
    converted = to_int8(Path(graph), {name: pixels}, per_node=per_node)
    seconds = time.perf_counter() - start
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    qdq = sum(node.op_type == "QuantizeLinear" for node in converted.graph.node)
    dq = sum(node.op_type == "DequantizeLinear" for node in converted.graph.node)
    fp32_bytes = Path(graph).stat().st_size  # a graph without external data: the file is the graph
    return {"graph": Path(graph).name, "graph_mib": round(fp32_bytes / 2**20, 1),
            "calibration_images": images, "calibrate_per_node": per_node, "seconds": round(seconds, 1),
            "peak_rss_mib": round(peak, 1), "quantize_linear_nodes": qdq, "dequantize_linear_nodes": dq,
            "int8_graph_mib": round(converted.ByteSize() / 2**20, 1),
            "int8_bytes_vs_fp32": round(converted.ByteSize() / fp32_bytes, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graph")
    parser.add_argument("--images", type=int, action="append", required=True)
    parser.add_argument("--per-node", action="store_true", help="also measure calibrate_per_node=True")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for images in args.images:
        for per_node in ([False, True] if args.per_node else [False]):
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                try:
                    row = pool.submit(convert, args.graph, images, per_node).result()
                except concurrent.futures.process.BrokenProcessPool:
                    row = {"graph": Path(args.graph).name, "calibration_images": images,
                           "calibrate_per_node": per_node, "error": "the conversion process died (out of memory?)"}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
