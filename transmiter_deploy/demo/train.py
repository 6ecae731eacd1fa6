"""Train the demo world's CLIP models from scratch: ``make demo-weights``.

1. Render a pretraining set: random scenes, mostly ``photo`` style with a
   small share of every shifted style (so zero-shot on the tasks starts above
   chance), each with captions from several templates.
2. Train the weak source (TM-Demo-Source) and the stronger target
   (TM-Demo-Target) contrastively (open_clip's ClipLoss), each for a time budget.
3. Fine-tune the source's image tower per task on labelled base-class images
   (cross-entropy against its own frozen zero-shot head): the cheap step the
   paper assumes the user already did; its logits are the distillation teacher.
4. Write every model as fp16 safetensors plus a JSON log of settings and timings.
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
from ..models import LoadedModel, ModelSpec, load_model
from .tasks import TASKS, DemoTask
from .world import CAPTION_TEMPLATES, render, sample_scene

STYLE_MIX = {"photo": 0.91, "sketch": 0.03, "noisy": 0.03, "dim": 0.03}


@dataclass(frozen=True)
class PretrainSettings:
    seconds: float = 300.0
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
    seed: int = 0


def render_many(scenes, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3)."""
    return torch.from_numpy(np.stack([np.asarray(render(scene, size)) for scene in scenes]))


def pretraining_set(count: int, seed: int, size: int = 48):
    rng = np.random.default_rng(seed)
    styles = rng.choice(list(STYLE_MIX), size=count, p=list(STYLE_MIX.values()))
    scenes = [sample_scene(rng, str(style)) for style in styles]
    return scenes, render_many(scenes, size)


def to_pixels(images: torch.Tensor, model: LoadedModel) -> torch.Tensor:
    """The model's own eval preprocessing for images already at its input size."""
    mean = torch.tensor(model.preprocess_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocess_config["std"]).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def pretrain(model: LoadedModel, scenes, images: torch.Tensor, settings: PretrainSettings, log=print) -> dict:
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    net = model.model
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    loss_fn = open_clip.ClipLoss()
    start, step, losses = time.perf_counter(), 0, []
    while (elapsed := time.perf_counter() - start) < settings.seconds:
        # time-based cosine: the budget, not a step count, is what is fixed
        progress = elapsed / settings.seconds
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
        step += 1
        if step % 50 == 0:
            log(f"  {model.identity.name} step {step} loss {np.mean(losses[-50:]):.3f} ({elapsed:.0f} s)")
    net.eval()
    return {"steps": step, "seconds": time.perf_counter() - start, "final_loss": float(np.mean(losses[-50:]))}


@torch.no_grad()
def class_head(model: LoadedModel, task: DemoTask, classes: tuple[str, ...]) -> torch.Tensor:
    rows = []
    for name in classes:
        embedding = model.encode_texts([template.format(name) for template in task.templates]).mean(0)
        rows.append(F.normalize(embedding, dim=-1))
    return torch.stack(rows) * model.logit_scale


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
    return tuned


def save_weights(model: LoadedModel, path: Path) -> None:
    state = {name: tensor.detach().half().contiguous() for name, tensor in model.model.state_dict().items()}
    save_file(state, str(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source-seconds", type=float, default=270.0)
    parser.add_argument("--target-seconds", type=float, default=540.0)
    parser.add_argument("--pretrain-images", type=int, default=40_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    log_lines: dict = {"seed": args.seed, "style_mix": STYLE_MIX, "finetune": asdict(FinetuneSettings(seed=args.seed))}
    scenes, images = pretraining_set(args.pretrain_images, args.seed)
    print(f"rendered {len(scenes)} pretraining images in {time.perf_counter() - started:.0f} s", flush=True)
    # all weights appear together or not at all (the previous set survives a failure)
    with atomic_directory(args.out, "training_log.json") as staging:
        for name, seconds in (("TM-Demo-Source", args.source_seconds), ("TM-Demo-Target", args.target_seconds)):
            model = load_model(ModelSpec(name, init_seed=args.seed))
            settings = PretrainSettings(seconds=seconds, seed=args.seed)
            log_lines[name] = {"settings": asdict(settings), **pretrain(model, scenes, images, settings,
                                                                        log=lambda s: print(s, flush=True))}
            save_weights(model, staging / f"{name}.safetensors")
            if name == "TM-Demo-Source":
                for task in TASKS.values():
                    tuned = finetune(model, task, FinetuneSettings(seed=args.seed), log=lambda s: print(s, flush=True))
                    save_weights(tuned, staging / f"TM-Demo-Source-ft-{task.name}.safetensors")
        log_lines["total_seconds"] = time.perf_counter() - started
        (staging / "training_log.json").write_text(json.dumps(log_lines, indent=2) + "\n")
    print(f"done in {log_lines['total_seconds']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
