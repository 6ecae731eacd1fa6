"""A small compositional image-text world, rendered with PIL from seeded scenes.

A scene is one object with a shape, colour, texture and size, at a random
position, on a background, drawn in a style: ``photo`` (filled, the
pretraining default), ``sketch`` (outline only), ``noisy`` (heavy sensor
noise) or ``dim`` (low light with a colour cast). Captions name the
attributes through several templates. Everything is a pure function of the
scene and its seed, so datasets are reproducible byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "cyan": (40, 200, 210), "pink": (240, 120, 180),
}
TEXTURES = ("solid", "striped", "dotted", "checkered", "hatched", "ringed")
SIZES = ("small", "large")
BACKGROUNDS = {"black": (15, 15, 15), "white": (235, 235, 235), "grey": (120, 120, 120), "sand": (200, 180, 140)}
STYLES = ("photo", "sketch", "noisy", "dim", "dusk", "tinted", "foggy")

CAPTION_TEMPLATES = (
    "a {style} of a {size} {colour} {texture} {shape} on a {background} background",
    "a {colour} {shape} with a {texture} pattern",
    "a {size} {shape} that is {colour}",
    "a {style} of a {texture} {colour} {shape}",
    "a {colour} {texture} {shape}",
)
STYLE_WORDS = {"photo": "photo", "sketch": "sketch", "noisy": "noisy photo", "dim": "dark photo",
               "dusk": "dark photo", "tinted": "photo", "foggy": "photo"}

HUE_SHIFT = 12  # of 256 (about 17 degrees): a white-balance fault
FOG = 0.5  # share of the fog's grey in every pixel
DUSK_CAST = (0.7, 0.6, 0.4)  # per-channel gain of warm low light
TINT_NOISE = 6.0
RENDER_SCALE = 2  # draw at twice the size, then downsample: cheap anti-aliasing


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    texture: str
    size: str
    background: str
    style: str
    x: float  # centre, as a fraction of the image side
    y: float
    rotation: float  # degrees
    seed: int  # drives noise and texture phase

    def caption(self, template: int) -> str:
        return CAPTION_TEMPLATES[template % len(CAPTION_TEMPLATES)].format(
            style=STYLE_WORDS[self.style], size=self.size, colour=self.colour, texture=self.texture,
            shape=self.shape, background=self.background,
        )


def sample_scene(rng: np.random.Generator, style: str = "photo", **fixed: str) -> Scene:
    """A random scene; keyword arguments pin attributes (e.g. ``shape="star"``)."""
    size = fixed.get("size") or str(rng.choice(SIZES))
    margin = 0.34 if size == "large" else 0.22
    return Scene(
        shape=fixed.get("shape") or str(rng.choice(SHAPES)),
        colour=fixed.get("colour") or str(rng.choice(list(COLOURS))),
        texture=fixed.get("texture") or str(rng.choice(TEXTURES)),
        size=size,
        background=fixed.get("background") or str(rng.choice(list(BACKGROUNDS))),
        style=style,
        x=float(rng.uniform(margin, 1 - margin)),
        y=float(rng.uniform(margin, 1 - margin)),
        rotation=float(rng.uniform(0, 360)),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def _outline(shape: str, cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    def polygon(count: int, offset: float = 0.0, radii: tuple[float, ...] = (1.0,)) -> list[tuple[float, float]]:
        points = []
        for i in range(count * len(radii)):
            angle = math.radians(rotation + offset + 360.0 * i / (count * len(radii)))
            r = radius * radii[i % len(radii)]
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        return points

    if shape == "square":
        return polygon(4, 45)
    if shape == "triangle":
        return polygon(3, -90)
    if shape == "diamond":
        return [(cx, cy - radius), (cx + 0.6 * radius, cy), (cx, cy + radius), (cx - 0.6 * radius, cy)]
    if shape == "hexagon":
        return polygon(6)
    if shape == "star":
        return polygon(5, -90, radii=(1.0, 0.42))
    if shape == "cross":
        w = 0.33 * radius
        arms = [(-w, -radius), (w, -radius), (w, -w), (radius, -w), (radius, w), (w, w), (w, radius),
                (-w, radius), (-w, w), (-radius, w), (-radius, -w), (-w, -w)]
        angle = math.radians(rotation)
        return [(cx + px * math.cos(angle) - py * math.sin(angle), cy + px * math.sin(angle) + py * math.cos(angle))
                for px, py in arms]
    return polygon(48)  # circle and ring


def _texture(texture: str, colour: tuple[int, int, int], side: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB fill pattern of the object's colour over a side x side canvas."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    period = side / 8
    phase = rng.uniform(0, period)
    if texture == "striped":
        on = ((xx + phase) // (period / 2)) % 2 == 0
    elif texture == "dotted":
        on = ((((xx + phase) % period) - period / 2) ** 2 + (((yy + phase) % period) - period / 2) ** 2) < (period / 3.2) ** 2
    elif texture == "checkered":
        on = (((xx + phase) // (period / 2)) + ((yy + phase) // (period / 2))) % 2 == 0
    elif texture == "hatched":
        on = ((xx + yy + phase) // (period / 2)) % 2 == 0
    elif texture == "ringed":
        on = (np.sqrt((xx - side / 2) ** 2 + (yy - side / 2) ** 2) // (period / 2)) % 2 == 0
    else:
        on = np.ones_like(xx, dtype=bool)
    base = np.array(colour, dtype=np.float32)
    # the pattern's second tone: a dark shade of light colours, a light tint of dark ones
    pale = np.clip(base * 0.3, 0, 255) if np.mean(colour) >= 128 else np.clip(base + 150, 0, 255)
    return np.where(on[..., None], base, pale).astype(np.uint8)


def _light(canvas: np.ndarray, style: str, rng: np.random.Generator) -> np.ndarray:
    """The camera and lighting of a style, applied to the drawn scene (float RGB)."""
    if style == "noisy":
        return canvas + rng.normal(0, 60, size=canvas.shape)
    if style == "dim":  # a random cast per image: lighting variety for pretraining
        cast = np.array([0.35, 0.6, 0.9], dtype=np.float32)[rng.permutation(3)]
        return canvas * cast * 0.5 + 20
    if style == "dusk":  # one warm cast for every image: errors are systematic, as a real shift's are
        return canvas * np.array(DUSK_CAST, dtype=np.float32) + 12 + rng.normal(0, TINT_NOISE, size=canvas.shape)
    if style == "foggy":
        return (1 - FOG) * canvas + FOG * 170.0 + rng.normal(0, 4, size=canvas.shape)
    if style == "tinted":
        return canvas + rng.normal(0, TINT_NOISE, size=canvas.shape)
    return canvas + rng.normal(0, 6, size=canvas.shape)


def render(scene: Scene, size: int = 48) -> Image.Image:
    """Render a scene to an RGB image of ``size`` x ``size`` pixels."""
    rng = np.random.default_rng(scene.seed)
    side = size * RENDER_SCALE
    background = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    canvas = np.broadcast_to(background, (side, side, 3)).copy()
    radius = side * (0.32 if scene.size == "large" else 0.2)
    cx, cy = scene.x * side, scene.y * side
    points = _outline(scene.shape, cx, cy, radius, scene.rotation)
    mask_image = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask_image)
    if scene.style == "sketch":
        draw.line(points + [points[0]], fill=255, width=max(3, side // 20))
        if scene.shape == "ring":
            inner = _outline("circle", cx, cy, radius * 0.5, scene.rotation)
            draw.line(inner + [inner[0]], fill=255, width=max(3, side // 20))
    else:
        draw.polygon(points, fill=255)
        if scene.shape == "ring":
            draw.polygon(_outline("circle", cx, cy, radius * 0.5, scene.rotation), fill=0)
    mask = np.asarray(mask_image, dtype=np.float32)[..., None] / 255.0
    colour = COLOURS[scene.colour]
    fill = np.array(colour, dtype=np.float32) if scene.style == "sketch" else _texture(scene.texture, colour, side, rng).astype(np.float32)
    canvas = canvas * (1 - mask) + fill * mask
    canvas = _light(canvas, scene.style, rng)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    if scene.style == "tinted":
        hsv = np.asarray(image.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + HUE_SHIFT) % 256
        image = Image.fromarray(hsv, "HSV").convert("RGB")
    return image.resize((size, size), Image.Resampling.BILINEAR)
