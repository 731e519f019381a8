"""The task: what the methods train on and are measured on. The miniature's (the synthetic world's source style to
train on, its held-out scenes in every style), or the user's `datasets` folders or Hub datasets."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import datasets
from transformers import Mask2FormerConfig, UperNetConfig

from rein_peft.official import protocol

from .settings import DEFAULT_SETTING, SETTINGS, Setting
from .world import SOURCE_STYLE, scenes


@dataclass
class Task:
    """What is trained on and measured: a train split, a held-out source split, and one split per target style."""

    train: datasets.Dataset
    source: datasets.Dataset
    targets: dict[str, datasets.Dataset]
    num_labels: int
    class_names: list[str] = field(default_factory=list)
    paired: bool = False  # each target holds the source's held-out scenes, in order, drawn in another style


def miniature_task(
    train_images: int, eval_images: int, side: int, setting: Setting = SETTINGS[DEFAULT_SETTING]
) -> Task:
    """`train_images` scenes of `setting` in its source style to train on, and `eval_images` held-out scenes drawn in
    the source and in every target style, all `side` pixels square."""
    # the held-out scenes are the same layouts in every style: only the style differs between source and targets
    targets = {
        name: scenes(style, eval_images, 100, side, draw=setting.draw) for name, style in setting.styles.items()
    }
    source = targets.pop(SOURCE_STYLE)
    train = scenes(setting.styles[SOURCE_STYLE], train_images, 1, side, draw=setting.draw)
    names = list(setting.class_names)
    return Task(train, source, targets, len(names), names, paired=True)


def load_any_dataset(path_or_name: str) -> datasets.Dataset | datasets.DatasetDict:
    """A folder written by `save_to_disk`, or a Hub dataset."""
    if os.path.isdir(path_or_name):  # written by `save_to_disk`
        return datasets.load_from_disk(path_or_name)
    return datasets.load_dataset(path_or_name)


def split_of(dataset: datasets.Dataset | datasets.DatasetDict, name: str, where: str) -> datasets.Dataset:
    """Split `name` of a dataset dict (its only split, or a plain dataset itself); `where` names it in the error."""
    if isinstance(dataset, datasets.Dataset):
        return dataset
    if name in dataset:
        return dataset[name]
    if len(dataset) == 1:
        return next(iter(dataset.values()))
    raise SystemExit(f"{where} has no {name!r} split (splits: {list(dataset)}); save that split alone or rename it.")


def user_task(args: argparse.Namespace) -> Task:
    """The task of `--source`, `--target NAME=DATASET` and `--num_labels`: the source's "train" split to train on,
    its "validation" split (or a tenth of it) held out, each target's "validation" split (or whole) evaluated."""
    source = load_any_dataset(args.source)
    if isinstance(source, datasets.DatasetDict) and "validation" in source:
        train, held_out = split_of(source, "train", args.source), source["validation"]
    else:
        parts = split_of(source, "train", args.source).train_test_split(test_size=0.1, seed=0)
        train, held_out = parts["train"], parts["test"]
    targets = {}
    for spec in args.target:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--target takes NAME=DATASET (e.g. cityscapes=./cityscapes), got {spec!r}.")
        targets[name] = split_of(load_any_dataset(path), "validation", path)
    if args.num_labels is None:
        raise SystemExit("--num_labels is required with --source (the number of classes, without the ignore index).")
    return Task(train, held_out, targets, args.num_labels, [f"class {index}" for index in range(args.num_labels)])


def pixel_batches(
    dataset: datasets.Dataset, processor, side: int, config: UperNetConfig | Mask2FormerConfig
) -> datasets.Dataset:
    """The dataset read as model inputs (`rein_peft.official.protocol.resize_transform`): images resized to `side` and
    normalised by the backbone's processor, label maps resized with nearest neighbour and checked."""
    return dataset.with_transform(protocol.resize_transform(processor, side, config))
