"""The model card of a Rein adapter: what a real `Trainer` run recorded (base model and class, labels, data set,
metrics, Rein settings, hyperparameters), and a "How to use" snippet that runs as written in a fresh process."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import datasets
import pytest
import torch
from conftest import LABELS, assert_same_numbers, pixels, tiny_dinov2
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftConfig, get_peft_model
from transformers import Dinov2ForImageClassification, Trainer, TrainingArguments

import rein_peft
from rein_peft import ReinConfig

PEFT_TEMPLATE_GAP = "[More Information Needed]"
DATASET_NAME = "tiny-colours"
ID2LABEL = {0: "red", 1: "green", 2: "blue"}


def _dataset(count: int, seed: int) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, LABELS, (count,), generator=generator)
    images = torch.randn(count, 3, 32, 32, generator=generator) * 0.3
    images[torch.arange(count), labels] += 1.0  # the label's colour channel is brighter
    info = datasets.DatasetInfo(dataset_name=DATASET_NAME)
    data = datasets.Dataset.from_dict({"pixel_values": images.numpy(), "labels": labels.numpy()}, info=info)
    return data.with_format("torch")


def _accuracy(prediction) -> dict:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def _python_block(card: ModelCard) -> str:
    return card.text.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DINOv2 classifier saved as a checkpoint folder, Rein trained on it by a real Trainer for 2 epochs with
    evaluation, and the adapter saved by `Trainer.save_model`."""
    folder = tmp_path_factory.mktemp("card")
    base_dir = str(folder / "base")
    tiny_dinov2(id2label=ID2LABEL, label2id={name: index for index, name in ID2LABEL.items()}).save_pretrained(
        base_dir
    )
    base = Dinov2ForImageClassification.from_pretrained(base_dir)
    config = ReinConfig(token_length=4, lora_dim=2, modules_to_save=["classifier"])
    model = get_peft_model(base, config)
    args = TrainingArguments(
        output_dir=str(folder / "run"),
        num_train_epochs=2,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=False,
        seed=3,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=_dataset(32, 0), eval_dataset=_dataset(16, 1), compute_metrics=_accuracy
    )
    trainer.train()
    adapter_dir = str(folder / "adapter")
    trainer.save_model(adapter_dir)
    return model.eval(), trainer, adapter_dir, base_dir


def test_trainer_saved_card_names_model_labels_data_metrics_settings_and_hyperparameters(trained):
    model, trainer, adapter_dir, base_dir = trained
    card = ModelCard.load(os.path.join(adapter_dir, "README.md"))
    assert PEFT_TEMPLATE_GAP not in card.content
    assert (card.data.library_name, card.data.base_model, card.data.datasets) == ("peft", base_dir, [DATASET_NAME])
    assert {"rein", "rein_peft", "Dinov2ForImageClassification"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "image-classification"
    assert f"- Base model: `{base_dir}` (`Dinov2ForImageClassification`)" in card.text
    assert "- Head: 3 labels: red, green, blue" in card.text
    assert f"- Training data: {DATASET_NAME}" in card.text
    evaluations = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry]
    assert len(evaluations) == 2  # one per epoch: the card shows the last
    assert f"| accuracy | {evaluations[-1]['eval_accuracy']:.4g} |" in card.text
    assert f"| loss | {evaluations[-1]['eval_loss']:.4g} |" in card.text
    assert "runtime" not in card.text
    for field in dataclasses.fields(ReinConfig):  # every Rein setting, none of PEFT's bookkeeping
        own = field.name not in {base_field.name for base_field in dataclasses.fields(PeftConfig)}
        assert (f"| {field.name} |" in card.text) == own, field.name
    assert "| token_length | 4 |" in card.text and "| lora_dim | 2 |" in card.text
    for row in (
        "| learning_rate | 0.005 |",
        "| per_device_train_batch_size | 8 |",
        "| epochs | 2 |",
        f"| steps_trained | {trainer.state.global_step} |",
        "| optimizer | AdamW |",
        "| weight_decay | 0.01 |",
        "| seed | 3 |",
    ):
        assert row in card.text, row


@pytest.mark.numerics
def test_card_snippet_runs_as_written_in_a_fresh_process(trained, tmp_path):
    model, _, adapter_dir, _ = trained
    snippet = _python_block(ModelCard.load(os.path.join(adapter_dir, "README.md")))
    assert snippet.startswith("import rein_peft")
    assert "id2label={0: 'red', 1: 'green', 2: 'blue'}, ignore_mismatched_sizes=True" in snippet
    inputs = pixels(2, seed=5)
    torch.save(inputs, tmp_path / "inputs.pt")
    check = textwrap.dedent(
        """
        import torch

        with torch.no_grad():
            logits = model(pixel_values=torch.load("inputs.pt")).logits
        torch.save({"logits": logits, "labels": model.config.id2label}, "outputs.pt")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", snippet + check], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        expected = model(pixel_values=inputs).logits
    assert_same_numbers(outputs["logits"], expected)  # the trained adapter and head, reloaded by the snippet
    assert outputs["labels"] == ID2LABEL


def test_caller_info_wins_and_a_plain_save_says_what_was_not_recorded(tmp_path):
    model = get_peft_model(tiny_dinov2(), ReinConfig(token_length=4, modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path / "plain")
    plain = ModelCard.load(tmp_path / "plain" / "README.md")
    assert PEFT_TEMPLATE_GAP not in plain.content
    assert "- Training data: not recorded" in plain.text
    assert "No evaluation was recorded" in plain.text and "Not recorded (saved outside" in plain.text
    assert f"num_labels={LABELS}, ignore_mismatched_sizes=True" not in plain.text  # no checkpoint to load from
    assert "base = ...  # build the Dinov2ForImageClassification exactly as it was trained" in plain.text

    rein_peft.set_model_card_info(model, dataset="my/streets", metrics={"mean_iou": 0.5})
    rein_peft.set_model_card_info(model, hyperparameters={"learning_rate": 1e-4})
    model.save_pretrained(tmp_path / "told")
    told = ModelCard.load(tmp_path / "told" / "README.md")
    assert told.data.datasets == ["my/streets"]
    assert "| mean_iou | 0.5 |" in told.text and "| learning_rate | 0.0001 |" in told.text


def test_other_adapters_keep_peft_card(tmp_path):
    model = get_peft_model(tiny_dinov2(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md").content
    assert PEFT_TEMPLATE_GAP in card and "## Rein settings" not in card
