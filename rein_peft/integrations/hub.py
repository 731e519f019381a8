"""Model cards of Rein adapters.

`PeftModel.save_pretrained` and `push_to_hub` write PEFT's card, a template of "[More Information Needed]". For a Rein
adapter, rein_peft writes its own card instead: the base model and its class, the label count, the data set, the
metrics reached, the Rein settings, the training hyperparameters and a "How to use" snippet that runs as written.

What a save cannot see by itself comes from `transformers.Trainer` (its `save_model` records the training data set's
name, the last evaluation's metrics and its hyperparameters on the model before saving) or from
`set_model_card_info` (a data set's description, metrics computed outside the `Trainer`); what the caller passes
there wins.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import peft
import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData
from peft import PeftConfig, PeftModel
from transformers import Trainer

from ..tuners.rein.config import ReinConfig

REIN_TAGS = ("rein", "rein_peft")
MODEL_CARD_NAME = "README.md"
USAGE_HEADING = "## How to use"
PAPER = "https://arxiv.org/abs/2312.04265"
# attributes of the PeftModel: what `Trainer.save_model` recorded, and what `set_model_card_info` was given
TRAINER_INFO, CALLER_INFO = "rein_card_from_trainer", "rein_card_from_caller"
# label names written into the snippet up to this many classes (beyond, the snippet gives the count only)
MAX_LABELS_IN_SNIPPET = 50
# the Trainer's evaluation bookkeeping, which is no result of the model
NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "epoch")
PIPELINE_TAGS = {"ForImageClassification": "image-classification", "Segmentation": "image-segmentation"}


def set_model_card_info(
    model: PeftModel,
    dataset: str | None = None,
    metrics: dict[str, float] | None = None,
    hyperparameters: dict[str, Any] | None = None,
) -> None:
    """Record what the next `save_pretrained` / `push_to_hub` of this Rein adapter writes into its model card.

    Values given here win over what `transformers.Trainer` recorded; metrics and hyperparameters are merged key by key.

    Args:
        model: The `PeftModel` with a Rein adapter.
        dataset: The training data set (a Hub id, a folder or a description).
        metrics: Results reached, e.g. `{"mean IoU": 0.61}`.
        hyperparameters: Training settings, e.g. `{"learning_rate": 1e-4}`.
    """
    info = getattr(model, CALLER_INFO, {"metrics": {}, "hyperparameters": {}})
    if dataset is not None:
        info["dataset"] = dataset
    info["metrics"].update(metrics or {})
    info["hyperparameters"].update(hyperparameters or {})
    setattr(model, CALLER_INFO, info)


def trainer_summary(trainer: Trainer) -> dict[str, Any]:
    """The data set, the last evaluation's metrics and the hyperparameters of a `Trainer`, for the model card."""
    args = trainer.args
    info = getattr(trainer.train_dataset, "info", None)
    dataset = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    metrics = {}
    for entry in trainer.state.log_history:  # the last value of each evaluation metric
        for key, value in entry.items():
            if key.startswith("eval_") and not key.endswith(NOT_METRICS):
                metrics[key.removeprefix("eval_")] = value
    epochs_or_steps = {"max_steps": args.max_steps} if args.max_steps > 0 else {"epochs": args.num_train_epochs}
    hyperparameters = {
        "learning_rate": args.learning_rate,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "processes": args.world_size,
        **epochs_or_steps,
        "steps_trained": trainer.state.global_step,
        "optimizer": _optimizer_name(trainer),
        "weight_decay": args.weight_decay,
        "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "warmup_steps": args.warmup_steps,
        "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
        "seed": args.seed,
    }
    return {"dataset": dataset, "metrics": metrics, "hyperparameters": hyperparameters}


def _optimizer_name(trainer: Trainer) -> str:
    """The optimizer's class (accelerate wraps it as `AcceleratedOptimizer.optimizer`), or `args.optim`."""
    if trainer.optimizer is None:
        return str(getattr(trainer.args.optim, "value", trainer.args.optim))
    return type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__


def _rein_config(model: PeftModel) -> ReinConfig | None:
    config = model.peft_config.get(model.active_adapter)
    return config if isinstance(config, ReinConfig) else None


def _card_info(model: PeftModel) -> dict[str, Any]:
    """What the Trainer recorded, overridden by what the caller set."""
    trainer = getattr(model, TRAINER_INFO, {})
    caller = getattr(model, CALLER_INFO, {})
    return {
        "dataset": caller.get("dataset") or trainer.get("dataset"),
        "metrics": {**trainer.get("metrics", {}), **caller.get("metrics", {})},
        "hyperparameters": {**trainer.get("hyperparameters", {}), **caller.get("hyperparameters", {})},
    }


def _labels(base: torch.nn.Module) -> dict[int, str] | None:
    """The head's labels, for models with a task head (a config `id2label` and a class named `...For...`)."""
    if "For" not in type(base).__name__ or not getattr(base.config, "id2label", None):
        return None
    return {int(index): name for index, name in base.config.id2label.items()}


def _usage_snippet(base_class: str, base_model: str | None, labels: dict[int, str] | None, adapter: str) -> str:
    if base_model is None:  # built from a config (e.g. a decoder over a backbone): no checkpoint to name
        load_base = (
            f"base = ...  # build the {base_class} exactly as it was trained: this adapter's base has no checkpoint"
        )
    else:
        head = ""
        if labels is not None:
            default_names = all(name == f"LABEL_{index}" for index, name in labels.items())
            if default_names or len(labels) > MAX_LABELS_IN_SNIPPET:
                head = f", num_labels={len(labels)}"
            else:
                head = f", id2label={labels!r}"
            head += ", ignore_mismatched_sizes=True"  # the saved head replaces whatever head the checkpoint has
        load_base = f"base = {base_class}.from_pretrained({base_model!r}{head})"
    return (
        "```python\n"
        "import rein_peft  # registers Rein with PEFT: without it PEFT cannot read this adapter (KeyError: 'REIN')\n"
        "from peft import PeftModel\n"
        f"from transformers import {base_class}\n\n"
        f"{load_base}\n"
        f"model = PeftModel.from_pretrained(base, {adapter!r}).eval()\n"
        "```\n"
    )


def _table(rows: dict[str, Any], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [
        f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
        for key, value in rows.items()
    ]
    return "\n".join(lines) + "\n"


def rein_model_card(model: PeftModel, adapter: str) -> ModelCard:
    """The model card of `model`'s active Rein adapter, saved to or pushed as `adapter` (a folder or a repo id, which
    the "How to use" snippet loads).

    Raises:
        ValueError: The active adapter is not a Rein adapter.
    """
    config = _rein_config(model)
    if config is None:
        raise ValueError(f"The active adapter {model.active_adapter!r} is not a Rein adapter: PEFT writes its card.")
    base = model.get_base_model()
    base_class = type(base).__name__
    base_model = config.base_model_name_or_path or getattr(base.config, "_name_or_path", None) or None
    labels = _labels(base)
    info = _card_info(model)
    trainable, total = model.get_nb_trainable_parameters()
    pipeline_tag = next((tag for part, tag in PIPELINE_TAGS.items() if part in base_class), None)
    data = ModelCardData(
        library_name="peft",
        base_model=base_model,
        tags=sorted({*REIN_TAGS, "peft", base_class}),
        datasets=[info["dataset"]] if info["dataset"] else None,
        pipeline_tag=pipeline_tag,
    )
    described = f"`{base_model}` (`{base_class}`)" if base_model else f"a `{base_class}` built from a config"
    label_line = f"{len(labels)} labels: {', '.join(labels.values())}" if labels else "no classification head"
    if labels and len(labels) > MAX_LABELS_IN_SNIPPET:
        label_line = f"{len(labels)} labels"
    rein_own = [item.name for item in fields(ReinConfig) if item.name not in {f.name for f in fields(PeftConfig)}]
    settings = {name: getattr(config, name) for name in rein_own}
    metrics = info["metrics"]
    hyperparameters = info["hyperparameters"]
    text = [
        f"# Rein adapter for {base_model or base_class}",
        "",
        f"A [Rein]({PAPER}) adapter (CVPR 2024: learnable tokens refine every layer of a frozen vision transformer), "
        "made with [rein_peft](https://pypi.org/project/rein-peft/) as a PEFT method.",
        "",
        f"- Base model: {described}",
        f"- Head: {label_line}",
        f"- Training data: {info['dataset'] or 'not recorded'}",
        f"- Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%), Rein and "
        f"`modules_to_save` ({', '.join(config.modules_to_save or []) or 'none'})",
        "",
        USAGE_HEADING,
        "",
        _usage_snippet(base_class, base_model, labels, adapter),
        "## Results",
        "",
        _table(metrics, ("metric", "value")) if metrics else "No evaluation was recorded with this adapter.\n",
        "## Rein settings",
        "",
        _table(settings, ("ReinConfig field", "value")),
        "## Training hyperparameters",
        "",
        _table(hyperparameters, ("setting", "value"))
        if hyperparameters
        else "Not recorded (saved outside `transformers.Trainer`; see `rein_peft.set_model_card_info`).\n",
        "## Framework versions",
        "",
        f"rein_peft {_version()}, PEFT {peft.__version__}, transformers {transformers.__version__}, "
        f"PyTorch {torch.__version__}",
        "",
    ]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(text))


def _version() -> str:
    from .. import __version__

    return __version__


def _with_rein_card(create_or_update_model_card: Callable) -> Callable:
    @functools.wraps(create_or_update_model_card)
    def wrapper(self: PeftModel, output_dir: str) -> None:
        if _rein_config(self) is None:
            create_or_update_model_card(self, output_dir)
        else:
            rein_model_card(self, output_dir).save(os.path.join(output_dir, MODEL_CARD_NAME))

    wrapper.adds_rein_card = True
    return wrapper


def _with_rein_card_on_upload(upload_modified_files: Callable) -> Callable:
    # transformers' push_to_hub writes its generic card over the one save_pretrained wrote (library_name
    # "transformers", no base_model) just before uploading: write the adapter's card again at that point, its
    # snippet loading the repo pushed to
    @functools.wraps(upload_modified_files)
    def wrapper(self: PeftModel, working_dir: str, repo_id: str, *args, **kwargs):
        if _rein_config(self) is not None:
            rein_model_card(self, repo_id).save(os.path.join(working_dir, MODEL_CARD_NAME))
        return upload_modified_files(self, working_dir, repo_id, *args, **kwargs)

    wrapper.adds_rein_card = True
    return wrapper


def _with_trainer_summary(save_model: Callable) -> Callable:
    @functools.wraps(save_model)
    def wrapper(self: Trainer, output_dir: str | None = None, *args, **kwargs):
        model = self.accelerator.unwrap_model(self.model) if self.accelerator is not None else self.model
        if isinstance(model, PeftModel) and _rein_config(model) is not None:
            setattr(model, TRAINER_INFO, trainer_summary(self))
        return save_model(self, output_dir, *args, **kwargs)

    wrapper.adds_rein_card = True
    return wrapper


def register_model_card() -> None:
    """Make `PeftModel.save_pretrained` and `push_to_hub` write Rein's model card for Rein adapters, and
    `Trainer.save_model` record its training on the model for that card (idempotent)."""
    if not getattr(PeftModel.create_or_update_model_card, "adds_rein_card", False):
        PeftModel.create_or_update_model_card = _with_rein_card(PeftModel.create_or_update_model_card)
    if not getattr(PeftModel._upload_modified_files, "adds_rein_card", False):
        PeftModel._upload_modified_files = _with_rein_card_on_upload(PeftModel._upload_modified_files)
    if not getattr(Trainer.save_model, "adds_rein_card", False):
        Trainer.save_model = _with_trainer_summary(Trainer.save_model)
