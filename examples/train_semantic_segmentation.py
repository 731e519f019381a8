"""Fine-tune a semantic-segmentation model over a frozen DINOv2 with Rein through `transformers.Trainer`.

With no flags it runs offline on an embedded task: a small DINOv2 built from a config and a dataset it draws itself
(red squares on textured noise, labelled by their size: small or large). Point it at real weights and data with
`--backbone_name_or_path facebook/dinov2-small --dataset_name <hub dataset or folder>`.

The decoder is UperNet (`--decoder upernet`) or Mask2Former (`--decoder mask2former`, whose queries Rein's tokens can
replace with `--link_token_to_query`), both over a `Dinov2Backbone`, or over a ConvNeXt / DINOv3 ConvNeXt backbone
(`--backbone convnext` or `--backbone dinov3_convnext` for the embedded task; a checkpoint's family is read from its
config), which gets one Rein per stage and feeds the decoder every stage; `--official_segmenter` builds the official
Rein segmenter instead (`rein_peft.build_official_segmenter`: Mask2Former over a feature pyramid, the official Rein).
It trains the decoder over the frozen backbone alone (the baseline) and Rein with the same decoder, evaluates both on
held-out images with mean IoU, saves the adapter, reloads it with `PeftModel.from_pretrained`, re-evaluates, and
prints a results table.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from peft import PeftModel, get_peft_model
from PIL import Image
from rein_example_utils import (
    OUTPUTS,
    QUIET_ON_CPU,
    ReinArguments,
    check_writable,
    fail,
    folder_size_mb,
    print_results_table,
)
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    BitImageProcessorPil,
    ConvNextConfig,
    ConvNextModel,
    Dinov2Config,
    Dinov2Model,
    DINOv3ConvNextConfig,
    DINOv3ConvNextModel,
    HfArgumentParser,
    Mask2FormerForUniversalSegmentation,
    PretrainedConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    UperNetForSemanticSegmentation,
)

import rein_peft
from rein_peft.official import protocol
from rein_peft.official.protocol import BACKBONE_MODULE, DECODER_MODULES
from rein_peft.utils.compat import silence_peft_deprecations
from rein_peft.utils.extras import MissingExtraError, require

DEFAULT_IMAGE_SIZE = 224  # for a checkpoint, unless --image_size says otherwise
EMBEDDED_DEFAULTS = {
    "output_dir": os.path.join(OUTPUTS, "rein-semantic-segmentation"),
    "num_train_epochs": 6,
    "per_device_train_batch_size": 16,
    "learning_rate": 1e-3,
    "weight_decay": 0.05,
    "eval_strategy": "no",
    "save_strategy": "epoch",
    "save_total_limit": 1,
    "logging_steps": 20,
    "report_to": "none",
    **QUIET_ON_CPU,
    "remove_unused_columns": False,
    "seed": 0,
}


@dataclass
class ScriptArguments:
    backbone_name_or_path: str | None = field(
        default=None, metadata={"help": "DINOv2 checkpoint (Hub or folder); default: build the embedded tiny DINOv2."}
    )
    decoder: str = field(default="upernet", metadata={"help": "upernet or mask2former (over the backbone)."})
    backbone: str = field(
        default="dinov2",
        metadata={"help": "Embedded backbone: dinov2, convnext or dinov3_convnext (one Rein per stage)."},
    )
    out_indices: list[int] | None = field(
        default=None,
        metadata={"help": "Layers (1-based) whose refined outputs feed the decoder; default: 4 evenly spaced."},
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Side the images are resized to; default: the checkpoint's crop size."}
    )
    num_queries: int = field(default=16, metadata={"help": "Mask2Former's queries (= token_length when linked)."})
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset or a `save_to_disk` folder (image + label map); default: embedded."},
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the label maps (images)."})
    num_labels: int | None = field(default=None, metadata={"help": "Classes of the dataset; default: embedded 3."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str = field(default="validation", metadata={"help": "Held-out split; a fifth of train if absent."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many held-out images."})
    skip_baseline: bool = field(default=False, metadata={"help": "Do not train the frozen-backbone baseline."})
    official_segmenter: bool = field(
        default=False,
        metadata={
            "help": "Build the official Rein segmenter (rein_peft.build_official_segmenter): Mask2Former over the "
            "x4/x2/x1/x0.5 pyramid, official decoder (scaled down for the embedded backbone), official Rein "
            "(lora_dim 16, linked queries; the Rein flags are ignored). Needs a patch-16 checkpoint (resize_backbone)."
        },
    )


# the official decoder scaled down to the embedded backbone, sized as the small Mask2Former below
# (`protocol.mask2former_sizes(64)`): 64 wide, 2 masked-attention and 2 pixel-decoder layers, feed-forward 128, 4 heads
EMBEDDED_OFFICIAL_DECODER = {
    "hidden_dim": 64,
    "num_decoder_layers": 2,
    "encoder_layers": 2,
    "dim_feedforward": 128,
    "encoder_feedforward_dim": 128,
    "num_attention_heads": 4,
    "num_queries": 16,
    "train_num_points": 1024,
}

# --- the embedded default: a tiny DINOv2 and scenes whose labels need more than one patch --------------------------

GRID, PATCH = 8, 8
CLASS_NAMES = ["background", "small square", "large square"]
EMBEDDED_DATASET = "embedded: red squares on textured noise, labelled by their size (train_semantic_segmentation.py)"


def draw_squares_dataset(num_images: int, seed: int) -> datasets.Dataset:
    """Textured noise with red squares of one or two patches a side; each square's pixels are labelled by its size.
    A patch inside a large square looks exactly like a small square: telling them apart takes the neighbours."""
    rng = np.random.default_rng(seed)
    side = GRID * PATCH
    images, label_maps = [], []
    for _ in range(num_images):
        pixels = rng.uniform(0, 0.6, size=(side, side, 3))
        labels = np.zeros((side, side), dtype=np.uint8)
        for _ in range(int(rng.integers(2, 6))):
            size = int(rng.integers(1, 3))
            row, col = (int(value) * PATCH for value in rng.integers(0, GRID - size + 1, size=2))
            area = (slice(row, row + size * PATCH), slice(col, col + size * PATCH))
            if labels[area].any():  # squares do not touch each other's area
                continue
            pixels[area] = (1.0, 0.1, 0.1)
            labels[area] = size
        images.append(Image.fromarray((pixels * 255).astype(np.uint8)))
        label_maps.append(Image.fromarray(labels))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "label": label_maps}, features=features)


EMBEDDED_BACKBONES = ("dinov2", "convnext", "dinov3_convnext")
# the embedded staged backbones: four stages, strides 4 to 32 on the 64-pixel images
EMBEDDED_STAGES = {"hidden_sizes": [16, 32, 64, 64], "depths": [1, 1, 2, 1]}


def build_embedded_backbone(folder: str, family: str) -> str:
    """Save a small backbone of `family` (DINOv2, ConvNeXt or DINOv3 ConvNeXt) and its image processor to `folder`,
    to be loaded like any checkpoint."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        torch.manual_seed(0)
        side = GRID * PATCH
        if family == "convnext":
            backbone = ConvNextModel(ConvNextConfig(num_stages=4, image_size=side, **EMBEDDED_STAGES))
        elif family == "dinov3_convnext":
            backbone = DINOv3ConvNextModel(DINOv3ConvNextConfig(image_size=side, **EMBEDDED_STAGES))
        else:
            config = Dinov2Config(
                hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=side
            )
            config.patch_size = PATCH
            backbone = Dinov2Model(config)
        backbone.save_pretrained(folder)
        BitImageProcessorPil(size={"height": side, "width": side}, do_center_crop=False).save_pretrained(folder)
    return folder


# --- data ------------------------------------------------------------------------------------------------------------


def load_splits(script: ScriptArguments) -> datasets.DatasetDict:
    if script.dataset_name is None:
        splits = datasets.DatasetDict(
            {"train": draw_squares_dataset(1200, 1), "validation": draw_squares_dataset(300, 2)}
        )
    elif os.path.isdir(script.dataset_name):  # a Dataset or DatasetDict written by `save_to_disk`
        loaded = datasets.load_from_disk(script.dataset_name)
        splits = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    else:
        splits = datasets.load_dataset(script.dataset_name)
    name = script.dataset_name or "the embedded dataset"
    if script.train_split not in splits:
        fail(f"{name} has no split {script.train_split!r} (splits: {list(splits)}); pass --train_split.")
    train = splits[script.train_split]
    if script.eval_split in splits:
        held_out = splits[script.eval_split]
    else:
        parts = train.train_test_split(test_size=0.2, seed=0)
        train, held_out = parts["train"], parts["test"]
    for column, flag in ((script.image_column, "--image_column"), (script.label_column, "--label_column")):
        if column not in train.features:
            fail(f"{name} has no column {column!r} (columns: {list(train.features)}); pass {flag}.")
    if script.max_train_samples is not None:
        train = train.select(range(min(script.max_train_samples, len(train))))
    if script.max_eval_samples is not None:
        held_out = held_out.select(range(min(script.max_eval_samples, len(held_out))))
    return datasets.DatasetDict({"train": train, "validation": held_out})


def preprocess(
    splits: datasets.DatasetDict, processor, side: int, model_config: PretrainedConfig, script: ScriptArguments
) -> datasets.DatasetDict:
    """Images of any size: resized to `side` x `side` and normalised by the checkpoint's processor; label maps resized
    with nearest neighbour, which keeps them class ids, and checked against the model's classes and ignore index."""
    to_arrays = protocol.resize_transform(
        processor, side, model_config, script.image_column, script.label_column, return_tensors="np"
    )
    # stored as fixed-shape arrays, a batch is read as one tensor; as nested lists (what `map` infers), the torch
    # format makes a tensor of every number, and reading batches takes most of the training time
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D((3, side, side), "float32"),
            "labels": datasets.Array2D((side, side), "int64"),
        }
    )
    try:
        processed = splits.map(to_arrays, batched=True, remove_columns=splits["train"].column_names, features=features)
    except ValueError as error:  # label maps that disagree with the model
        fail(str(error))
    return processed.with_format("torch")


# --- models ----------------------------------------------------------------------------------------------------------


def backbone_config(script: ScriptArguments, backbone_path: str) -> PretrainedConfig:
    """The backbone's config, shaped like the checkpoint: a staged backbone (ConvNeXt, DINOv3 ConvNeXt) hands the
    decoder every stage's output, a `Dinov2Backbone` the refined outputs of `--out_indices`."""
    config = AutoConfig.from_pretrained(backbone_path)
    if hasattr(config, "depths"):  # staged
        return AutoConfig.from_pretrained(backbone_path, out_features=config.stage_names[1:])
    return protocol.dinov2_backbone_config(backbone_path, script.out_indices)


def segmenter_config(script: ScriptArguments, backbone_path: str, num_labels: int) -> PretrainedConfig:
    """The config of the decoder over a backbone shaped like the checkpoint."""
    names = CLASS_NAMES if script.dataset_name is None else [f"class {index}" for index in range(num_labels)]
    if script.official_segmenter:  # the official decoder; scaled down like the one below for the embedded backbone
        scaled_down = EMBEDDED_OFFICIAL_DECODER if script.backbone_name_or_path is None else {}
        return rein_peft.official_segmenter_config(
            backbone_path, num_labels=num_labels, id2label=dict(enumerate(names)), **scaled_down
        )
    backbone = backbone_config(script, backbone_path)
    return protocol.segmenter_config(
        script.decoder, backbone, num_labels, names, hidden_size=64, num_queries=script.num_queries
    )


def load_segmenter(script: ScriptArguments, config: PretrainedConfig, backbone_path: str, seed: int) -> nn.Module:
    """The decoder (initialised from `seed`, the same for the baseline and Rein) over the checkpoint's backbone."""
    torch.manual_seed(seed)
    if script.official_segmenter:
        return rein_peft.build_official_segmenter(backbone_path, config.num_labels, method="full", config=config)
    model_class = (
        UperNetForSemanticSegmentation if script.decoder == "upernet" else Mask2FormerForUniversalSegmentation
    )
    model = model_class(config)
    backbone_module = model.get_submodule(BACKBONE_MODULE[script.decoder])
    # the backbone class the decoder built (Dinov2Backbone, ConvNextBackbone, ...), loaded from the checkpoint
    backbone = type(backbone_module).from_pretrained(backbone_path, config=config.backbone_config)
    backbone_module.load_state_dict(backbone.state_dict())
    return model


def train(model: nn.Module, training: TrainingArguments, data, collator, callbacks) -> Trainer:
    optimizer = rein_peft.create_rein_optimizer(model, lr=training.learning_rate, weight_decay=training.weight_decay)
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=data["train"],
        data_collator=collator,
        optimizers=(optimizer, None),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    return trainer


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> dict:
    parser = HfArgumentParser((ScriptArguments, ReinArguments, TrainingArguments))
    parser.set_defaults(**EMBEDDED_DEFAULTS)
    script, rein, training = parser.parse_args_into_dataclasses(args=argv)
    silence_peft_deprecations()  # PEFT's, on every PeftModel built: nothing for the user to do
    if script.decoder not in DECODER_MODULES:
        fail(f"--decoder must be one of {sorted(DECODER_MODULES)}, got {script.decoder!r}.")
    if script.backbone not in EMBEDDED_BACKBONES:
        fail(f"--backbone must be one of {list(EMBEDDED_BACKBONES)}, got {script.backbone!r}.")
    if script.official_segmenter and script.backbone != "dinov2":
        fail("--official_segmenter is the official DINOv2 segmenter: it does not take --backbone.")
    if script.official_segmenter:
        script.decoder = "mask2former"
    if script.decoder == "mask2former":
        try:  # before any data is drawn or read
            require("scipy", purpose="Mask2Former (its loss matches predictions to labels)")
        except MissingExtraError as error:
            fail(str(error))
    check_writable(training.output_dir)
    push_to_hub, training.push_to_hub = training.push_to_hub, False  # the adapter alone is pushed at the end
    start = time.perf_counter()

    splits = load_splits(script)
    num_labels = script.num_labels or len(CLASS_NAMES)
    with training.main_process_first(desc="building the embedded backbone"):
        backbone_path = script.backbone_name_or_path or build_embedded_backbone(
            os.path.join(training.output_dir, "base-model"), script.backbone
        )
    processor = AutoImageProcessor.from_pretrained(backbone_path)
    model_config = segmenter_config(script, backbone_path, num_labels)
    official_side = model_config.backbone_config.image_size if script.official_segmenter else DEFAULT_IMAGE_SIZE
    side = script.image_size or (GRID * PATCH if script.backbone_name_or_path is None else official_side)
    data = preprocess(splits, processor, side, model_config, script)
    collator = protocol.segmentation_collator(model_config)
    modules_to_save = DECODER_MODULES[script.decoder]

    def load_model() -> nn.Module:
        return load_segmenter(script, model_config, backbone_path, training.seed)

    results = {}
    if not script.skip_baseline:
        baseline = load_model()
        for name, param in baseline.named_parameters():
            param.requires_grad = any(name.startswith(module + ".") for module in modules_to_save)
        baseline_args = TrainingArguments(**{**training.to_dict(), "output_dir": training.output_dir + "/frozen-head"})
        baseline_args.save_strategy = "no"
        train(baseline, baseline_args, data, collator, callbacks)
        results["frozen_head_miou"] = protocol.dataset_mean_iou(baseline, data["validation"])

    base = load_model()
    linked = (rein.link_token_to_query and script.decoder == "mask2former") or script.official_segmenter
    config = rein.to_config(modules_to_save=modules_to_save)
    if linked:  # the tokens become the decoder's queries: one per query, as wide as the decoder
        config.token_length, config.query_dims = base.config.num_queries, base.config.hidden_dim
    try:
        if script.official_segmenter:  # the official Rein (100 low-rank tokens of rank 16, linked), not the flags'
            model = rein_peft.official.segmenter.apply_method(base, "rein")
        else:
            model = get_peft_model(base, config)
    except ValueError as error:  # ReinUnsupportedModelError, a decoder that does not fit the linked queries, ...
        fail(str(error))
    model.print_trainable_parameters()
    results["miou_before"] = protocol.dataset_mean_iou(model, data["validation"])
    trainer = train(model, training, data, collator, callbacks)
    results["miou_after"] = protocol.dataset_mean_iou(model, data["validation"])

    adapter_dir = os.path.join(training.output_dir, "adapter")
    # the model card: the data and the mIoU reached (this Trainer never evaluates)
    rein_peft.set_model_card_info(
        model, dataset=script.dataset_name or EMBEDDED_DATASET, metrics={"mean_iou": results["miou_after"]}
    )
    trainer.save_model(adapter_dir)  # adapter and decoder only, written by the main process
    trainer.accelerator.wait_for_everyone()
    if push_to_hub and trainer.is_world_process_zero():
        hub_model_id = training.hub_model_id or os.path.basename(os.path.abspath(training.output_dir))
        results["hub_commit"] = model.push_to_hub(hub_model_id, token=training.hub_token).oid
    reloaded = PeftModel.from_pretrained(load_model(), adapter_dir)
    results["miou_reloaded"] = protocol.dataset_mean_iou(reloaded, data["validation"])
    results["trainable_parameters"] = model.get_nb_trainable_parameters()[0]
    results["adapter_mb"] = folder_size_mb(adapter_dir, "adapter_model.safetensors")
    results["seconds"] = time.perf_counter() - start
    if trainer.is_world_process_zero():
        rows = [
            ("backbone", backbone_path),
            ("decoder", script.decoder + (", queries linked to Rein's tokens" if linked else "")),
            ("trainable parameters (Rein + decoder)", f"{results['trainable_parameters']:,}"),
            ("adapter file (Rein + decoder)", f"{results['adapter_mb']:.2f} MB"),
            ("mIoU, frozen backbone + decoder", f"{results.get('frozen_head_miou', float('nan')):.3f}"),
            ("mIoU, Rein before training", f"{results['miou_before']:.3f}"),
            ("mIoU, Rein after training", f"{results['miou_after']:.3f}"),
            ("mIoU, adapter reloaded", f"{results['miou_reloaded']:.3f}"),
            ("time", f"{results['seconds']:.0f} s"),
        ]
        print_results_table("Rein semantic segmentation", rows)
    return results


if __name__ == "__main__":
    main()
