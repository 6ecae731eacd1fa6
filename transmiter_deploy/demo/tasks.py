"""Downstream tasks over the demo world, in the style of the paper's datasets.

Each task classifies one attribute in a shifted domain the pretraining never
saw (fog, warm dusk light, a white-balance fault), so zero-shot is imperfect
and fine-tuning helps. Each shift is systematic, as a real camera's or
lighting's is: it moves every image of a class the same way. Classes keep a fixed order; the first half are the
base classes, the rest novel. Splits are disjoint seeded streams of scenes:
``train`` (used without labels), ``fewshot`` (labelled shots), ``val`` (for
choosing settings), ``test`` (for reporting only), and ``finetune`` (the
labelled base-class data the weak source is fine-tuned on).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .world import COLOURS, SHAPES, TEXTURES, Scene, render, sample_scene

# "val" is where the world's settings (shift strengths, the teacher's weight mix) were chosen;
# "test" is reported and was never looked at while choosing.
SPLIT_SEEDS = {"train": 1, "fewshot": 2, "val": 3, "finetune": 4, "test": 5}


@dataclass(frozen=True)
class DemoTask:
    name: str
    attribute: str  # "shape" | "texture" | "colour"
    classes: tuple[str, ...]
    style: str  # the domain shift
    templates: tuple[str, ...]  # zero-shot prompts, "{}" = class name

    @property
    def num_base(self) -> int:
        return (len(self.classes) + 1) // 2

    def scenes(self, split: str, per_class: int, seed: int = 0, base_only: bool = False) -> list[tuple[Scene, int]]:
        if split not in SPLIT_SEEDS:
            raise InputError(f"unknown split '{split}' (known: {', '.join(SPLIT_SEEDS)})")
        rng = np.random.default_rng([seed, SPLIT_SEEDS[split], sum(map(ord, self.name))])
        classes = self.classes[: self.num_base] if base_only else self.classes
        scenes = []
        for _ in range(per_class):
            for label, name in enumerate(classes):
                scenes.append((sample_scene(rng, self.style, **{self.attribute: name}), label))
        return scenes


COLOUR_ORDER = ("red", "orange", "yellow", "pink", "green", "cyan", "blue", "purple")

TASKS = {
    task.name: task
    for task in (
        DemoTask("textures-foggy", "texture", TEXTURES, "foggy",
                 ("a photo of a {} shape", "a photo of something {}", "a shape with a {} pattern")),
        DemoTask("colours-dusk", "colour", COLOUR_ORDER, "dusk",
                 ("a dark photo of a {} shape", "a dark photo of something {}", "a {} shape")),
        DemoTask("colours-tinted", "colour", COLOUR_ORDER, "tinted",
                 ("a photo of a {} shape", "a photo of something {}", "a {} shape")),
    )
}


def get_task(name: str) -> DemoTask:
    if name not in TASKS:
        raise InputError(f"unknown demo task '{name}' (known: {', '.join(TASKS)})")
    return TASKS[name]


def write_split(task: DemoTask, split: str, out_dir: Path, per_class: int, size: int = 48, seed: int = 0,
                base_only: bool = False, progress: bool = False) -> Path:
    """Render a split as an ImageFolder tree (class directories in task order via a classes.txt)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    scenes = task.scenes(split, per_class, seed, base_only)
    for index, (scene, label) in enumerate(tqdm(scenes, desc=f"render {task.name} {split}", unit="img",
                                                disable=not progress)):
        class_dir = out_dir / task.classes[label]
        class_dir.mkdir(parents=True, exist_ok=True)
        render(scene, size).save(class_dir / f"{index:05d}.png")
    (out_dir.parent / f"{task.name}-classes.txt").write_text("\n".join(task.classes) + "\n", encoding="utf-8")
    return out_dir


def demo_words() -> list[str]:
    """Every word the world's captions and the tasks' prompts can use (the tokenizer's vocabulary)."""
    from .world import BACKGROUNDS, CAPTION_TEMPLATES, SIZES, STYLE_WORDS

    text = " ".join([*CAPTION_TEMPLATES, *SHAPES, *COLOURS, *TEXTURES, *SIZES, *BACKGROUNDS,
                     *STYLE_WORDS.values(), *(t for task in TASKS.values() for t in task.templates)])
    text = re.sub(r"\{[a-z]*\}", " ", text)
    return sorted({word for word in text.lower().split() if word.isalpha()})


def auxiliary_phrases() -> list[str]:
    """Class-like phrases the demo text towers can read, for padding heads to a fixed width."""
    from .world import BACKGROUNDS, SIZES

    phrases = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    phrases += [f"{texture} {shape}" for texture in TEXTURES for shape in SHAPES]
    phrases += [f"{size} {colour} shape" for size in SIZES for colour in COLOURS]
    phrases += [f"{colour} shape on a {background} background" for colour in COLOURS for background in BACKGROUNDS]
    return sorted(set(phrases))
