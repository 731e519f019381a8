"""The domain-generalization data sets as users download them, read into `datasets.Dataset`s of images and label maps
in the 19 Cityscapes train ids (255 ignored), and the official training augmentations.

The id tables are those of the official conversion scripts (github w1oves/Rein, `tools/convert_datasets/`: GTAV and
Mapillary; Cityscapes through cityscapesscripts' label table, as mmsegmentation uses it) and of DAFormer's SYNTHIA
conversion, which the official repository's SYNTHIA experiments take. `datasets` and Pillow (the `examples` extra)
are imported when a loader runs, not with `rein_peft`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import warnings
from dataclasses import dataclass

import numpy as np

from ..utils.extras import require

IGNORE_INDEX = 255
CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
NUM_CLASSES = len(CITYSCAPES_CLASSES)

# Cityscapes label ids (cityscapesscripts' `labels` table, ids 0-33) -> train ids; every other id of the table is 255.
# GTAV's labels use the same ids (the official tools/convert_datasets/gta.py maps them with this table).
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES_NUM_IDS = 34
# SYNTHIA RAND-CITYSCAPES class ids (its README, 0 void to 22 lanemarking) -> train ids, as DAFormer's
# tools/convert_datasets/synthia.py maps them; ids 16 (terrain), 18 (truck), 20 (train) never occur in the data
SYNTHIA_ID_TO_TRAIN_ID = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9,
    1: 10, 10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}  # fmt: skip
SYNTHIA_NUM_IDS = 23
# Mapillary Vistas: its class names (the `readable` names of config_v1.2.json, lower-cased, spaces and hyphens removed)
# -> Cityscapes classes, by the rules of the official tools/convert_datasets/mapillary2cityscape.py, in its order:
# an exact name first, then the first rule whose word the name contains; everything else is 255
MAPILLARY_NAME_RULES = (
    (("trafficsign", "front", "back"), "traffic sign"),
    (("onrail",), "train"),
    (("cyclist", "rider"), "rider"),
    (("pole", "streetlight"), "pole"),
    (("curb", "pedestrianarea"), "sidewalk"),
    (("crosswalkplain", "parking", "bikelane", "servicelane", "lanemarking"), "road"),
)
# Mapillary Vistas v1.2's 66 classes in id order (config_v1.2.json's `readable` names), for reference and fakes;
# the loader reads the list from the data set's own config, as the official conversion does
MAPILLARY_V12_CLASSES = (
    "Bird",
    "Ground Animal",
    "Curb",
    "Fence",
    "Guard Rail",
    "Barrier",
    "Wall",
    "Bike Lane",
    "Crosswalk - Plain",
    "Curb Cut",
    "Parking",
    "Pedestrian Area",
    "Rail Track",
    "Road",
    "Service Lane",
    "Sidewalk",
    "Bridge",
    "Building",
    "Tunnel",
    "Person",
    "Bicyclist",
    "Motorcyclist",
    "Other Rider",
    "Lane Marking - Crosswalk",
    "Lane Marking - General",
    "Mountain",
    "Sand",
    "Sky",
    "Snow",
    "Terrain",
    "Vegetation",
    "Water",
    "Banner",
    "Bench",
    "Bike Rack",
    "Billboard",
    "Catch Basin",
    "CCTV Camera",
    "Fire Hydrant",
    "Junction Box",
    "Mailbox",
    "Manhole",
    "Phone Booth",
    "Pothole",
    "Street Light",
    "Pole",
    "Traffic Sign Frame",
    "Utility Pole",
    "Traffic Light",
    "Traffic Sign (Back)",
    "Traffic Sign (Front)",
    "Trash Can",
    "Bicycle",
    "Boat",
    "Bus",
    "Car",
    "Caravan",
    "Motorcycle",
    "On Rails",
    "Other Vehicle",
    "Trailer",
    "Truck",
    "Wheeled Slow",
    "Car Mount",
    "Ego Vehicle",
    "Unlabeled",
)
MAPILLARY_CONFIGS = ("config_v1.2.json", "config.json")
# the test sizes of the official configs (`Resize(scale=..., keep_ratio=True)`), (height, width) as
# `keep_ratio_size` takes them (the configs write (width, height): cityscapes' scale=(1024, 512))
TEST_SIZES = {
    "cityscapes": (512, 1024),
    "mapillary": (512, 1024),
    "bdd100k": (720, 1280),
    "gta": (720, 1280),
    "synthia": (760, 1280),  # no official config: SYNTHIA's own size
    "acdc": (540, 960),
}
SPLIT_ALIASES = {"validation": "val", "training": "train"}
# data sets whose official conversion maps every raw value outside its id table to 255 (DAFormer's gta.py, which the
# official tools/convert_datasets/gta.py is): such values are ignored, counted and reported, not refused
UNMAPPED_IGNORED = ("gta",)
# data sets without splits in domain generalization: every image is read
SPLITLESS = ("gta", "synthia")
# the columns of `load_dg_dataset`'s rows beside `image` and `label`
IMAGE_PATH, LABEL_PATH, UNMAPPED_PIXELS = "image_path", "label_path", "unmapped_pixels"
# bump when the conversion changes, so that caches of an older conversion are not served
CONVERSION_VERSION = 2
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")


def _mapillary_label_dir(root: str, split: str) -> str:
    for candidate in (os.path.join(split, "v1.2", "labels"), os.path.join(split, "labels")):
        if os.path.isdir(os.path.join(root, candidate)):
            return candidate
    raise FileNotFoundError(
        f"Mapillary Vistas at {root!r} has no label folder {split}/v1.2/labels (v2.0 download) or {split}/labels "
        "(v1.x download). Point `root` at the folder that holds `training/` and `validation/`."
    )


def mapillary_id_to_train_id(class_names: list[str]) -> dict[int, int]:
    """The Mapillary-id -> train-id table for Mapillary's class list (`readable` names, in id order), by the rules of
    the official `mapillary2cityscape.py`.

    Args:
        class_names: Mapillary's class names in id order, e.g. `[label["readable"] for label in config["labels"]]`.
    """
    train_ids = {name.replace(" ", ""): index for index, name in enumerate(CITYSCAPES_CLASSES)}
    table = {}
    for mapillary_id, readable in enumerate(class_names):
        name = readable.lower().replace(" ", "").replace("-", "")
        if name in train_ids:
            table[mapillary_id] = train_ids[name]
            continue
        for words, cityscapes_class in MAPILLARY_NAME_RULES:
            if any(word in name for word in words):
                table[mapillary_id] = CITYSCAPES_CLASSES.index(cityscapes_class)
                break
    return table


def _mapillary_classes(root: str) -> list[str]:
    for config_name in MAPILLARY_CONFIGS:
        path = os.path.join(root, config_name)
        if os.path.isfile(path):
            with open(path) as file:
                return [label["readable"] for label in json.load(file)["labels"]]
    raise FileNotFoundError(
        f"Mapillary Vistas at {root!r} has none of {MAPILLARY_CONFIGS}: its class list, which the id mapping is read "
        "from. It comes with the download, beside `training/` and `validation/`."
    )


def read_label_ids(path: str) -> np.ndarray:
    """A label file's raw ids as `[H, W]` integers: the first channel of multi-channel files, palette indices of
    palette PNGs, and 16-bit values in full (SYNTHIA's 16-bit RGB PNGs, whose high bytes Pillow would otherwise keep
    alone).

    Args:
        path: The label file.
    """
    from PIL import Image

    with Image.open(path) as image:
        tiles = list(image.tile)
        wide = [tile for tile in tiles if str(tile[3]).endswith(";16B") and image.mode in ("RGB", "RGBA")]
        if not wide:
            ids = np.asarray(image)
            return (ids[..., 0] if ids.ndim == 3 else ids).astype(np.int64)
    planes = []
    for raw_mode in ("16B", "16L"):  # the high bytes, then the low bytes of each big-endian 16-bit value
        with Image.open(path) as image:
            image.tile = [(tile[0], tile[1], tile[2], f"{image.mode};{raw_mode}") for tile in tiles]
            planes.append(np.asarray(image)[..., 0].astype(np.int64))
    return planes[0] * 256 + planes[1]


def to_train_ids(
    ids: np.ndarray, id_table: dict[int, int] | None, num_ids: int, path: str, ignore_unmapped: bool = False
) -> np.ndarray:
    """Map a label file's raw ids to train ids (`uint8`, 255 ignored); an id the data set does not have is an error,
    or 255 with `ignore_unmapped` (as the official GTAV conversion does).

    Args:
        ids: `[H, W]` raw ids, as `read_label_ids` returns them.
        id_table: raw id -> train id; ids of the data set missing from it become 255. `None`: already train ids.
        num_ids: The data set's ids are `0..num_ids - 1` (and 255 for train-id labels).
        path: The file, named in the error.
        ignore_unmapped: Map ids outside `0..num_ids - 1` to 255 instead of refusing the file (count them with
            `unmapped_pixels`).
    """
    known = _known_ids(ids, id_table, num_ids)
    if not ignore_unmapped and not known.all():
        unknown = np.unique(ids[~known])[:10].tolist()
        expected = f"0 to {num_ids - 1}" + (" or 255" if id_table is None else "")
        raise ValueError(
            f"{path} holds label ids {unknown}, but this data set's ids are {expected}. The file is not a label "
            "map of this data set (another data set, a colour-coded or an instance map?): check `name` and the folder."
        )
    if id_table is None:
        return np.where(known, ids, IGNORE_INDEX).astype(np.uint8)
    lookup = np.full(num_ids, IGNORE_INDEX, dtype=np.uint8)
    for raw_id, train_id in id_table.items():
        lookup[raw_id] = train_id
    return np.where(known, lookup[np.where(known, ids, 0)], IGNORE_INDEX).astype(np.uint8)


def _known_ids(ids: np.ndarray, id_table: dict[int, int] | None, num_ids: int) -> np.ndarray:
    """`[H, W]` bool: the raw ids the data set has (`0..num_ids - 1`, and 255 for train-id labels)."""
    known = (ids >= 0) & (ids < num_ids)
    if id_table is None:
        known |= ids == IGNORE_INDEX
    return known


def unmapped_pixels(ids: np.ndarray, id_table: dict[int, int] | None, num_ids: int) -> int:
    """How many pixels of `[H, W]` raw `ids` hold a value the data set does not have (see `to_train_ids`)."""
    return int((~_known_ids(ids, id_table, num_ids)).sum())


def _sibling(image: str, image_dir: str, label_dir: str, label_suffix: str) -> str:
    """The label file of `image` in the Cityscapes-style layouts: `<root>/<image_dir>/<...>/<stem>_<image_dir>.png`
    -> `<root>/<label_dir>/<...>/<stem>_<label_suffix>`."""
    root, _, rest = image.rpartition(f"{os.sep}{image_dir}{os.sep}")
    stem = os.path.basename(rest)[: -len(f"{image_dir}.png")]
    return os.path.join(root, label_dir, os.path.dirname(rest), stem + label_suffix)


def _files(name: str, root: str, split: str) -> tuple[list[tuple[str, str]], dict[int, int] | None, int]:
    """(image, label) path pairs of one data set's split, its id table and its number of ids."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{name}: no folder {root!r}. Pass the folder the data set was extracted to.")
    split = SPLIT_ALIASES.get(split, split)
    if name == "gta":  # images/00001.png, labels/00001.png (Cityscapes label ids, palette PNGs); no splits in DG
        images = sorted(glob.glob(os.path.join(root, "images", "*.png")))
        pairs = [(image, os.path.join(root, "labels", os.path.basename(image))) for image in images]
        table, num_ids = CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_NUM_IDS
    elif name == "synthia":  # RAND-CITYSCAPES: RGB/0000000.png, GT/LABELS/0000000.png (16-bit, class in channel 0)
        images = sorted(glob.glob(os.path.join(root, "RGB", "*.png")))
        pairs = [(image, os.path.join(root, "GT", "LABELS", os.path.basename(image))) for image in images]
        table, num_ids = SYNTHIA_ID_TO_TRAIN_ID, SYNTHIA_NUM_IDS
    elif name == "cityscapes":  # leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png, gtFine/..._gtFine_labelIds.png
        images = sorted(glob.glob(os.path.join(root, "leftImg8bit", split, "*", "*_leftImg8bit.png")))
        pairs = [(image, _sibling(image, "leftImg8bit", "gtFine", "gtFine_labelIds.png")) for image in images]
        table, num_ids = CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_NUM_IDS
    elif name == "bdd100k":  # images/10k/<split>/<id>.jpg, labels/sem_seg/masks/<split>/<id>.png (train ids)
        images = sorted(glob.glob(os.path.join(root, "images", "10k", split, "*.jpg")))
        masks = os.path.join(root, "labels", "sem_seg", "masks", split)
        pairs = [(image, os.path.join(masks, os.path.basename(image)[:-4] + ".png")) for image in images]
        table, num_ids = None, NUM_CLASSES
    elif name == "mapillary":  # <split>/images/<id>.jpg, <split>/v1.2/labels/<id>.png (palette PNGs of v1.2 ids)
        folder = {"train": "training", "val": "validation"}.get(split, split)
        labels = _mapillary_label_dir(root, folder)
        images = sorted(glob.glob(os.path.join(root, folder, "images", "*.jpg")))
        pairs = [(image, os.path.join(root, labels, os.path.basename(image)[:-4] + ".png")) for image in images]
        classes = _mapillary_classes(root)
        table, num_ids = mapillary_id_to_train_id(classes), len(classes)
    elif name == "acdc":  # rgb_anon/<condition>/<split>/<seq>/<stem>_rgb_anon.png, gt/.../<stem>_gt_labelIds.png
        images = sorted(glob.glob(os.path.join(root, "rgb_anon", "*", split, "*", "*_rgb_anon.png")))
        pairs = [(image, _sibling(image, "rgb_anon", "gt", "gt_labelIds.png")) for image in images]
        table, num_ids = CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_NUM_IDS
    else:
        raise ValueError(f"Unknown data set {name!r}; use one of {sorted(TEST_SIZES)}.")
    if not pairs:
        raise FileNotFoundError(
            f"{name}: no images found under {root!r} for split {split!r}. Expected the layout of the download "
            f"({_LAYOUT_HELP[name]}); check `root` and `split`."
        )
    for image, label in pairs:
        if not os.path.isfile(label):
            raise FileNotFoundError(f"{name}: the image {image} has no label file {label}.")
    return pairs, table, num_ids


_LAYOUT_HELP = {
    "gta": "images/*.png and labels/*.png",
    "synthia": "RGB/*.png and GT/LABELS/*.png",
    "cityscapes": "leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_labelIds.png",
    "bdd100k": "images/10k/<split>/*.jpg and labels/sem_seg/masks/<split>/*.png",
    "mapillary": "training|validation/images/*.jpg, .../v1.2/labels/*.png and config_v1.2.json",
    "acdc": "rgb_anon/<condition>/<split>/<sequence>/*_rgb_anon.png and gt/.../*_gt_labelIds.png",
}


def half_size(image, resample: int):
    """A PIL image at half its width and height (floored), as the official `mapillary_resize.py` makes Mapillary's
    validation copies: `resample` is bicubic for images, nearest for labels."""
    return image.resize((image.width // 2, image.height // 2), resample=resample)


def _generate_examples(
    pairs: list[tuple[str, str]], id_table: dict[int, int] | None, num_ids: int, ignore_unmapped: bool, half: bool
):
    import io

    from PIL import Image

    for image, label in pairs:
        ids = read_label_ids(label)  # [H, W] raw ids
        train_ids = Image.fromarray(to_train_ids(ids, id_table, num_ids, label, ignore_unmapped))
        image_column = image
        if half:  # nearest on train ids equals nearest on raw ids then the table: the same pixels are picked
            train_ids = half_size(train_ids, Image.NEAREST)
            with Image.open(image) as full:
                buffer = io.BytesIO()
                half_size(full.convert("RGB"), Image.BICUBIC).save(buffer, format="JPEG")  # Pillow's defaults
            image_column = {"bytes": buffer.getvalue(), "path": None}
        buffer = io.BytesIO()
        train_ids.save(buffer, format="PNG")
        yield {
            "image": image_column,
            "label": {"bytes": buffer.getvalue(), "path": None},
            IMAGE_PATH: image,
            LABEL_PATH: label,
            UNMAPPED_PIXELS: unmapped_pixels(ids, id_table, num_ids),
        }


def _fingerprint(name: str, pairs: list[tuple[str, str]], ignore_unmapped: bool, half: bool) -> str:
    """The cache key of a conversion: what it reads (each file's path, size and modification time, so that a file
    changed in place is converted again) and how (data set, options, conversion version)."""
    digest = hashlib.sha256(repr((CONVERSION_VERSION, name, ignore_unmapped, half)).encode())
    for image, label in pairs:
        for path in (image, label):
            stat = os.stat(path)
            digest.update(repr((os.path.abspath(path), stat.st_size, stat.st_mtime_ns)).encode())
    return digest.hexdigest()[:32]


def load_dg_dataset(
    name: str,
    root: str,
    split: str = "val",
    cache_dir: str | None = None,
    num_proc: int | None = None,
    half_size_copies: bool = False,
):
    """One domain-generalization data set, read from the layout it is downloaded in, as a `datasets.Dataset`.

    Each row holds `image` (the image file, decoded on access), `label` (the label map in the 19 Cityscapes train
    ids, 255 ignored), `image_path` and `label_path` (the files it was read from) and `unmapped_pixels` (how many
    pixels of the label file held a value outside the data set's ids). The labels are converted once, with a progress
    bar, and cached by `datasets` under a key made of every file's path, size and modification time: a file changed in
    place is converted again on the next load.

    GTAV's label values outside the 34 Cityscapes ids become 255 (ignored), as the official
    `tools/convert_datasets/gta.py` does; a `UserWarning` and the data set's `info.description` give how many files
    and pixels held them. The other data sets refuse such a file with an error naming it.

    Args:
        name: `gta` (GTAV), `synthia` (SYNTHIA RAND-CITYSCAPES), `cityscapes`, `bdd100k` (its semantic
            segmentation masks), `mapillary` (Vistas v1.2 classes) or `acdc` (all four conditions).
        root: The folder the data set was extracted to (e.g. the one holding `leftImg8bit/` and `gtFine/`).
        split: `train` or `val` (`training` / `validation` for Mapillary work too). GTAV and SYNTHIA have no splits
            in domain generalization: every image is read, whatever `split` says.
        cache_dir: Where `datasets` caches the converted labels (default: its own cache).
        num_proc: Processes converting the labels (default: one).
        half_size_copies: Images and labels at half their width and height (floored), made as the official
            `tools/convert_datasets/mapillary_resize.py` makes the Mapillary validation copies that the official
            evaluation scores (`half/val_img`, `half/val_label`): images bicubic, saved as JPEG with Pillow's
            defaults, labels nearest. The `image` column then holds the half-size JPEG, `image_path` the original.

    Raises:
        FileNotFoundError: No such folder, no images in it, or an image without its label file (named).
        ValueError: A label file holding ids the data set does not have (named), except for GTAV.
        MissingExtraError: datasets or Pillow is missing (`pip install "rein-peft[examples]"`), checked first.
    """
    require("datasets", "PIL", purpose="load_dg_dataset")
    import datasets

    pairs, id_table, num_ids = _files(name, root, split)
    ignore_unmapped = name in UNMAPPED_IGNORED
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.Image(),
            IMAGE_PATH: datasets.Value("string"),
            LABEL_PATH: datasets.Value("string"),
            UNMAPPED_PIXELS: datasets.Value("int64"),
        }
    )
    gen_kwargs = {
        "pairs": pairs,
        "id_table": id_table,
        "num_ids": num_ids,
        "ignore_unmapped": ignore_unmapped,
        "half": half_size_copies,
    }
    try:
        dataset = datasets.Dataset.from_generator(
            _generate_examples,
            features=features,
            gen_kwargs=gen_kwargs,
            cache_dir=cache_dir,
            num_proc=num_proc if num_proc and num_proc > 1 else None,
            split=datasets.Split.TRAIN if split == "train" else datasets.Split.VALIDATION,
            fingerprint=_fingerprint(name, pairs, ignore_unmapped, half_size_copies),
        )
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, (ValueError, OSError)):  # the label file's own error, not the wrapper
            raise error.__cause__ from None
        # from worker processes the cause arrives as text: find the file again, in this process
        for _, label in pairs:
            to_train_ids(read_label_ids(label), id_table, num_ids, label)
        raise
    counts = np.asarray(dataset[UNMAPPED_PIXELS], dtype=np.int64)
    files, pixels = int((counts > 0).sum()), int(counts.sum())
    split_name = "" if name in SPLITLESS else f" ({split})"
    dataset.info.description = (
        f"{name}{split_name} from {root}: {len(dataset)} images, labels in the 19 Cityscapes train ids (255 ignored)"
        + (", half-size copies as the official mapillary_resize.py makes them" if half_size_copies else "")
        + f"; {pixels} pixels in {files} label files held values outside the data set's ids"
        + (" and were mapped to 255, as the official conversion does." if ignore_unmapped else ".")
    )
    if pixels:
        warnings.warn(
            f"{name} at {root}: {pixels} pixels in {files} of {len(dataset)} label files hold values outside the "
            f"{num_ids} ids of the data set; they are ignored (255), as the official conversion does. Per file: the "
            f"dataset's `{UNMAPPED_PIXELS}` column.",
            stacklevel=2,
        )
    return dataset


# --- the official training augmentations (`configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py`) -----------------

# RandomChoiceResize(scales=[int(512 * x * 0.1) for x in range(5, 21)], resize_type="ResizeShortestEdge",
# max_size=2048): the short side becomes one of 0.5, 0.6, ..., 2.0 times 512, the long side at most 2048
SCALE_RATIOS = tuple(step / 10 for step in range(5, 21))
CAT_MAX_RATIO_TRIES = 10  # mmsegmentation's RandomCrop draws at most 10 crops to satisfy `cat_max_ratio`
# PhotoMetricDistortion's defaults; the hue delta is in OpenCV's hue unit (of 180)
BRIGHTNESS_DELTA, CONTRAST_RANGE, SATURATION_RANGE, HUE_DELTA = 32, (0.5, 1.5), (0.5, 1.5), 18


@dataclass
class DGTrainAugmentation:
    """The official training pipeline on one image and label map: random rescale (the short side one of
    `scale_ratios` times `base_scale`, the long side at most `max_size`), random crop of `crop_size` redrawn up to
    10 times until no class covers more than `cat_max_ratio` of its labelled pixels, horizontal flip with
    `flip_prob`, and mmsegmentation's photometric distortion (brightness, contrast, saturation, hue, each with
    probability 0.5, contrast before or after the colour changes).

    Args:
        base_scale: The short side that the ratios multiply (512).
        scale_ratios: The ratios one is drawn from (0.5 to 2.0 in steps of 0.1).
        max_size: The longest side after rescaling (2048).
        crop_size: The square crop's side (512); smaller images are padded (0 after normalisation, label 255).
        cat_max_ratio: A crop is redrawn while one class covers this share of its labelled pixels or more (0.75).
        flip_prob: Probability of a horizontal flip.
        photometric: Apply the photometric distortion.
    """

    base_scale: int = 512
    scale_ratios: tuple[float, ...] = SCALE_RATIOS
    max_size: int = 2048
    crop_size: int = 512
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True

    def __call__(self, image, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """`image` (PIL) and `label` `[H, W]` -> pixels `[h, w, 3]` float32 in 0-255 and labels `[h, w]` uint8, at
        most `crop_size` a side (`dg_train_transform` pads them)."""
        from PIL import Image

        ratio = self.scale_ratios[int(rng.integers(len(self.scale_ratios)))]
        short = self.base_scale * ratio
        factor = min(short / min(image.size), self.max_size / max(image.size))
        size = (int(image.width * factor + 0.5), int(image.height * factor + 0.5))
        image = image.convert("RGB").resize(size, Image.BILINEAR)
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
        top, left = self._crop_corner(label, rng)
        window = (slice(top, top + self.crop_size), slice(left, left + self.crop_size))
        pixels, label = np.asarray(image, dtype=np.float32)[window], label[window]
        if rng.random() < self.flip_prob:
            pixels, label = pixels[:, ::-1], label[:, ::-1]
        if self.photometric:
            pixels = photometric_distortion(pixels, rng)
        return np.ascontiguousarray(pixels), np.ascontiguousarray(label)

    def _crop_corner(self, label: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
        height, width = label.shape
        for _ in range(CAT_MAX_RATIO_TRIES):
            top = int(rng.integers(max(height - self.crop_size, 0) + 1))
            left = int(rng.integers(max(width - self.crop_size, 0) + 1))
            if self.cat_max_ratio >= 1:
                break
            crop = label[top : top + self.crop_size, left : left + self.crop_size]
            counts = np.bincount(crop[crop != IGNORE_INDEX].ravel(), minlength=1)
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return top, left


def photometric_distortion(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmsegmentation's `PhotoMetricDistortion` on `[H, W, 3]` RGB pixels in 0-255 (float32): brightness delta in
    +-32, contrast x0.5-1.5 (before or after the colour changes, at random), saturation x0.5-1.5 and hue +-18 (of
    180) in HSV; each with probability 0.5, the values clipped to 0-255 after each step. HSV goes through Pillow
    (8-bit, hue of 256) where mmsegmentation uses OpenCV."""
    from PIL import Image

    def chance() -> bool:
        return bool(rng.integers(2))

    if chance():
        pixels = np.clip(pixels + rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA), 0, 255)
    contrast_first = bool(rng.integers(2))
    if contrast_first and chance():
        pixels = np.clip(pixels * rng.uniform(*CONTRAST_RANGE), 0, 255)
    change_saturation, change_hue = chance(), chance()
    if change_saturation or change_hue:
        hsv = np.asarray(Image.fromarray(pixels.astype(np.uint8)).convert("HSV")).astype(np.float32)
        if change_saturation:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*SATURATION_RANGE), 0, 255)
        if change_hue:
            hsv[..., 0] = (hsv[..., 0] + rng.integers(-HUE_DELTA, HUE_DELTA) * 256 / 180) % 256
        hsv_image = Image.frombytes("HSV", (hsv.shape[1], hsv.shape[0]), hsv.astype(np.uint8).tobytes())
        pixels = np.asarray(hsv_image.convert("RGB")).astype(np.float32)
    if not contrast_first and chance():
        pixels = np.clip(pixels * rng.uniform(*CONTRAST_RANGE), 0, 255)
    return pixels


def dg_train_transform(augmentation: DGTrainAugmentation, image_mean: tuple[float, ...], image_std: tuple[float, ...]):
    """A `Dataset.with_transform` batch transform: each image and label map augmented by `augmentation`, normalised
    (`image_mean`, `image_std` in 0-1) and padded to the crop (0 after normalisation, labels 255), as
    mmsegmentation's data preprocessor pads. Randomness comes from torch's generator, which `Trainer` seeds and the
    data loader reseeds in each worker.

    Args:
        augmentation: The training augmentation.
        image_mean: Per-channel mean in 0-1.
        image_std: Per-channel standard deviation in 0-1.
    """
    import torch

    mean = np.asarray(image_mean, dtype=np.float32) * 255
    std = np.asarray(image_std, dtype=np.float32) * 255
    side = augmentation.crop_size

    def transform(batch: dict) -> dict:
        rng = np.random.default_rng(int(torch.randint(2**62, ()).item()))
        pixel_values, labels = [], []
        for image, label in zip(batch["image"], batch["label"], strict=True):
            pixels, label = augmentation(image, np.asarray(label), rng)
            padded = np.zeros((side, side, 3), dtype=np.float32)
            padded[: pixels.shape[0], : pixels.shape[1]] = (pixels - mean) / std
            padded_label = np.full((side, side), IGNORE_INDEX, dtype=np.int64)
            padded_label[: label.shape[0], : label.shape[1]] = label
            pixel_values.append(torch.from_numpy(padded).permute(2, 0, 1))
            labels.append(torch.from_numpy(padded_label))
        return {"pixel_values": pixel_values, "labels": labels}

    return transform
