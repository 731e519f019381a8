"""Tiny fake domain-generalization data sets, written in each real data set's layout: its folder nesting, file names,
image formats and label encodings (GTAV's palette PNGs of Cityscapes label ids, SYNTHIA's 16-bit RGB PNGs of its own
ids, Cityscapes' `_gtFine_labelIds.png`, BDD100K's train-id masks, Mapillary's palette PNGs of its v1.2 ids with
`config_v1.2.json`, ACDC's `_gt_labelIds.png`). Images are street-like scenes (sky, buildings, road, a car) drawn
at 1/16 of each data set's real size. They check a pipeline, not a method.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
from PIL import Image

from rein_peft.official import dg_data

# each data set's real image size (width, height), the fakes are drawn at 1/16 of it; Mapillary's sizes vary
REAL_SIZES = {
    "gta": [(1914, 1052)],
    "synthia": [(1280, 760)],
    "cityscapes": [(2048, 1024)],
    "bdd100k": [(1280, 720)],
    "mapillary": [(4032, 3024), (1920, 1080)],
    "acdc": [(1920, 1080)],
}
FAKE_SCALE = 16
# the classes a fake scene holds (train ids) and their colours
SCENE_CLASSES = {"road": (128, 64, 128), "building": (70, 70, 70), "sky": (70, 130, 180), "car": (0, 0, 142)}
SCENE_CLASSES["vegetation"] = (107, 142, 35)


def _raw_ids(table: dict[int, int]) -> dict[int, int]:
    """train id -> the first raw id mapped to it."""
    inverse = {}
    for raw_id, train_id in sorted(table.items()):
        inverse.setdefault(train_id, raw_id)
    return inverse


def draw_scene(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A street-like scene: `[H, W, 3]` uint8 pixels and `[H, W]` train ids (with a strip of 255, unlabelled)."""
    ids = {name: dg_data.CITYSCAPES_CLASSES.index(name) for name in SCENE_CLASSES}
    labels = np.full((height, width), ids["sky"], dtype=np.uint8)
    horizon = int(height * rng.uniform(0.4, 0.6))
    labels[horizon:] = ids["road"]
    for _ in range(int(rng.integers(1, 4))):
        left, right = sorted(rng.integers(0, width, size=2))
        labels[int(horizon * rng.uniform(0.2, 0.7)) : horizon, left : right + 1] = ids["building"]
    tree = int(rng.integers(0, width))
    labels[int(horizon * 0.6) : horizon, max(0, tree - width // 12) : tree + width // 12] = ids["vegetation"]
    car_left, car_top = int(rng.integers(0, width * 3 // 4)), horizon + int((height - horizon) * rng.uniform(0.2, 0.6))
    labels[car_top : car_top + max(2, height // 8), car_left : car_left + max(3, width // 5)] = ids["car"]
    labels[-max(1, height // 20) :] = dg_data.IGNORE_INDEX  # the ego vehicle's bonnet, say
    palette = np.zeros((256, 3))
    for name, colour in SCENE_CLASSES.items():
        palette[ids[name]] = np.clip(np.asarray(colour) + rng.normal(0, 15, size=3), 0, 255)
    pixels = palette[labels] + rng.normal(0, 8, size=(height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), labels


def save_png16(path: str, values: np.ndarray) -> None:
    """A 16-bit RGB PNG, as SYNTHIA's label files are (rows with the none, sub and up filters in turn, as encoders
    choose them). Pillow cannot write these."""
    height, width, _ = values.shape
    data = values.astype(">u2").view(np.uint8).reshape(height, width * 6)
    rows, previous = [], np.zeros(width * 6, dtype=np.uint8)
    for index, row in enumerate(data):
        kind = index % 3
        if kind == 1:  # sub: minus the byte one pixel (6 bytes) to the left
            row = row - np.concatenate([np.zeros(6, np.uint8), row[:-6]])
        elif kind == 2:  # up: minus the byte above
            row = row - previous
        rows.append(bytes([kind]) + row.astype(np.uint8).tobytes())
        previous = data[index]

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, truecolour
    with open(path, "wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows))))
        file.write(chunk(b"IEND", b""))


def _palette_png(ids: np.ndarray) -> Image.Image:
    image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.astype(np.uint8).tobytes())
    image.putpalette(np.random.default_rng(0).integers(0, 256, size=768, dtype=np.uint8).tobytes())
    return image


def write_fake_dataset(
    name: str, root: str, num_images: int = 4, split: str = "val", seed: int = 0
) -> list[tuple[str, np.ndarray]]:
    """Write `num_images` fake images and label files of data set `name` under `root`, in its real layout.

    Args:
        name: One of `rein_peft.official.dg_data.TEST_SIZES`' data sets.
        root: The data set's folder (created).
        num_images: Images to write.
        split: The split folder, for the data sets that have them (`train` or `val`).
        seed: Seed of the scenes.

    Returns:
        (label file, its train ids `[H, W]`) of each image, in the loader's order (by file name).
    """
    rng = np.random.default_rng(seed)
    labels_written = []
    if name == "mapillary":
        with open(os.path.join(_made(root), "config_v1.2.json"), "w") as file:
            json.dump({"labels": [{"readable": readable} for readable in dg_data.MAPILLARY_V12_CLASSES]}, file)
    for index in range(num_images):
        width, height = (side // FAKE_SCALE for side in REAL_SIZES[name][index % len(REAL_SIZES[name])])
        pixels, train_ids = draw_scene(rng, width, height)
        image = Image.fromarray(pixels)
        if name == "gta":
            stem = f"{index + 1:05d}"
            image.save(os.path.join(_made(root, "images"), stem + ".png"))
            raw = _encode(train_ids, dg_data.CITYSCAPES_ID_TO_TRAIN_ID, unlabelled=0)
            label = os.path.join(_made(root, "labels"), stem + ".png")
            _palette_png(raw).save(label)
        elif name == "synthia":
            stem = f"{index:07d}"
            image.save(os.path.join(_made(root, "RGB"), stem + ".png"))
            values = np.zeros((height, width, 3), dtype=np.uint16)
            values[..., 0] = _encode(train_ids, dg_data.SYNTHIA_ID_TO_TRAIN_ID, unlabelled=0)
            values[..., 1] = rng.integers(0, 1000, size=(height, width))  # instance ids, above 255
            label = os.path.join(_made(root, "GT", "LABELS"), stem + ".png")
            save_png16(label, values)
        elif name in ("cityscapes", "acdc"):
            group = "aachen" if name == "cityscapes" else f"{dg_data.ACDC_CONDITIONS[index % 4]}"
            stem = f"{group}_{index:06d}_000019" if name == "cityscapes" else f"GOPR0{index:03d}_frame_000{index:03d}"
            image_dir, label_dir, image_suffix, label_suffix = (
                ("leftImg8bit", "gtFine", "leftImg8bit.png", "gtFine_labelIds.png")
                if name == "cityscapes"
                else ("rgb_anon", "gt", "rgb_anon.png", "gt_labelIds.png")
            )
            nesting = (split, group) if name == "cityscapes" else (group, split, f"GOPR0{index:03d}")
            image.save(os.path.join(_made(root, image_dir, *nesting), f"{stem}_{image_suffix}"))
            raw = _encode(train_ids, dg_data.CITYSCAPES_ID_TO_TRAIN_ID, unlabelled=0)
            label = os.path.join(_made(root, label_dir, *nesting), f"{stem}_{label_suffix}")
            Image.fromarray(raw).save(label)
        elif name == "bdd100k":
            stem = f"{index:04x}a1b2-c3d4e5f6"
            image.save(os.path.join(_made(root, "images", "10k", split), stem + ".jpg"), quality=95)
            label = os.path.join(_made(root, "labels", "sem_seg", "masks", split), stem + ".png")
            Image.fromarray(train_ids).save(label)
        elif name == "mapillary":
            folder = {"train": "training", "val": "validation"}[split]
            stem = f"{index:02d}x_Vistas{index:08d}"
            image.save(os.path.join(_made(root, folder, "images"), stem + ".jpg"), quality=95)
            table = dg_data.mapillary_id_to_train_id(list(dg_data.MAPILLARY_V12_CLASSES))
            unlabelled = dg_data.MAPILLARY_V12_CLASSES.index("Unlabeled")
            label = os.path.join(_made(root, folder, "v1.2", "labels"), stem + ".png")
            _palette_png(_encode(train_ids, table, unlabelled)).save(label)
        else:
            raise ValueError(f"Unknown data set {name!r}; use one of {sorted(REAL_SIZES)}.")
        labels_written.append((label, train_ids))
    return sorted(labels_written, key=lambda written: written[0])


def _encode(train_ids: np.ndarray, table: dict[int, int], unlabelled: int) -> np.ndarray:
    lookup = np.full(256, unlabelled, dtype=np.int64)
    for train_id, raw_id in _raw_ids(table).items():
        lookup[train_id] = raw_id
    return lookup[train_ids].astype(np.uint8)


def _made(*parts: str) -> str:
    path = os.path.join(*parts)
    os.makedirs(path, exist_ok=True)
    return path
