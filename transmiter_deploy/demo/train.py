"""Train the demo world's CLIP models from scratch: ``make demo-weights``.

1. Render a pretraining set: random scenes, mostly ``photo`` style with a
   small share of sketches, sensor noise and random colour casts, each with
   captions from several templates. The tasks' own shifts (fog, dusk light, a
   white-balance fault) never appear in pretraining.
2. Train the weak source (TM-Demo-Source) and the stronger target
   (TM-Demo-Target) contrastively (open_clip's ClipLoss) for fixed step counts.
3. Fine-tune the source's image tower per task on labelled base-class images
   (cross-entropy against its own frozen zero-shot head), then mix the result
   with the zero-shot weights (WiSE-FT): the cheap step the paper assumes the
   user already did; its logits are the distillation teacher.
4. Write every model as fp16 safetensors plus a JSON log of settings and timings.

``--add TM-Demo-Large --towers DIR`` (``make demo-weights-large``) trains one more target alone on
the same pretraining set, beside a copy of DIR's files (byte for byte), and records it in the
manifest: the models already shipped, and every figure made from them, stay as they were.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..artifacts import atomic_directory
from ..features.models import LoadedModel, ModelSpec, load_model
from .tasks import TASKS, DemoTask
from .weights import LARGE, SOURCE, TARGET, finetuned_name, write_weights_manifest
from .world import CAPTION_TEMPLATES, sample_scene
from .zero_shot import class_head, reference_accuracy, render_many, to_pixels

STYLE_MIX = {"photo": 0.91, "sketch": 0.03, "noisy": 0.03, "dim": 0.03}


@dataclass(frozen=True)
class PretrainSettings:
    steps: int = 300  # a step count, not a time budget: the same on every machine
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    seed: int = 0


@dataclass(frozen=True)
class FinetuneSettings:
    per_class: int = 200
    epochs: int = 8
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    # WiSE-FT (Wortsman et al., 2022): the teacher is this mix of fine-tuned and zero-shot
    # weights; 1.0 keeps the plain fine-tuned weights. Mixing keeps novel classes alive.
    weight_mix: float = 0.4
    seed: int = 0


def pretraining_set(count: int, seed: int, size: int = 48):
    rng = np.random.default_rng(seed)
    styles = rng.choice(list(STYLE_MIX), size=count, p=list(STYLE_MIX.values()))
    scenes = [sample_scene(rng, str(style)) for style in styles]
    return scenes, render_many(scenes, size)


def pretrain(model: LoadedModel, scenes, images: torch.Tensor, settings: PretrainSettings, log=print) -> dict:
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    net = model.model
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    loss_fn = open_clip.ClipLoss()
    start, losses = time.perf_counter(), []
    for step in range(settings.steps):
        progress = step / settings.steps
        warm = min(1.0, (step + 1) / settings.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
        index = torch.from_numpy(rng.integers(0, len(scenes), size=settings.batch_size))
        captions = [scenes[i].caption(int(rng.integers(0, len(CAPTION_TEMPLATES)))) for i in index.tolist()]
        image_features, text_features, logit_scale = net(to_pixels(images[index], model), model.tokenizer(captions))[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            net.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0:
            log(f"  {model.identity.name} step {step + 1}/{settings.steps} loss {np.mean(losses[-50:]):.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    net.eval()
    return {"steps": settings.steps, "seconds": time.perf_counter() - start, "final_loss": float(np.mean(losses[-50:]))}


def finetune(model: LoadedModel, task: DemoTask, settings: FinetuneSettings, log=print) -> LoadedModel:
    tuned = copy.copy(model)
    tuned.model = copy.deepcopy(model.model)
    base = task.classes[: task.num_base]
    head = class_head(tuned, task, base)
    scenes = task.scenes("finetune", settings.per_class, settings.seed, base_only=True)
    images = render_many([scene for scene, _ in scenes], tuned.preprocess_config["image_size"][0])
    labels = torch.tensor([label for _, label in scenes])
    visual = tuned.model.visual
    visual.train()
    optimizer = torch.optim.AdamW(visual.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    for epoch in range(settings.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            features = F.normalize(visual(to_pixels(images[batch], tuned)), dim=-1)
            loss = F.cross_entropy(features @ head.T, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        log(f"  fine-tune {task.name} epoch {epoch + 1} loss {float(loss.detach()):.3f}")
    visual.eval()
    if settings.weight_mix != 1.0:
        start_state = model.model.visual.state_dict()
        mixed = {name: torch.lerp(start_state[name].float(), value.float(), settings.weight_mix).to(value.dtype)
                 if value.is_floating_point() else value for name, value in visual.state_dict().items()}
        visual.load_state_dict(mixed)
    return tuned


def save_weights(model: LoadedModel, path: Path) -> None:
    state = {name: tensor.detach().half().contiguous() for name, tensor in model.model.state_dict().items()}
    save_file(state, str(path))


def round_to_fp16(model: LoadedModel) -> None:
    """Give the in-memory model the values its fp16 file holds, so that fine-tuning from
    memory and fine-tuning from the shipped file (``--towers``) start from the same weights."""
    with torch.no_grad():
        for tensor in model.model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source-steps", type=int, default=300)
    parser.add_argument("--target-steps", type=int, default=400)
    parser.add_argument("--pretrain-images", type=int, default=40_000)
    parser.add_argument("--towers", type=Path,
                        help="reuse the pretrained source and target from this weights directory; "
                             "only the per-task fine-tunes are redone")
    parser.add_argument("--add", choices=[LARGE],
                        help="train only this model and add it to a copy of --towers' weights directory")
    parser.add_argument("--add-steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    say = lambda line: print(line, flush=True)  # noqa: E731
    if args.add is not None:
        if args.towers is None:
            parser.error("--add needs --towers (the weights directory to add the model to)")
        return add_model(args, say)
    finetune_settings = FinetuneSettings(seed=args.seed)
    log_lines: dict = {"seed": args.seed, "threads": args.threads, "style_mix": STYLE_MIX,
                       "finetune": asdict(finetune_settings), "torch": torch.__version__}
    if args.towers is None:
        scenes, images = pretraining_set(args.pretrain_images, args.seed)
        say(f"rendered {len(scenes)} pretraining images in {time.perf_counter() - started:.0f} s")
    # all weights appear together or not at all (the previous set survives a failure)
    with atomic_directory(args.out, "manifest.json") as staging:
        for name, steps in ((SOURCE, args.source_steps), (TARGET, args.target_steps)):
            if args.towers is not None:
                model = load_model(ModelSpec(name, checkpoint=args.towers / f"{name}.safetensors"))
                log_lines[name] = {"reused": str(args.towers / f"{name}.safetensors")}
            else:
                model = load_model(ModelSpec(name, init_seed=args.seed))
                settings = PretrainSettings(steps=steps, seed=args.seed)
                log_lines[name] = {"settings": asdict(settings), **pretrain(model, scenes, images, settings, log=say)}
                round_to_fp16(model)
            save_weights(model, staging / f"{name}.safetensors")
            if name == SOURCE:
                for task in TASKS.values():
                    tuned = finetune(model, task, finetune_settings, log=say)
                    save_weights(tuned, staging / f"{finetuned_name(task.name)}.safetensors")
        log_lines["total_seconds"] = time.perf_counter() - started
        (staging / "training_log.json").write_text(json.dumps(log_lines, indent=2) + "\n")
        write_weights_manifest(staging, list(TASKS), reference_accuracy(staging, list(TASKS.values())))
    say(f"done in {log_lines['total_seconds']:.0f} s -> {args.out}")
    return 0


def add_model(args: argparse.Namespace, say) -> int:
    """One more pretrained target beside the files of ``args.towers`` (copied unchanged), on the
    pretraining set the others saw (same count, same seed)."""
    import shutil

    started = time.perf_counter()
    scenes, images = pretraining_set(args.pretrain_images, args.seed)
    say(f"rendered {len(scenes)} pretraining images in {time.perf_counter() - started:.0f} s")
    log_lines = json.loads((args.towers / "training_log.json").read_text())
    tasks = json.loads((args.towers / "manifest.json").read_text())["tasks"]
    with atomic_directory(args.out, "manifest.json") as staging:
        for path in sorted(args.towers.glob("*.safetensors")):
            if path.stem != args.add:
                shutil.copyfile(path, staging / path.name)
        model = load_model(ModelSpec(args.add, init_seed=args.seed))
        settings = PretrainSettings(steps=args.add_steps, seed=args.seed)
        log_lines[args.add] = {"settings": asdict(settings), "threads": args.threads,
                               **pretrain(model, scenes, images, settings, log=say)}
        round_to_fp16(model)
        save_weights(model, staging / f"{args.add}.safetensors")
        (staging / "training_log.json").write_text(json.dumps(log_lines, indent=2) + "\n")
        write_weights_manifest(staging, tasks, reference_accuracy(staging, [TASKS[name] for name in tasks]))
    say(f"added {args.add} in {time.perf_counter() - started:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
