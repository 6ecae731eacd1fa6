"""int8 on every demo task: the export's accuracy gate, the int8 graph's size, and how the
calibration choices move agreement.

For each task of the demo world, the default recipe (`export/recipes/demo.yaml`) with that task
and its fine-tuned teacher is exported with int8 into build/int8-demo-tasks/<task>/ (a failed
gate is a result here, not an error). Then the fp32 graph's test predictions are compared with
int8 graphs calibrated by entropy and by max on 128 and 512 training images.

    python benchmarks/int8_demo_tasks.py --out benchmarks/results/cpu-2core-precisions/int8_demo_tasks.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    import onnx
    import torch

    import transmiter_deploy.deploy.precisions.int8 as int8
    from transmiter_deploy.demo.tasks import TASKS
    from transmiter_deploy.deploy.calibration import sample_calibration
    from transmiter_deploy.errors import VerificationError
    from transmiter_deploy.features.datasets import decode_image, open_dataset
    from transmiter_deploy.features.models import load_model
    from transmiter_deploy.pipeline.export import run_export
    from transmiter_deploy.pipeline.export_run import model_specs
    from transmiter_deploy.pipeline.recipe import load_recipe
    from transmiter_deploy.runtimes.onnxruntime import ort_session, run_session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "int8-demo-tasks")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    base = (ROOT / "export" / "recipes" / "demo.yaml").read_text(encoding="utf-8")
    rows = []
    for task in TASKS:
        text = re.sub(r"colours-tinted", task, base).replace("name: demo\n", f"name: demo-{task}\n")
        recipe_path = args.work / f"{task}.yaml"
        recipe_path.parent.mkdir(parents=True, exist_ok=True)
        recipe_path.write_text(text, encoding="utf-8")
        recipe, out = load_recipe(recipe_path), args.work / task
        try:
            gate = run_export(recipe, out, progress=False, log=lambda _: None).gates[0]
        except VerificationError:
            gate = json.loads((out / "gates" / "int8.json").read_text())
        model = load_model(model_specs(recipe)["target"])
        names = json.loads((out / "onnx" / "manifest.json").read_text())["class_names"]
        test = open_dataset(out / "data" / "test", names)
        pixels = torch.stack([model.preprocess(decode_image(r.path)[0]) for r in test.records]).numpy()
        reference = run_session(ort_session(out / "onnx" / "model.onnx"), pixels)
        variants = {}
        for method in ("entropy", "max"):
            for images in (128, 512):
                int8.CALIBRATION_METHOD = method
                calibration = sample_calibration(model, out / "data" / "train", images)
                onnx.save(int8.convert(out / "onnx" / "model.onnx", {"pixel_values": calibration.pixels.numpy()}),
                          args.work / "probe.onnx")
                candidate = run_session(ort_session(args.work / "probe.onnx"), pixels)
                variants[f"{method}/{images}"] = float((reference.argmax(1) == candidate.argmax(1)).mean())
                print(task, method, images, f"{variants[f'{method}/{images}']:.4f}", flush=True)
        int8.CALIBRATION_METHOD = "entropy"
        manifest = json.loads((out / "onnx" / "manifest.json").read_text())
        int8_file = out / "onnx" / "model_int8.onnx"
        size = int8_file.stat().st_size / (out / "onnx" / "model.onnx").stat().st_size if int8_file.exists() else None
        rows.append({"task": task, "gate": gate, "int8_bytes_vs_fp32": size and round(size, 3),
                     "fp32_nodes_kept": manifest.get("fp32_nodes_kept", {}).get("int8", []),
                     "agreement_by_calibration": variants})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
