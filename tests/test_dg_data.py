"""rein_peft.official.dg_data: the six data sets read from fake copies in their real layouts (file names, nesting,
bit depths, label encodings), the id tables against independently written ones, clear errors naming the file, and the
official training augmentations."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rein_peft.official import dg_data, load_dg_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from fake_dg_datasets import REAL_SIZES, save_png16, write_fake_dataset  # noqa: E402

# cityscapesscripts' labels table (name, id, trainId), written out here from its documentation
CITYSCAPES_LABELS = [
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
]  # fmt: skip
# SYNTHIA RAND-CITYSCAPES' README classes, and the Cityscapes class DAFormer's conversion gives each (None: ignored)
SYNTHIA_CLASSES = [
    ("void", None), ("sky", "sky"), ("building", "building"), ("road", "road"), ("sidewalk", "sidewalk"),
    ("fence", "fence"), ("vegetation", "vegetation"), ("pole", "pole"), ("car", "car"),
    ("traffic sign", "traffic sign"), ("pedestrian", "person"), ("bicycle", "bicycle"),
    ("motorcycle", "motorcycle"), ("parking-slot", None), ("road-work", None), ("traffic light", "traffic light"),
    ("terrain", "terrain"), ("rider", "rider"), ("truck", "truck"), ("bus", "bus"), ("train", "train"),
    ("wall", "wall"), ("lanemarking", None),
]  # fmt: skip
# Mapillary v1.2 classes that mapillary2cityscape.py keeps, and the Cityscapes class of each; all others are ignored
MAPILLARY_KEPT = {
    "Curb": "sidewalk", "Fence": "fence", "Wall": "wall", "Bike Lane": "road", "Crosswalk - Plain": "road",
    "Curb Cut": "sidewalk", "Parking": "road", "Pedestrian Area": "sidewalk", "Road": "road", "Service Lane": "road",
    "Sidewalk": "sidewalk", "Building": "building", "Person": "person", "Bicyclist": "rider",
    "Motorcyclist": "rider", "Other Rider": "rider", "Lane Marking - Crosswalk": "road",
    "Lane Marking - General": "road", "Sky": "sky", "Terrain": "terrain", "Vegetation": "vegetation",
    "Street Light": "pole", "Pole": "pole", "Traffic Sign Frame": "traffic sign", "Utility Pole": "pole",
    "Traffic Light": "traffic light", "Traffic Sign (Back)": "traffic sign", "Traffic Sign (Front)": "traffic sign",
    "Bicycle": "bicycle", "Bus": "bus", "Car": "car", "Motorcycle": "motorcycle", "On Rails": "train",
    "Truck": "truck",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REAL_SIZES))
def test_each_data_set_reads_from_its_layout_into_train_ids(tmp_path, name):
    written = write_fake_dataset(name, str(tmp_path / name), num_images=3, split="val", seed=1)
    dataset = load_dg_dataset(name, str(tmp_path / name), "val", cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 3
    assert set(dataset.column_names) == {"image", "label", "image_path", "label_path", "unmapped_pixels"}
    for example, (label_path, train_ids) in zip(dataset, written, strict=True):
        assert example["label_path"] == label_path and os.path.isfile(example["image_path"])
        assert example["unmapped_pixels"] == 0
        label = np.asarray(example["label"])
        assert example["image"].size == (label.shape[1], label.shape[0])
        np.testing.assert_array_equal(label, train_ids)  # every pixel, 255 where unlabelled
    assert {0, 2, 8, 10, 13, 255} <= set(np.unique(np.asarray(dataset[0]["label"])))


def test_cityscapes_ids_map_as_cityscapesscripts_table():
    ids = np.array([[label_id for _, label_id, _ in CITYSCAPES_LABELS]])
    expected = [train_id for _, _, train_id in CITYSCAPES_LABELS]
    train_ids = dg_data.to_train_ids(ids, dg_data.CITYSCAPES_ID_TO_TRAIN_ID, dg_data.CITYSCAPES_NUM_IDS, "x.png")
    assert train_ids[0].tolist() == expected
    names = [name for name, _, train_id in CITYSCAPES_LABELS if train_id != 255]
    assert list(dg_data.CITYSCAPES_CLASSES) == names


def test_synthia_ids_map_as_daformers_conversion():
    ids = np.arange(len(SYNTHIA_CLASSES))[None]
    train_ids = dg_data.to_train_ids(ids, dg_data.SYNTHIA_ID_TO_TRAIN_ID, dg_data.SYNTHIA_NUM_IDS, "x.png")
    expected = [255 if kept is None else dg_data.CITYSCAPES_CLASSES.index(kept) for _, kept in SYNTHIA_CLASSES]
    assert train_ids[0].tolist() == expected


def test_mapillary_classes_map_by_the_official_rules():
    table = dg_data.mapillary_id_to_train_id(list(dg_data.MAPILLARY_V12_CLASSES))
    named = {dg_data.MAPILLARY_V12_CLASSES[mapillary_id]: dg_data.CITYSCAPES_CLASSES[train_id]
             for mapillary_id, train_id in table.items()}  # fmt: skip
    assert named == MAPILLARY_KEPT
    assert len(dg_data.MAPILLARY_V12_CLASSES) == 66
    assert set(named.values()) == set(dg_data.CITYSCAPES_CLASSES)  # every class has a source


def test_16_bit_rgb_labels_are_read_in_full(tmp_path):
    """SYNTHIA's labels: class ids in the first of three 16-bit channels, instance ids (above 255) in the second.
    Pillow alone keeps each value's high byte (all 0 here)."""
    rng = np.random.default_rng(0)
    values = rng.integers(0, 23, size=(7, 9, 3)).astype(np.uint16)
    values[..., 1] = rng.integers(256, 60000, size=(7, 9))
    save_png16(str(tmp_path / "label.png"), values)
    np.testing.assert_array_equal(dg_data.read_label_ids(str(tmp_path / "label.png")), values[..., 0])
    assert not np.asarray(Image.open(tmp_path / "label.png"))[..., 0].any()  # what Pillow alone gives: high bytes


def test_a_missing_label_file_is_named(tmp_path):
    written = write_fake_dataset("cityscapes", str(tmp_path), num_images=2)
    os.remove(written[1][0])
    with pytest.raises(FileNotFoundError, match=f"has no label file {written[1][0]}"):
        load_dg_dataset("cityscapes", str(tmp_path), "val", cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize(("name", "bad_id"), [("cityscapes", 34), ("bdd100k", 19), ("synthia", 300)])
def test_an_unknown_id_is_named_with_its_file(tmp_path, name, bad_id):
    written = write_fake_dataset(name, str(tmp_path / name), num_images=2)
    path, train_ids = written[-1]
    if name == "synthia":
        values = np.zeros((*train_ids.shape, 3), dtype=np.uint16)
        values[0, 0, 0] = bad_id
        save_png16(path, values)
    else:
        Image.fromarray(np.full(train_ids.shape, bad_id, dtype=np.uint8)).save(path)
    with pytest.raises(ValueError, match=rf"{path} holds label ids \[{bad_id}\]"):
        load_dg_dataset(name, str(tmp_path / name), "val", cache_dir=str(tmp_path / "cache"))


def test_wrong_folders_and_names_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="Unknown data set 'gtav'"):
        load_dg_dataset("gtav", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no images found .* \(leftImg8bit/<split>/<city>"):
        load_dg_dataset("cityscapes", str(tmp_path))
    write_fake_dataset("mapillary", str(tmp_path / "mapillary"), num_images=1)
    os.remove(tmp_path / "mapillary" / "config_v1.2.json")
    with pytest.raises(FileNotFoundError, match="config_v1.2.json"):
        load_dg_dataset("mapillary", str(tmp_path / "mapillary"), "validation")


def _scene(width: int = 40, height: int = 20) -> tuple[Image.Image, np.ndarray]:
    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    label = np.zeros((height, width), dtype=np.uint8)
    label[:, width // 2 :] = 1
    return Image.fromarray(pixels), label


def test_rescale_keeps_the_aspect_ratio_and_caps_the_long_side():
    image, label = _scene(40, 20)
    crop_all = {"crop_size": 1000, "cat_max_ratio": 1.0, "flip_prob": 0.0, "photometric": False}
    for ratio, expected in [(0.5, (5, 10)), (1.0, (10, 20)), (2.0, (20, 40))]:
        augmentation = dg_data.DGTrainAugmentation(base_scale=10, scale_ratios=(ratio,), max_size=100, **crop_all)
        pixels, labels = augmentation(image, label, np.random.default_rng(0))
        assert pixels.shape == (*expected, 3) and labels.shape == expected
        assert set(np.unique(labels)) == {0, 1}
    capped = dg_data.DGTrainAugmentation(base_scale=10, scale_ratios=(2.0,), max_size=30, **crop_all)
    assert capped(image, label, np.random.default_rng(0))[1].shape == (15, 30)  # long side 40 -> 30
    assert dg_data.SCALE_RATIOS[0] == 0.5 and dg_data.SCALE_RATIOS[-1] == 2.0 and len(dg_data.SCALE_RATIOS) == 16


def test_crops_are_redrawn_while_one_class_dominates():
    """Left half class 0, right half class 1: a 10-wide crop of a 40-wide map holds both classes below 75% only
    when it starts within 2.5 pixels of the middle (offsets 13..17 of 0..30)."""
    image, label = _scene(40, 10)
    settings = {"base_scale": 10, "scale_ratios": (1.0,), "crop_size": 10, "flip_prob": 0.0, "photometric": False}
    balanced = 0
    for seed in range(50):
        _, labels = dg_data.DGTrainAugmentation(cat_max_ratio=0.75, **settings)(
            image, label, np.random.default_rng(seed)
        )
        balanced += np.bincount(labels.ravel(), minlength=2).max() / labels.size < 0.75
    unconstrained = sum(
        np.bincount(
            dg_data.DGTrainAugmentation(cat_max_ratio=1.0, **settings)(image, label, np.random.default_rng(seed))[1]
            .ravel(), minlength=2,
        ).max() / 100 < 0.75
        for seed in range(50)
    )  # fmt: skip
    # one draw succeeds with probability 3/31; ten draws with 1 - (28/31)^10 = 64%
    assert balanced >= 20 and unconstrained <= 12


def test_flip_mirrors_image_and_label_together():
    image, label = _scene(20, 10)
    settings = {"base_scale": 10, "scale_ratios": (1.0,), "crop_size": 100, "cat_max_ratio": 1.0, "photometric": False}
    pixels, labels = dg_data.DGTrainAugmentation(flip_prob=1.0, **settings)(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(pixels, np.asarray(image, dtype=np.float32)[:, ::-1])
    np.testing.assert_array_equal(labels, label[:, ::-1])


def test_photometric_distortion_stays_in_range_and_changes_colours():
    pixels = np.asarray(_scene(16, 16)[0], dtype=np.float32)
    changed = [dg_data.photometric_distortion(pixels.copy(), np.random.default_rng(seed)) for seed in range(8)]
    assert all(out.shape == pixels.shape and out.min() >= 0 and out.max() <= 255 for out in changed)
    assert sum(np.abs(out - pixels).mean() > 1 for out in changed) >= 6  # 1 in 16 draws changes nothing
    again = dg_data.photometric_distortion(pixels.copy(), np.random.default_rng(3))
    np.testing.assert_array_equal(again, changed[3])


def test_train_transform_normalises_and_pads_to_the_crop():
    image, label = _scene(20, 10)
    augmentation = dg_data.DGTrainAugmentation(
        base_scale=10, scale_ratios=(1.0,), crop_size=16, cat_max_ratio=1.0, flip_prob=0.0, photometric=False
    )
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    torch.manual_seed(0)
    out = dg_data.dg_train_transform(augmentation, mean, std)({"image": [image], "label": [label]})
    pixel_values, labels = out["pixel_values"][0], out["labels"][0]
    assert pixel_values.shape == (3, 16, 16) and labels.shape == (16, 16)
    assert (labels[10:] == 255).all() and (pixel_values[:, 10:] == 0).all()  # padded rows
    crop = labels[:10].numpy()
    offsets = [x for x in range(5) if (label[:, x : x + 16] == crop).all()]
    expected = (np.asarray(image, dtype=np.float32)[:, offsets[0] : offsets[0] + 16] / 255 - mean) / std
    torch.testing.assert_close(pixel_values[:, :10].permute(1, 2, 0), torch.from_numpy(expected.astype(np.float32)))


def test_conversion_in_worker_processes_gives_the_same_labels_and_errors(tmp_path):
    written = write_fake_dataset("gta", str(tmp_path / "gta"), num_images=4)
    dataset = load_dg_dataset("gta", str(tmp_path / "gta"), cache_dir=str(tmp_path / "cache"), num_proc=2)
    for example, (_, train_ids) in zip(dataset, written, strict=True):
        np.testing.assert_array_equal(np.asarray(example["label"]), train_ids)
    written = write_fake_dataset("cityscapes", str(tmp_path / "cityscapes"), num_images=4)
    Image.fromarray(np.full((4, 4), 40, dtype=np.uint8)).save(written[2][0])
    with pytest.raises(ValueError, match=rf"{written[2][0]} holds label ids \[40\]"):
        load_dg_dataset("cityscapes", str(tmp_path / "cityscapes"), cache_dir=str(tmp_path / "cache2"), num_proc=2)


def test_gta_values_outside_the_cityscapes_ids_are_ignored_and_counted(tmp_path):
    """As the official gta.py: every value outside ids 0-33 becomes 255; the loader counts them, per file and in all.
    The fixture: 2 of 3 label files hold such values, 5 + 12 = 17 pixels (ids 34, 200 and 255)."""
    written = write_fake_dataset("gta", str(tmp_path / "gta"), num_images=3)
    expected = []
    for (path, train_ids), bad in zip(written, ({34: 5}, {}, {200: 10, 255: 2}), strict=True):
        raw = np.asarray(Image.open(path)).copy()  # [H, W] palette indices: the Cityscapes ids
        train_ids = train_ids.copy()
        rows = iter(range(raw.shape[0]))
        for value, count in bad.items():
            row = next(rows)
            raw[row, :count], train_ids[row, :count] = value, 255
        Image.fromarray(raw).save(path)
        expected.append(train_ids)
    with pytest.warns(UserWarning, match="17 pixels in 2 of 3 label files hold values outside the 34 ids"):
        dataset = load_dg_dataset("gta", str(tmp_path / "gta"), cache_dir=str(tmp_path / "cache"))
    assert dataset["unmapped_pixels"] == [5, 0, 12]
    assert "17 pixels in 2 label files held values outside the data set's ids" in dataset.info.description
    for example, train_ids in zip(dataset, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(example["label"]), train_ids)
    with pytest.warns(UserWarning, match="17 pixels in 2 of 3"):  # reported again when served from the cache
        cached = load_dg_dataset("gta", str(tmp_path / "gta"), cache_dir=str(tmp_path / "cache"))
    assert cached["unmapped_pixels"] == [5, 0, 12] and cached.cache_files == dataset.cache_files


def test_the_cache_follows_a_label_file_edited_in_place(tmp_path):
    written = write_fake_dataset("cityscapes", str(tmp_path / "cs"), num_images=2)
    first = load_dg_dataset("cityscapes", str(tmp_path / "cs"), cache_dir=str(tmp_path / "cache"))
    path, train_ids = written[1]
    raw = np.asarray(Image.open(path)).copy()
    raw[:3] = 26  # car
    Image.fromarray(raw).save(path)
    second = load_dg_dataset("cityscapes", str(tmp_path / "cs"), cache_dir=str(tmp_path / "cache"))
    assert first.cache_files != second.cache_files
    np.testing.assert_array_equal(np.asarray(first[1]["label"]), train_ids)
    edited = train_ids.copy()
    edited[:3] = dg_data.CITYSCAPES_ID_TO_TRAIN_ID[26]
    np.testing.assert_array_equal(np.asarray(second[1]["label"]), edited)
    np.testing.assert_array_equal(np.asarray(second[0]["label"]), written[0][1])
    assert second[1]["label_path"] == path


def test_half_size_copies_are_made_as_the_official_mapillary_resize_makes_them(tmp_path):
    """A plain rewrite of tools/convert_datasets/mapillary_resize.py's `resize_half` (images bicubic to JPEG, raw
    labels nearest), then the id table: the loader's half-size rows equal it pixel for pixel."""
    root = tmp_path / "mapillary"
    write_fake_dataset("mapillary", str(root), num_images=2, split="val")
    dataset = load_dg_dataset("mapillary", str(root), "val", cache_dir=str(tmp_path / "cache"), half_size_copies=True)
    table = dg_data.mapillary_id_to_train_id(list(dg_data.MAPILLARY_V12_CLASSES))
    lookup = np.full(256, 255, dtype=np.uint8)
    lookup[list(table)] = list(table.values())
    for index, example in enumerate(dataset):
        image = Image.open(example["image_path"])
        h, w = image.size  # the script's names: width, height
        image.resize((h // 2, w // 2), resample=Image.BICUBIC).save(tmp_path / f"{index}.jpg")
        label = Image.open(example["label_path"]).resize((h // 2, w // 2), resample=Image.NEAREST)
        np.testing.assert_array_equal(np.asarray(example["image"]), np.asarray(Image.open(tmp_path / f"{index}.jpg")))
        np.testing.assert_array_equal(np.asarray(example["label"]), lookup[np.asarray(label)])
        assert example["image"].size == (image.width // 2, image.height // 2)
    assert "half-size copies" in dataset.info.description
