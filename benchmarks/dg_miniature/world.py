"""The synthetic world: street scenes (sky, building, road, vegetation, vehicle) whose layouts are drawn once and can
be rendered in any visual style: the flat-shaded source style, six unseen target styles that differ from it the way
real images differ from synthetic ones, and random styles for the foundation's pretraining."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import datasets
import numpy as np
from PIL import Image, ImageFilter

CLASS_NAMES = ("sky", "building", "road", "vegetation", "vehicle")
SKY, BUILDING, ROAD, VEGETATION, VEHICLE = range(len(CLASS_NAMES))


@dataclass(frozen=True)
class Layout:
    labels: np.ndarray  # [H, W] class ids
    instances: np.ndarray  # [H, W] instance ids; instance k has class instance_classes[k]
    instance_classes: tuple[int, ...]


def draw_layout(rng: np.random.Generator, side: int) -> Layout:
    """A street: sky above a horizon, road below, buildings standing on the horizon, trees in front of them, and
    vehicles on the road that grow with nearness (lower in the image). Later shapes cover earlier ones."""
    rows, cols = np.mgrid[0:side, 0:side]
    instances = np.zeros((side, side), dtype=np.int32)
    classes = [SKY]
    horizon = int(rng.uniform(0.35, 0.55) * side)

    def paint(mask: np.ndarray, class_id: int) -> None:
        instances[mask] = len(classes)
        classes.append(class_id)

    paint(rows >= horizon, ROAD)
    for _ in range(int(rng.integers(2, 6))):
        width = int(rng.uniform(0.12, 0.35) * side)
        left = int(rng.integers(-width // 2, side - width // 2))
        top = int(rng.uniform(0.08, 0.8) * horizon)
        base = horizon + int(rng.integers(1, 4))
        paint((cols >= left) & (cols < left + width) & (rows >= top) & (rows < base), BUILDING)
    for _ in range(int(rng.integers(0, 4))):
        radius = rng.uniform(0.06, 0.14) * side
        center_col, center_row = rng.uniform(0, side), horizon - radius * rng.uniform(0.6, 1.2)
        crown = (cols - center_col) ** 2 + ((rows - center_row) / 1.2) ** 2 <= radius**2
        trunk = (np.abs(cols - center_col) <= max(1.0, radius / 5)) & (rows >= center_row) & (rows < horizon + 2)
        paint(crown | trunk, VEGETATION)
    bottoms = np.sort(rng.uniform(horizon + 0.12 * side, side + 0.05 * side, size=int(rng.integers(1, 5))))
    for bottom in bottoms:  # far (high) vehicles first: near ones cover them
        nearness = (bottom - horizon) / (side - horizon)
        width = (0.18 + 0.22 * nearness) * side * rng.uniform(0.8, 1.2)
        height = width * rng.uniform(0.4, 0.6)
        left = rng.uniform(-0.2 * width, side - 0.8 * width)
        body = (cols >= left) & (cols < left + width) & (rows >= bottom - height) & (rows < bottom)
        cabin = (cols >= left + 0.2 * width) & (cols < left + 0.75 * width) & (rows >= bottom - 1.5 * height)
        paint(body | (cabin & (rows < bottom - height)), VEHICLE)
    instance_classes = tuple(classes)
    return Layout(np.asarray(instance_classes)[instances].astype(np.uint8), instances, instance_classes)


@dataclass(frozen=True)
class Style:
    """How a layout is drawn. Colors are RGB in [0, 1], one per class (`None`: a random color per instance)."""

    colors: tuple[tuple[float, float, float] | None, ...]
    instance_jitter: float = 0.04  # per-instance color spread
    textures: tuple[str, ...] = ("flat",) * len(CLASS_NAMES)  # flat, stripes, checker, blotches, grain, gradient
    texture_strength: float = 0.0
    brightness: float = 1.0
    contrast: float = 1.0
    color_cast: tuple[float, float, float] = (1.0, 1.0, 1.0)
    shadow: float = 0.0  # a left-to-right lighting gradient of this depth
    blur: float = 0.0  # Gaussian blur radius, in pixels
    noise: float = 0.0  # sensor noise standard deviation


SYNTHETIC_COLORS = ((0.35, 0.6, 0.95), (0.62, 0.58, 0.52), (0.3, 0.3, 0.33), (0.2, 0.62, 0.22), (0.85, 0.12, 0.12))
REAL_COLORS = ((0.78, 0.8, 0.83), (0.55, 0.33, 0.27), (0.47, 0.46, 0.43), (0.3, 0.36, 0.16), None)
REAL_TEXTURES = ("gradient", "checker", "grain", "blotches", "stripes")
SOURCE_STYLE = "synthetic"
STYLES = {
    SOURCE_STYLE: Style(SYNTHETIC_COLORS),
    "texture": Style(SYNTHETIC_COLORS, textures=REAL_TEXTURES, texture_strength=0.22),
    "palette": Style(REAL_COLORS, instance_jitter=0.08),
    "noise": Style(SYNTHETIC_COLORS, noise=0.1),
    "blur": Style(SYNTHETIC_COLORS, blur=1.5),
    "lighting": Style(SYNTHETIC_COLORS, brightness=0.6, contrast=0.7, color_cast=(1.1, 0.9, 0.7), shadow=0.5),
    "real": Style(
        REAL_COLORS, 0.08, REAL_TEXTURES, 0.18, 0.8, 0.85, (1.05, 0.97, 0.9), shadow=0.3, blur=0.8, noise=0.04
    ),
}
TEXTURE_KINDS = ("flat", "stripes", "checker", "blotches", "grain", "gradient")

# the shapes setting: the same streets with two more classes told apart from two others by shape alone, drawn in
# their colors and textures in every style: conifers (triangular crowns) beside the round trees and vans (one tall
# box) beside the cars (a body and a narrower cabin); the foundation's pretraining scenes (`draw_layout`) hold neither
SHAPE_CLASS_NAMES = (*CLASS_NAMES, "conifer", "van")
CONIFER, VAN = range(len(CLASS_NAMES), len(SHAPE_CLASS_NAMES))
LOOKS_LIKE = (VEGETATION, VEHICLE)  # the class whose color and texture each new class takes, in every style
SHAPE_STYLES = {
    name: replace(
        style,
        colors=style.colors + tuple(style.colors[base] for base in LOOKS_LIKE),
        textures=style.textures + tuple(style.textures[base] for base in LOOKS_LIKE),
    )
    for name, style in STYLES.items()
}


def draw_shapes_layout(rng: np.random.Generator, side: int) -> Layout:
    """`draw_layout`'s street, then 0 to 2 conifers standing on the horizon (a triangular crown on a trunk) and 0 to 2
    vans on the road (one box, about as tall as wide, growing with nearness), covering what is behind them."""
    street = draw_layout(rng, side)
    rows, cols = np.mgrid[0:side, 0:side]
    instances, classes = street.instances.copy(), list(street.instance_classes)
    horizon = int(np.argmax((street.labels == ROAD).any(axis=1)))  # the first row with road

    def paint(mask: np.ndarray, class_id: int) -> None:
        instances[mask] = len(classes)
        classes.append(class_id)

    for _ in range(int(rng.integers(0, 3))):
        height, center = rng.uniform(0.2, 0.4) * side, rng.uniform(0, side)
        top = horizon - height
        crown = (rows >= top) & (rows < horizon - 0.15 * height)
        crown &= np.abs(cols - center) <= 0.3 * height * (rows - top) / height + 0.5
        trunk = (np.abs(cols - center) <= max(1.0, 0.04 * height)) & (rows >= top) & (rows < horizon + 2)
        paint(crown | trunk, CONIFER)
    for _ in range(int(rng.integers(0, 3))):
        bottom = rng.uniform(horizon + 0.15 * side, side + 0.05 * side)
        nearness = (bottom - horizon) / (side - horizon)
        width = (0.16 + 0.18 * nearness) * side * rng.uniform(0.9, 1.1)
        left = rng.uniform(-0.2 * width, side - 0.8 * width)
        top = bottom - width * rng.uniform(0.8, 1.0)
        paint((cols >= left) & (cols < left + width) & (rows >= top) & (rows < bottom), VAN)
    instance_classes = tuple(classes)
    return Layout(np.asarray(instance_classes)[instances].astype(np.uint8), instances, instance_classes)


# the colours setting: the same streets with three classes each split in two that differ by colour alone (same shapes,
# places and textures): a bluish glass building beside the building, an autumn tree beside the green one, a blue
# vehicle beside the red one. The foundation is pretrained to give a scene the same features in any colours
# (`random_style`), so its deepest features are where such classes should be lost and a fine-tuned backbone not.
COLOUR_CLASS_NAMES = (*CLASS_NAMES, "glass building", "autumn tree", "blue vehicle")
RECOLOURED = (BUILDING, VEGETATION, VEHICLE)  # the class each new class is drawn like, in its own colour
REAL_VEHICLE_COLOR = (0.6, 0.12, 0.1)  # the real palette's vehicles take random colours: here one, kept apart
TWIN_COLORS = {  # per palette, the new classes' colours in `RECOLOURED` order
    SYNTHETIC_COLORS: ((0.4, 0.48, 0.72), (0.88, 0.55, 0.1), (0.12, 0.25, 0.85)),
    REAL_COLORS: ((0.42, 0.5, 0.6), (0.62, 0.42, 0.12), (0.14, 0.2, 0.52)),
}


def with_colour_twins(style: Style) -> Style:
    """`style` (of one of `TWIN_COLORS`' palettes) with the colours setting's classes: each new class in its twin
    color and in its look-alike's texture; vehicles in one color where the palette leaves them random."""
    base = tuple(REAL_VEHICLE_COLOR if color is None else color for color in style.colors)
    return replace(
        style,
        colors=base + TWIN_COLORS[style.colors],
        textures=style.textures + tuple(style.textures[like] for like in RECOLOURED),
    )


COLOUR_STYLES = {name: with_colour_twins(style) for name, style in STYLES.items()}


def draw_colours_layout(rng: np.random.Generator, side: int) -> Layout:
    """`draw_layout`'s street, each building, tree and vehicle turned into its twin class with probability 1/2."""
    street = draw_layout(rng, side)
    flips = rng.random(len(street.instance_classes)) < 0.5
    twin = {like: len(CLASS_NAMES) + index for index, like in enumerate(RECOLOURED)}
    instance_classes = tuple(
        twin[class_id] if class_id in twin and flip else class_id
        for class_id, flip in zip(street.instance_classes, flips, strict=True)
    )
    return Layout(np.asarray(instance_classes)[street.instances].astype(np.uint8), street.instances, instance_classes)


def texture_field(kind: str, rng: np.random.Generator, side: int) -> np.ndarray:
    """A `[H, W]` pattern in about [-1, 1]."""
    rows, cols = np.mgrid[0:side, 0:side] / side
    if kind == "flat":
        return np.zeros((side, side))
    if kind == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.04, 0.15)
        return np.sin(2 * math.pi * (cols * math.cos(angle) + rows * math.sin(angle)) / period)
    if kind == "checker":
        period = rng.uniform(0.05, 0.15)
        return np.sign(np.sin(2 * math.pi * cols / period) * np.sin(2 * math.pi * rows / period))
    if kind == "blotches":  # smooth noise: a coarse random grid, upsampled
        coarse = Image.fromarray(rng.uniform(-1, 1, size=(6, 6)).astype(np.float32))
        return np.asarray(coarse.resize((side, side), Image.BICUBIC)).astype(np.float64)
    if kind == "grain":
        return rng.uniform(-1, 1, size=(side, side))
    if kind == "gradient":
        return 1 - 2 * rows
    raise ValueError(f"Unknown texture {kind!r}; use one of {TEXTURE_KINDS}.")


def render(layout: Layout, style: Style, rng: np.random.Generator) -> Image.Image:
    side = layout.labels.shape[0]
    palette = np.empty((len(layout.instance_classes), 3))
    for instance, class_id in enumerate(layout.instance_classes):
        base = style.colors[class_id]
        palette[instance] = rng.uniform(0.05, 0.95, size=3) if base is None else base
    palette += rng.normal(0, style.instance_jitter, size=palette.shape)
    pixels = palette[layout.instances]  # [H, W, 3]
    if style.texture_strength:
        for class_id, kind in enumerate(style.textures):
            mask = layout.labels == class_id
            if mask.any() and kind != "flat":
                tint = rng.uniform(0.5, 1.0, size=3)
                pixels[mask] += style.texture_strength * texture_field(kind, rng, side)[mask][:, None] * tint
    pixels = (pixels - 0.5) * style.contrast + 0.5
    lighting = style.brightness * (1 - style.shadow * np.linspace(0, 1, side)[None, :, None])
    if rng.random() < 0.5:
        lighting = lighting[:, ::-1]
    pixels = pixels * lighting * np.asarray(style.color_cast)
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    if style.blur:
        image = image.filter(ImageFilter.GaussianBlur(style.blur))
    if style.noise:
        noisy = np.asarray(image) / 255 + rng.normal(0, style.noise, size=(side, side, 3))
        image = Image.fromarray((np.clip(noisy, 0, 1) * 255).astype(np.uint8))
    return image


def random_style(rng: np.random.Generator) -> Style:
    """The foundation data: every image in a style of its own (colors, textures, lighting, blur, noise)."""
    return Style(
        colors=tuple(tuple(rng.uniform(0.05, 0.95, size=3)) if rng.random() < 0.8 else None for _ in CLASS_NAMES),
        instance_jitter=rng.uniform(0, 0.1),
        textures=tuple(str(rng.choice(TEXTURE_KINDS)) for _ in CLASS_NAMES),
        texture_strength=rng.uniform(0, 0.3),
        brightness=rng.uniform(0.5, 1.2),
        contrast=rng.uniform(0.6, 1.2),
        color_cast=tuple(rng.uniform(0.75, 1.25, size=3)),
        shadow=rng.uniform(0, 0.6),
        blur=float(rng.choice([0.0, rng.uniform(0.3, 1.8)])),
        noise=float(rng.choice([0.0, rng.uniform(0.01, 0.12)])),
    )


def scenes(
    style: Style | None,
    num_images: int,
    seed: int,
    side: int,
    variant: int = 0,
    draw: Callable[[np.random.Generator, int], Layout] = draw_layout,
) -> datasets.Dataset:
    """`num_images` scenes in `style` (`None`: a random style per image) as a dataset of images and label maps. The
    layouts (drawn by `draw`) depend on `seed` alone: the same seed draws the same scenes in every style, and each
    `variant` draws other random styles (and texture, noise) for them."""
    layout_rng = np.random.default_rng([seed, 0])
    style_rng = np.random.default_rng([seed, 1] if variant == 0 else [seed, 1, variant])
    images, label_maps = [], []
    for _ in range(num_images):
        layout = draw(layout_rng, side)
        images.append(render(layout, style or random_style(style_rng), style_rng))
        label_maps.append(Image.fromarray(layout.labels))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "label": label_maps}, features=features)
