"""Reproduce Rein's domain-generalization table: train on GTAV (or any source), test on Cityscapes, BDD100K and
Mapillary (or any targets), as the official 512x512 config does, through `transformers.Trainer`.

    python examples/reproduce_domain_generalization.py \\
        --source gta=data/gta \\
        --target cityscapes=data/cityscapes bdd100k=data/bdd100k mapillary=data/mapillary \\
        --backbone checkpoints/dinov2-large-p16 --methods frozen rein --output_dir rein-dg

- data: `rein_peft.load_dg_dataset` reads each data set in the layout it is downloaded in (NAME is the data set's kind:
  gta, synthia, cityscapes, bdd100k, mapillary, acdc; `gta=...` and `synthia=...` together train on both).
- model: `rein_peft.build_official_segmenter` (DINOv2 at patch 16 with the official pyramid, Mask2Former with 100
  queries; Rein with 100 low-rank tokens linked to the queries), for each of `--methods` (rein, frozen, full, lora,
  soma; SoMA with its own optimizer recipe, `create_soma_optimizer` and `PolyLRCosineWeightDecay`).
- training (every value a flag, the defaults the official config's): random rescale (short side 0.5-2.0 x 512, long
  side <= 2048), random crop 512 with `cat_max_ratio` 0.75, flip, photometric distortion; batch 4, 40k iterations,
  AdamW lr 1e-4, weight decay 0.05 (none on tokens, norms, embeddings), poly schedule (power 0.9, no warm-up); full
  fine-tuning's backbone at 0.1 x the lr. `accelerate launch` trains on several GPUs (then set
  `--per_device_train_batch_size` so that the total batch is 4).
- evaluation: Mapillary scored on half-size copies of its validation set, made as the official
  `tools/convert_datasets/mapillary_resize.py` makes them (the official evaluation and the paper's numbers;
  `--mapillary_scoring full` scores the originals); each target resized to its test size (Cityscapes and Mapillary
  1024x512, BDD100K 1280x720, keeping the aspect ratio), sliding window of 512x512 crops every 341 pixels, scores
  compared at the label maps' own size; mIoU over the 19 classes per target and the mean over targets.
- output: `results.md` (the table, the paper's numbers beside), `results.json` (every number, per-class IoU) and
  `predictions_<method>_<target>.png` (columns image, label, prediction) under `--output_dir`.

With no `--source` it runs offline: tiny fake data sets written in the real layouts (see `fake_dg_datasets.py`), a
tiny DINOv2 and decoder, every size divided by 8 and a few steps: minutes on 2 CPU cores. It checks the pipeline, not
the method, and its table and pictures say so.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from fake_dg_datasets import write_fake_dataset
from PIL import Image, ImageDraw
from rein_example_utils import OUTPUTS, QUIET_ON_CPU, check_writable, fail
from transformers import Dinov2Config, Dinov2Model, HfArgumentParser, Trainer, TrainerCallback, TrainingArguments
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import rein_peft
from rein_peft.official import dg_data, evaluation, protocol
from rein_peft.official.segmenter import BACKBONE_MODULE, METHODS
from rein_peft.utils.compat import silence_peft_deprecations
from rein_peft.utils.extras import MissingExtraError, require

# reported mIoU (%), DINOv2-L + Mask2Former trained on GTAV: the paper's Table (frozen backbone, Rein) and the official
# README's release (Rein); REIN.md, "Reference numbers"
REPORTED = {
    ("frozen", "cityscapes"): (63.3, "paper"),
    ("frozen", "bdd100k"): (56.1, "paper"),
    ("frozen", "mapillary"): (63.9, "paper"),
    ("frozen", "mean"): (61.1, "paper"),
    ("rein", "cityscapes"): (66.4, "paper; 66.7 official README"),
    ("rein", "bdd100k"): (60.4, "paper; 60.0 official README"),
    ("rein", "mapillary"): (66.1, "paper"),
    ("rein", "mean"): (64.3, "paper"),
    ("full", "mean"): (61.7, "as quoted on the official issues"),
}
# the official 512x512 config's training; full fine-tuning's backbone learning rate multiplier
TRAINING_DEFAULTS = {
    "output_dir": os.path.join(OUTPUTS, "rein-domain-generalization"),
    "max_steps": 40000,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-4,
    "weight_decay": 0.05,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "lr_scheduler_type": "polynomial",
    "lr_scheduler_kwargs": {"power": 0.9, "lr_end": 0.0},
    "warmup_steps": 0,
    "logging_steps": 50,
    "save_strategy": "steps",
    "save_steps": 4000,
    "save_total_limit": 3,
    "dataloader_num_workers": 2,
    "report_to": "none",
    **QUIET_ON_CPU,
    "remove_unused_columns": False,
    "seed": 0,
}
# the offline default: a few steps on tiny data, every size divided by 8 (crop 64, stride 42, Cityscapes at 128x64)
OFFLINE_DEFAULTS = {
    "output_dir": os.path.join(OUTPUTS, "rein-domain-generalization-offline"),
    "max_steps": 6,
    "per_device_train_batch_size": 2,
    "learning_rate": 1e-3,
    "logging_steps": 2,
    "save_strategy": "no",
    "dataloader_num_workers": 0,
    "size_divisor": 8,
    "methods": ["frozen", "rein"],
}
# how Mapillary is scored: half-size copies (the official evaluation's `half/val_img`, `half/val_label`) or originals
MAPILLARY_HALF, MAPILLARY_FULL = "half", "full"
OFFLINE_SOURCE, OFFLINE_TARGETS = "gta", ("cityscapes", "bdd100k", "mapillary")
OFFLINE_IMAGES = 4
OFFLINE_BACKBONE = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "mlp_ratio": 2}
OFFLINE_DECODER = {
    "num_queries": 8,
    "hidden_dim": 32,
    "num_decoder_layers": 1,
    "encoder_layers": 1,
    "encoder_feedforward_dim": 64,
    "dim_feedforward": 64,
    "num_attention_heads": 2,
    "train_num_points": 1024,
}
# the prediction pictures: the columns' names, the height of each caption line (pixels)
PICTURE_COLUMNS = ("image", "label", "prediction")
CAPTION_HEIGHT = 20
# what the offline run's table and pictures say about its numbers
OFFLINE_NOTE = "Offline run on fake data: it only exercises the pipeline; its numbers say nothing about the method."
# Cityscapes' colours of the 19 classes, for the prediction pictures (255: black)
PALETTE = np.zeros((256, 3), dtype=np.uint8)
PALETTE[:19] = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]  # fmt: skip


@dataclass
class ProtocolArguments:
    source: list[str] = field(
        default_factory=list, metadata={"help": "NAME=PATH of the data set(s) to train on, e.g. gta=data/gta."}
    )
    target: list[str] = field(
        default_factory=list, metadata={"help": "NAME=PATH of each data set to test on, e.g. cityscapes=data/cs."}
    )
    backbone: str | None = field(
        default=None, metadata={"help": "DINOv2 checkpoint at patch 16 (rein_peft.resize_patch_embedding's output)."}
    )
    methods: list[str] = field(default_factory=lambda: ["rein"], metadata={"help": f"Any of {METHODS}."})
    source_split: str = field(default="train", metadata={"help": "Split of the source data sets."})
    target_split: str = field(default="val", metadata={"help": "Split of the target data sets."})
    base_scale: int = field(default=512, metadata={"help": "Short side that the rescale ratios multiply."})
    min_scale_ratio: float = field(default=0.5, metadata={"help": "Smallest rescale ratio (steps of 0.1)."})
    max_scale_ratio: float = field(default=2.0, metadata={"help": "Largest rescale ratio."})
    max_size: int = field(default=2048, metadata={"help": "Longest side after the random rescale."})
    crop_size: int = field(default=512, metadata={"help": "Training crops and sliding-window crops."})
    cat_max_ratio: float = field(default=0.75, metadata={"help": "Largest share of one class in a training crop."})
    flip_prob: float = field(default=0.5, metadata={"help": "Probability of a horizontal flip."})
    photometric: bool = field(default=True, metadata={"help": "Photometric distortion in training."})
    stride: int = field(default=341, metadata={"help": "Sliding-window stride."})
    test_size: list[str] = field(
        default_factory=list,
        metadata={"help": "NAME=WxH test scales replacing the official ones (e.g. bdd100k=1280x720)."},
    )
    backbone_lr_multiplier: float = field(default=0.1, metadata={"help": "Backbone lr factor of full fine-tuning."})
    size_divisor: int = field(
        default=1, metadata={"help": "Divide every size (scales, crops, stride, test sizes) by it."}
    )
    mapillary_scoring: str = field(
        default=MAPILLARY_HALF,
        metadata={
            "help": f"{MAPILLARY_HALF!r}: score Mapillary on half-size copies made as the official "
            "mapillary_resize.py makes them (the official evaluation, the paper's numbers); "
            f"{MAPILLARY_FULL!r}: on the originals.",
            "choices": [MAPILLARY_HALF, MAPILLARY_FULL],
        },
    )
    max_eval_images: int | None = field(default=None, metadata={"help": "Test on at most this many images a target."})
    num_pictures: int = field(default=3, metadata={"help": "Images per target in the prediction pictures."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes converting the labels on first load."})


def _named_paths(specs: list[str], flag: str) -> list[tuple[str, str]]:
    pairs = []
    for spec in specs:
        name, _, path = spec.partition("=")
        if not path or name not in dg_data.TEST_SIZES:
            fail(f"{flag} takes NAME=PATH with NAME one of {sorted(dg_data.TEST_SIZES)}, got {spec!r}.")
        pairs.append((name, path))
    return pairs


def _test_sizes(args: ProtocolArguments) -> dict[str, tuple[int, int]]:
    """Each target's test scale, (height, width) as `rein_peft.keep_ratio_size` takes it."""
    sizes = dict(dg_data.TEST_SIZES)
    for spec in args.test_size:
        name, _, size = spec.partition("=")
        width, _, height = size.partition("x")
        if name not in sizes or not (width.isdigit() and height.isdigit()):
            fail(f"--test_size takes NAME=WxH (e.g. bdd100k=1280x720), got {spec!r}.")
        sizes[name] = (int(height), int(width))
    return {name: (height // args.size_divisor, width // args.size_divisor) for name, (height, width) in sizes.items()}


def _augmentation(args: ProtocolArguments) -> dg_data.DGTrainAugmentation:
    ratios = tuple(
        ratio for ratio in dg_data.SCALE_RATIOS if args.min_scale_ratio - 1e-9 <= ratio <= args.max_scale_ratio + 1e-9
    )
    if not ratios:
        fail(
            f"no rescale ratio between {args.min_scale_ratio} and {args.max_scale_ratio} (ratios: 0.5, 0.6, ... 2.0)."
        )
    return dg_data.DGTrainAugmentation(
        base_scale=args.base_scale // args.size_divisor,
        scale_ratios=ratios,
        max_size=args.max_size // args.size_divisor,
        crop_size=args.crop_size // args.size_divisor,
        cat_max_ratio=args.cat_max_ratio,
        flip_prob=args.flip_prob,
        photometric=args.photometric,
    )


def write_offline_world(folder: str) -> tuple[list[str], list[str], str]:
    """The offline default's inputs: fake data sets in their real layouts and a tiny DINOv2 checkpoint."""
    source = f"{OFFLINE_SOURCE}={_fake_dataset_folder(OFFLINE_SOURCE, folder, 'train', seed=1)}"
    targets = [f"{name}={_fake_dataset_folder(name, folder, 'val', seed=2)}" for name in OFFLINE_TARGETS]
    backbone = os.path.join(folder, "dinov2-tiny-p8")
    if not os.path.isfile(os.path.join(backbone, "config.json")):
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(**OFFLINE_BACKBONE, patch_size=8, image_size=64)).save_pretrained(backbone)
    return [source], targets, backbone


def _fake_dataset_folder(name: str, folder: str, split: str, seed: int) -> str:
    """`folder/name`, holding a fake copy of data set `name` (written on first use)."""
    root = os.path.join(folder, name)
    if not os.path.isdir(root):
        write_fake_dataset(name, root, OFFLINE_IMAGES, split=split, seed=seed)
    return root


def load_source(pairs: list[tuple[str, str]], split: str, num_proc: int | None):
    import datasets

    parts = [dg_data.load_dg_dataset(name, path, split, num_proc=num_proc) for name, path in pairs]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_target(name: str, path: str, args: ProtocolArguments):
    """One target data set as it is scored: Mapillary as `--mapillary_scoring` says (half-size copies by default)."""
    half = name == "mapillary" and args.mapillary_scoring == MAPILLARY_HALF
    return dg_data.load_dg_dataset(name, path, args.target_split, num_proc=args.num_proc, half_size_copies=half)


def prediction_picture(examples: dict, path: str, caption: str, height: int = 256) -> None:
    """Under `caption`, one row per image: the image, its label map and the prediction (Cityscapes' colours), each
    column named."""
    if not examples:
        return
    rows = []
    for image, label, prediction in examples.values():
        width = round(image.width * height / image.height)
        tiles = [image.convert("RGB").resize((width, height), Image.BILINEAR)]
        tiles += [Image.fromarray(PALETTE[ids]).resize((width, height), Image.NEAREST) for ids in (label, prediction)]
        rows.append(np.concatenate([np.asarray(tile) for tile in tiles], axis=1))
    width = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, 4), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    tile_width = width // len(PICTURE_COLUMNS)
    picture = Image.new("RGB", (grid.width, grid.height + 2 * CAPTION_HEIGHT), "white")
    picture.paste(grid, (0, 2 * CAPTION_HEIGHT))
    draw = ImageDraw.Draw(picture)
    draw.text((4, 4), caption, fill="black")
    for index, name in enumerate(PICTURE_COLUMNS):
        draw.text((index * tile_width + 4, CAPTION_HEIGHT + 4), name, fill="black")
    picture.save(path)


def results_markdown(result: dict) -> str:
    targets = result["target_names"]
    lines = [
        f"mIoU (%) trained on {' + '.join(result['source_names'])}, backbone {result['backbone']}, "
        f"{result['settings']['max_steps']} steps",
        "",
        "| method | " + " | ".join(targets) + " | mean | train s |",
        "| --- " * (len(targets) + 3) + "|",
    ]
    for method, row in result["methods"].items():
        cells = []
        for name in [*targets, "mean"]:
            measured = row["mean_miou"] if name == "mean" else row["targets"][name]["mean_iou"]
            reported = REPORTED.get((method, name)) if result["source_names"] == ["gta"] else None
            cells.append(f"{100 * measured:.1f}" + (f" ({reported[0]}, {reported[1]})" if reported else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {row['train_seconds']:.0f} |")
    lines += ["", "In brackets: the number reported for DINOv2-L + Mask2Former trained on GTAV, and where it is from."]
    if result["offline"]:
        lines = [f"**{OFFLINE_NOTE}**", "", *lines]
    return "\n".join(lines) + "\n"


def run_method(
    method, args, training, config, backbone, train_data, targets, test_sizes, callbacks, offline: bool
) -> dict:
    model = rein_peft.build_official_segmenter(backbone, num_labels=dg_data.NUM_CLASSES, method=method, config=config)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    full = method == "full"
    scheduler = None  # Trainer's own: the polynomial decay of the official schedule
    adamw = {
        "lr": training.learning_rate,
        "weight_decay": training.weight_decay,
        "betas": (training.adam_beta1, training.adam_beta2),
        "eps": training.adam_epsilon,
    }
    if method == "soma":  # SoMA's recipe: its AdamW groups, poly lr and the cosine-annealed weight decay
        optimizer = rein_peft.create_soma_optimizer(model, **adamw)
        power = training.lr_scheduler_kwargs.get("power", 1.0)
        scheduler = rein_peft.PolyLRCosineWeightDecay(optimizer, total_steps=training.max_steps, power=power)
    else:
        optimizer = protocol.official_optimizer(
            model,
            **adamw,
            backbone=base.get_submodule(BACKBONE_MODULE) if full else None,
            backbone_lr_multiplier=args.backbone_lr_multiplier if full else 1.0,
        )
    method_args = TrainingArguments(**{**training.to_dict(), "output_dir": os.path.join(training.output_dir, method)})
    trainer = Trainer(
        model=model,
        args=method_args,
        train_dataset=train_data,
        data_collator=protocol.segmentation_collator(base.config),
        optimizers=(optimizer, scheduler),
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    seconds = time.perf_counter() - start
    if method == "soma":  # a plain LoRA adapter of the unmodified backbone (docs/soma.md)
        rein_peft.save_soma_adapter(model, os.path.join(method_args.output_dir, "final"))
    else:
        trainer.save_model(os.path.join(method_args.output_dir, "final"))
    row = {
        "train_seconds": seconds,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if trainer.is_world_process_zero():  # one process evaluates, the others wait
        row["targets"] = {}
        device = trainer.args.device
        for name, dataset in targets.items():
            result = evaluation.evaluate_segmentation(
                model.to(device),
                dataset,
                IMAGENET_DEFAULT_MEAN,
                IMAGENET_DEFAULT_STD,
                test_size=test_sizes[name.split("=")[0]],
                crop_size=args.crop_size // args.size_divisor,
                stride=max(1, args.stride // args.size_divisor),
                description=f"{method} on {name}",
                predictions_of=range(args.num_pictures),
            )
            caption = f"{method} on {name}" + (f". {OFFLINE_NOTE}" if offline else "")
            prediction_picture(
                result.pop("predictions"),
                os.path.join(training.output_dir, f"predictions_{method}_{name}.png"),
                caption,
            )
            result["per_category_iou"] = dict(zip(dg_data.CITYSCAPES_CLASSES, result["per_category_iou"], strict=True))
            result["per_category_accuracy"] = dict(
                zip(dg_data.CITYSCAPES_CLASSES, result["per_category_accuracy"], strict=True)
            )
            row["targets"][name] = result
            print(f"{method} on {name}: mIoU {100 * result['mean_iou']:.1f}", flush=True)
        row["mean_miou"] = statistics.fmean(result["mean_iou"] for result in row["targets"].values())
    trainer.accelerator.wait_for_everyone()
    return row


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> dict:
    offline = "--source" not in (sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ProtocolArguments, TrainingArguments))
    parser.set_defaults(**{**TRAINING_DEFAULTS, **(OFFLINE_DEFAULTS if offline else {})})
    args, training = parser.parse_args_into_dataclasses(args=argv)
    silence_peft_deprecations()  # PEFT's, on every PeftModel built: nothing for the user to do
    if bad := [method for method in args.methods if method not in METHODS]:
        fail(f"--methods takes {METHODS}, got {bad}.")
    try:  # before any data set is written or read
        require("scipy", purpose="The official segmenter's Mask2Former (its loss matches predictions to labels)")
    except MissingExtraError as error:
        fail(str(error))
    check_writable(training.output_dir)
    start = time.perf_counter()
    if offline:
        with training.main_process_first(desc="writing the offline data sets"):
            args.source, args.target, args.backbone = write_offline_world(os.path.join(training.output_dir, "offline"))
    elif not args.target:
        fail("--target NAME=PATH is needed with --source: the data set(s) to test on.")
    elif args.backbone is None:
        fail("--backbone is needed with --source: a DINOv2 checkpoint at patch 16 (see the docs' conversion step).")
    sources, target_paths = _named_paths(args.source, "--source"), _named_paths(args.target, "--target")
    test_sizes = _test_sizes(args)
    try:
        with training.main_process_first(desc="converting the labels"):
            train_data = load_source(sources, args.source_split, args.num_proc)
            targets = {}
            for name, path in target_paths:
                key = name if name not in targets else f"{name}={path}"
                targets[key] = load_target(name, path, args)
                if args.max_eval_images is not None:
                    targets[key] = targets[key].select(range(min(args.max_eval_images, len(targets[key]))))
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    try:
        config = rein_peft.official_segmenter_config(
            args.backbone, dg_data.NUM_CLASSES, **(OFFLINE_DECODER if offline else {})
        )
    except (OSError, ValueError) as error:  # no such checkpoint, a patch size the pyramid cannot take
        fail(f"--backbone {args.backbone!r}: {error}")
    config.id2label = dict(enumerate(dg_data.CITYSCAPES_CLASSES))
    config.label2id = {name: index for index, name in config.id2label.items()}
    transform = dg_data.dg_train_transform(_augmentation(args), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    train_data = train_data.with_transform(transform)
    rows = {
        method: run_method(
            method, args, training, config, args.backbone, train_data, targets, test_sizes, callbacks, offline
        )
        for method in args.methods
    }
    result = {
        "source_names": [name for name, _ in sources],
        "target_names": list(targets),
        "backbone": args.backbone,
        "offline": offline,
        "settings": {
            **asdict(args),
            "max_steps": training.max_steps,
            "batch_size": training.per_device_train_batch_size,
        },
        "test_sizes": {name: test_sizes[name.split("=")[0]] for name in targets},
        "methods": rows,
        "seconds": time.perf_counter() - start,
    }
    if "targets" in next(iter(rows.values())):  # the main process
        with open(os.path.join(training.output_dir, "results.json"), "w") as file:
            json.dump(result, file, indent=2)
        table = results_markdown(result)
        with open(os.path.join(training.output_dir, "results.md"), "w") as file:
            file.write(table)
        print("\n" + table + f"\nwrote results.md, results.json and the prediction pictures to {training.output_dir}")
    return result


if __name__ == "__main__":
    main()
