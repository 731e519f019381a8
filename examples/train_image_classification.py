"""Fine-tune a ViT-family image classifier with Rein through `transformers.Trainer`.

With no flags it runs offline on an embedded task: a small DINOv2 built from a config and a dataset it draws itself
(count the red squares, 1 to 4, among textured noise). Point it at real data and weights with
`--model_name_or_path facebook/dinov2-small --dataset_name <hub dataset or imagefolder path>`.

It trains a frozen-backbone head alone (the baseline) and Rein with the same head, evaluates both on held-out images,
saves the adapter, reloads it with `PeftModel.from_pretrained`, re-evaluates, and prints a results table.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import datasets
import evaluate
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
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    BitImageProcessorPil,
    Dinov2Config,
    Dinov2Model,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import rein_peft
from rein_peft.utils.compat import silence_peft_deprecations

HEAD_NAME = "classifier"  # the head of every transformers *ForImageClassification model
ACCURACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "accuracy.py")
EMBEDDED_DEFAULTS = {
    "output_dir": os.path.join(OUTPUTS, "rein-image-classification"),
    "num_train_epochs": 5,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "learning_rate": 3e-3,
    "weight_decay": 0.05,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "logging_steps": 20,
    "report_to": "none",
    **QUIET_ON_CPU,
    "remove_unused_columns": False,
    "seed": 0,
}


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub checkpoint or local folder; default: build the embedded tiny DINOv2."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub image-classification dataset or an imagefolder path; default: embedded."}
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class labels."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str = field(default="validation", metadata={"help": "Held-out split; a fifth of train if absent."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many held-out images."})
    skip_baseline: bool = field(default=False, metadata={"help": "Do not train the frozen-backbone baseline."})


# --- the embedded default: a tiny DINOv2 and a task frozen features do not solve ----------------------------------

GRID, PATCH = 4, 8
COUNT_NAMES = ["one", "two", "three", "four"]
EMBEDDED_DATASET = "embedded: 1 to 4 red squares on textured noise, labelled by their count"


def draw_counting_dataset(num_images: int, seed: int) -> datasets.Dataset:
    """Textured noise with 1 to 4 red squares on a 4x4 grid of patches; the label is how many."""
    rng = np.random.default_rng(seed)
    side = GRID * PATCH
    images, labels = [], []
    for _ in range(num_images):
        label = int(rng.integers(len(COUNT_NAMES)))
        pixels = rng.uniform(0, 0.6, size=(side, side, 3))
        for cell in rng.permutation(GRID * GRID)[: label + 1]:
            row, col = divmod(int(cell), GRID)
            pixels[row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] = (1.0, 0.1, 0.1)
        images.append(Image.fromarray((pixels * 255).astype(np.uint8)))
        labels.append(label)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=COUNT_NAMES)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def build_embedded_model(folder: str) -> str:
    """Save a small DINOv2 and its image processor to `folder`, to be loaded like any checkpoint."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        torch.manual_seed(0)
        side = GRID * PATCH
        config = Dinov2Config(
            hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=side
        )
        config.patch_size = PATCH
        Dinov2Model(config).save_pretrained(folder)
        processor = BitImageProcessorPil(size={"height": side, "width": side}, do_center_crop=False)
        processor.save_pretrained(folder)
    return folder


# --- data ------------------------------------------------------------------------------------------------------------


def load_splits(script: ScriptArguments) -> datasets.DatasetDict:
    if script.dataset_name is None:
        splits = datasets.DatasetDict(
            {"train": draw_counting_dataset(2000, 1), "validation": draw_counting_dataset(500, 2)}
        )
    elif os.path.isdir(script.dataset_name):
        splits = datasets.load_dataset("imagefolder", data_dir=script.dataset_name)
    else:
        splits = datasets.load_dataset(script.dataset_name)
    name = script.dataset_name or "the embedded dataset"
    if script.train_split not in splits:
        fail(f"{name} has no split {script.train_split!r} (splits: {list(splits)}); pass --train_split.")
    train = splits[script.train_split]
    if script.eval_split in splits:
        held_out = splits[script.eval_split]
    else:
        parts = train.train_test_split(test_size=0.2, seed=0, stratify_by_column=None)
        train, held_out = parts["train"], parts["test"]
    for column, flag in ((script.image_column, "--image_column"), (script.label_column, "--label_column")):
        if column not in train.features:
            fail(f"{name} has no column {column!r} (columns: {list(train.features)}); pass {flag}.")
    if not isinstance(train.features[script.label_column], datasets.ClassLabel):
        fail(f"column {script.label_column!r} of {name} holds no class labels (a ClassLabel feature).")
    if script.max_train_samples is not None:
        train = train.select(range(min(script.max_train_samples, len(train))))
    if script.max_eval_samples is not None:
        held_out = held_out.select(range(min(script.max_eval_samples, len(held_out))))
    return datasets.DatasetDict({"train": train, "validation": held_out})


def preprocess(splits: datasets.DatasetDict, processor, script: ScriptArguments) -> datasets.DatasetDict:
    def to_pixels(batch: dict) -> dict:
        images = [image.convert("RGB") for image in batch[script.image_column]]
        pixel_values = processor(images=images, return_tensors="np")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": batch[script.label_column]}

    # stored as fixed-shape arrays, a batch is read as one tensor; as nested lists (what `map` infers), the torch
    # format makes a tensor of every number, and reading batches takes most of the training time
    channels_height_width = to_pixels(splits["train"][:1])["pixel_values"].shape[1:]
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(channels_height_width, "float32"),
            "labels": splits["train"].features[script.label_column],
        }
    )
    processed = splits.map(to_pixels, batched=True, remove_columns=splits["train"].column_names, features=features)
    return processed.with_format("torch")


# --- training --------------------------------------------------------------------------------------------------------


def make_trainer(model, training: TrainingArguments, data, metric, callbacks) -> Trainer:
    def compute_metrics(prediction) -> dict:
        return metric.compute(predictions=prediction.predictions.argmax(-1), references=prediction.label_ids)

    optimizer = rein_peft.create_rein_optimizer(model, lr=training.learning_rate, weight_decay=training.weight_decay)
    return Trainer(
        model=model,
        args=training,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        compute_metrics=compute_metrics,
        optimizers=(optimizer, None),
        callbacks=callbacks,
    )


@torch.no_grad()
def accuracy_without_trainer(model, dataset: datasets.Dataset, metric, batch_size: int = 128) -> float:
    model.eval()
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]
        logits = model(pixel_values=batch["pixel_values"]).logits
        metric.add_batch(predictions=logits.argmax(-1), references=batch["labels"])
    return metric.compute()["accuracy"]


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> dict:
    parser = HfArgumentParser((ScriptArguments, ReinArguments, TrainingArguments))
    parser.set_defaults(**EMBEDDED_DEFAULTS)
    script, rein, training = parser.parse_args_into_dataclasses(args=argv)
    silence_peft_deprecations()  # PEFT's, on every PeftModel built: nothing for the user to do
    check_writable(training.output_dir)
    # the adapter alone is pushed at the end (Trainer would push its whole output folder at every save)
    push_to_hub, training.push_to_hub = training.push_to_hub, False
    hub_model_id = training.hub_model_id or os.path.basename(os.path.abspath(training.output_dir))
    start = time.perf_counter()

    splits = load_splits(script)
    label_names = splits["train"].features[script.label_column].names
    with training.main_process_first(desc="building the embedded model"):
        model_path = script.model_name_or_path or build_embedded_model(os.path.join(training.output_dir, "base-model"))
    processor = AutoImageProcessor.from_pretrained(model_path)
    data = preprocess(splits, processor, script)
    metric = evaluate.load(ACCURACY)

    def load_classifier():
        return AutoModelForImageClassification.from_pretrained(
            model_path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: index for index, name in enumerate(label_names)},
            ignore_mismatched_sizes=True,
        )

    results = {}
    if not script.skip_baseline:
        baseline = load_classifier()
        for name, param in baseline.named_parameters():
            param.requires_grad = name.startswith(HEAD_NAME)
        baseline_args = TrainingArguments(
            **{**training.to_dict(), "output_dir": os.path.join(training.output_dir, "frozen-head")}
        )
        baseline_args.save_strategy = "no"
        baseline_trainer = make_trainer(baseline, baseline_args, data, metric, callbacks)
        baseline_trainer.train()
        results["frozen_head_accuracy"] = baseline_trainer.evaluate()["eval_accuracy"]

    try:
        model = get_peft_model(load_classifier(), rein.to_config(modules_to_save=[HEAD_NAME]))
    except ValueError as error:  # ReinUnsupportedModelError and bad target settings
        fail(str(error))
    model.print_trainable_parameters()
    # not with a Trainer: once accelerate has prepared a model for evaluation, it no longer wraps it in
    # DistributedDataParallel for training (accelerate 1.15), and the processes then train apart without a word
    results["accuracy_before"] = accuracy_without_trainer(model, data["validation"], metric)
    trainer = make_trainer(model, training, data, metric, callbacks)
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    results["accuracy_after"] = trainer.evaluate()["eval_accuracy"]

    adapter_dir = os.path.join(training.output_dir, "adapter")
    rein_peft.set_model_card_info(model, dataset=script.dataset_name or EMBEDDED_DATASET)
    # adapter and head only, written by the main process; its model card gets the Trainer's metrics and settings
    trainer.save_model(adapter_dir)
    trainer.accelerator.wait_for_everyone()
    if push_to_hub and trainer.is_world_process_zero():
        results["hub_commit"] = model.push_to_hub(hub_model_id, token=training.hub_token).oid

    # every process takes part in the (distributed) evaluation of the reloaded adapter
    reloaded = PeftModel.from_pretrained(load_classifier(), adapter_dir)
    results["accuracy_reloaded"] = make_trainer(reloaded, training, data, metric, None).evaluate()["eval_accuracy"]
    results["trainable_parameters"] = model.get_nb_trainable_parameters()[0]
    results["adapter_mb"] = folder_size_mb(adapter_dir, "adapter_model.safetensors")
    results["seconds"] = time.perf_counter() - start
    if trainer.is_world_process_zero():
        rows = [
            ("model", model_path),
            ("trainable parameters (Rein + head)", f"{results['trainable_parameters']:,}"),
            ("adapter file", f"{results['adapter_mb']:.2f} MB"),
            ("accuracy, frozen backbone + head", f"{results.get('frozen_head_accuracy', float('nan')):.3f}"),
            ("accuracy, Rein before training", f"{results['accuracy_before']:.3f}"),
            ("accuracy, Rein after training", f"{results['accuracy_after']:.3f}"),
            ("accuracy, adapter reloaded", f"{results['accuracy_reloaded']:.3f}"),
            ("time", f"{results['seconds']:.0f} s"),
        ]
        print_results_table("Rein image classification", rows)
    return results


if __name__ == "__main__":
    main()
