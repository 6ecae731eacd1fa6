"""Latency of the C++ head backend vs the Python ONNX Runtime head, batch 1, one thread.

Reference sizes (docs/method.md, "Deployment algebra"): d = 768, C = D = 1024, K = 100, one adapter block.
Weights are random (latency does not depend on their values): a CLIP-like zero-shot head and
an adapter with a perturbed MLP, folded by FoldedHead and written with the export's own
functions (write_head_safetensors, to_onnx, write_manifest). The C++ side is
cpp/tests/head_bench.cpp (build: `make cpp`); ONNX Runtime runs head.onnx with
intra_op_num_threads=1, sequential execution. Both get the same random feature vector and
their logits are compared.

    .venv/bin/python benchmarks/cpp_head.py [--build build/cpp] [--iterations 500]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transmiter_deploy.artifacts import sha256_file, write_manifest  # noqa: E402
from transmiter_deploy.deploy.fusion import FoldedHead  # noqa: E402
from transmiter_deploy.deploy.head_weights import HEAD_FILE, write_head_safetensors  # noqa: E402
from transmiter_deploy.host import cpu_model  # noqa: E402
from transmiter_deploy.features.models import ModelIdentity  # noqa: E402
from transmiter_deploy.benchmark.bank_graphs import synthetic_folded_head  # noqa: E402
from transmiter_deploy.deploy.export_format import FORMAT, FORMAT_VERSION  # noqa: E402
from transmiter_deploy.deploy.trace import to_onnx  # noqa: E402


def reference_head(d: int, width: int, latent: int, k: int, seed: int = 0) -> FoldedHead:
    return synthetic_folded_head(d, width, k, seed, ModelIdentity("ViT-L-14", init_seed=seed), latent_dim=latent,
                                 mlp_scale=0.05, source=ModelIdentity("ViT-B-16", init_seed=seed))


def write_export(folded: FoldedHead, out: Path, d: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    features = torch.nn.functional.normalize(torch.randn(2, d), dim=-1)
    import onnx

    onnx.save(to_onnx(folded, features, "image_features", "logits", 17, "reference head"), out / "head.onnx")
    write_head_safetensors(folded, out / HEAD_FILE)
    files = {name: {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size} for name in ("head.onnx", HEAD_FILE)}
    write_manifest(out / "manifest.json", FORMAT, FORMAT_VERSION, {
        "files": files, "output": "logits", "class_names": [f"class {i}" for i in range(folded.num_task_classes)],
        "preprocess": {"image_size": [224, 224], "mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                       "resize_mode": "shortest", "crop": "center", "rescale_factor": 1 / 255, "layout": "NCHW",
                       "color_order": "RGB"},
        "feature_dim": d,
    })
    return out / "manifest.json"


def time_calls(call, iterations: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    q = lambda p: ordered[int(p * (len(ordered) - 1))]  # noqa: E731
    return {"median_ms": statistics.median(ordered), "p10_ms": q(0.1), "p90_ms": q(0.9), "min_ms": ordered[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=ROOT / "build" / "cpp")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu-2core")
    args = parser.parse_args()
    d, width, latent, k = 768, 1024, 1024, 100
    torch.manual_seed(0)
    torch.set_num_threads(1)
    bench = args.build / "head_bench"
    infer = args.build / "transmiter_infer"
    if not bench.is_file():
        print(f"{bench} not found: build the C++ runtime first (make cpp)", file=sys.stderr)
        return 3
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        folded = reference_head(d, width, latent, k)
        manifest = write_export(folded, Path(tmp) / "export", d)
        feature = np.random.default_rng(0).standard_normal((1, d)).astype(np.float32)
        normalised = feature / np.linalg.norm(feature)

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(str(manifest.parent / "head.onnx"), options, providers=["CPUExecutionProvider"])
        ort_logits = session.run(None, {"image_features": normalised})[0]
        ort_times = time_calls(lambda: session.run(None, {"image_features": normalised}), args.iterations, args.warmup)
        with torch.no_grad():
            tensor = torch.from_numpy(normalised)
            torch_times = time_calls(lambda: folded(tensor), args.iterations, args.warmup)

        np.save(Path(tmp) / "feature.npy", feature)
        subprocess.run([str(infer), "--manifest", str(manifest), "--features", str(Path(tmp) / "feature.npy"),
                        "--logits-out", str(Path(tmp) / "cpp.npy"), "--quiet"], check=True)
        parity = float(np.abs(np.load(Path(tmp) / "cpp.npy") - ort_logits).max())
        cpp = json.loads(subprocess.run([str(bench), str(manifest), "--batch", "1", "--iterations", str(args.iterations),
                                         "--warmup", str(args.warmup)], check=True, capture_output=True, text=True).stdout)
        head_bytes = (manifest.parent / HEAD_FILE).stat().st_size

    macs = d * latent + 8 * latent * latent + latent * k
    result = {
        "what": "fused TransMiter head, image features -> K logits, batch 1, one thread",
        "sizes": {"d": d, "C": width, "D": latent, "K": k, "layers": 1, "mlp_ratio": 4},
        "macs": macs, "weights_mb": round(head_bytes / 1e6, 1),
        "host": {"cpu": cpu_model(), "machine": platform.machine(), "python": platform.python_version(),
                 "onnxruntime": ort.__version__, "torch": torch.__version__},
        "iterations": args.iterations, "warmup": args.warmup,
        "cpp_head_backend": {k_: cpp[k_] for k_ in ("median_ms", "p10_ms", "p90_ms", "min_ms")},
        "python_onnxruntime_head_onnx": summary(ort_times),
        "python_torch_folded_head": summary(torch_times),
        "cpp_vs_onnxruntime_max_abs_logit_diff": parity,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpp_head.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [("C++ head backend (head.safetensors)", result["cpp_head_backend"]),
            ("ONNX Runtime head.onnx (Python, 1 thread)", result["python_onnxruntime_head_onnx"]),
            ("PyTorch FoldedHead (1 thread)", result["python_torch_folded_head"])]
    lines = [f"# Head backend latency: batch 1, one thread ({cpu_model()})", "",
             f"d = {d}, C = D = {width}, K = {k}, one block (MLP ratio 4): {macs / 1e6:.2f} M MACs, "
             f"{result['weights_mb']} MB of fp32 weights. Random weights; {args.iterations} timed calls after "
             f"{args.warmup} warm-up calls. `benchmarks/cpp_head.py`.", "",
             "| runtime | median ms | p10 ms | p90 ms |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {r['median_ms']:.3f} | {r['p10_ms']:.3f} | {r['p90_ms']:.3f} |" for name, r in rows]
    lines += ["", f"C++ vs ONNX Runtime logits on the same feature: max abs diff {parity:.2e}. The C++ figure is "
              "the library call (`cpp/tests/head_bench.cpp`, build type Release, baseline x86-64 code with an AVX2 "
              "clone of the GEMV chosen at run time); the Python figures include the interpreter's call overhead."]
    (args.out / "cpp_head.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
