"""examples/reproduce_domain_generalization.py: the offline default end to end (fake data sets in their real layouts,
a tiny backbone, frozen, Rein and SoMA through Trainer, sliding-window evaluation, the table, JSON and pictures), in a
quicker mode than the default's; and the command line's errors."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HEAVY
from PIL import Image
from transformers import HfArgumentParser, TrainingArguments

from rein_peft.official import dg_data
from rein_peft.tuners.soma import SOMA_RANK

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import reproduce_domain_generalization as reproduce  # noqa: E402
from fake_dg_datasets import write_fake_dataset  # noqa: E402

QUICK = ["--max_steps", "2", "--max_eval_images", "2", "--num_pictures", "2"]


def _captions(picture: Image.Image) -> list[bool]:
    """Whether there is text (dark pixels on white): in the caption line, then over each of the three columns."""
    lines = np.asarray(picture.convert("L")) < 128
    height, third = reproduce.CAPTION_HEIGHT, picture.width // len(reproduce.PICTURE_COLUMNS)
    columns = lines[height : 2 * height]
    return [bool(lines[:height].any())] + [bool(columns[:, i * third : (i + 1) * third].any()) for i in range(3)]


@HEAVY
def test_offline_default_runs_the_protocol_end_to_end(tmp_path):
    result = reproduce.main(["--output_dir", str(tmp_path), *QUICK, "--methods", "frozen", "rein", "soma"])
    assert result["offline"] and result["source_names"] == ["gta"]
    assert result["target_names"] == ["cityscapes", "bdd100k", "mapillary"]
    # the official test sizes divided by 8
    assert result["test_sizes"] == {"cityscapes": (64, 128), "bdd100k": (90, 160), "mapillary": (64, 128)}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["methods"]) == ["frozen", "rein", "soma"]
    for method, row in saved["methods"].items():
        assert row["train_seconds"] > 0 and row["trainable_parameters"] > 0
        for name in result["target_names"]:
            target = row["targets"][name]
            assert 0 <= target["mean_iou"] <= 1 and target["num_images"] == 2
            assert list(target["per_category_iou"]) == list(dg_data.CITYSCAPES_CLASSES)
            ious = [value for value in target["per_category_iou"].values() if value is not None]
            assert target["mean_iou"] == pytest.approx(statistics.fmean(ious))
            picture = Image.open(tmp_path / f"predictions_{method}_{name}.png")
            # a caption line and a line of column names over two rows of image, label and prediction side by side
            assert picture.height == 2 * reproduce.CAPTION_HEIGHT + 2 * (256 + 4)
            assert _captions(picture) == [True, True, True, True]
        assert row["mean_miou"] == pytest.approx(
            statistics.fmean(row["targets"][n]["mean_iou"] for n in result["target_names"])
        )
    assert saved["methods"]["rein"]["trainable_parameters"] > saved["methods"]["frozen"]["trainable_parameters"]
    assert (tmp_path / "rein" / "final" / "adapter_model.safetensors").is_file()  # the adapter and the head
    # SoMA trains with its own schedule and saves the plain rank-2r LoRA of the unmodified backbone (docs/soma.md)
    soma = json.loads((tmp_path / "soma" / "final" / "adapter_config.json").read_text())
    assert soma["peft_type"] == "LORA" and soma["r"] == 2 * SOMA_RANK and soma["bias"] == "lora_only"
    table = (tmp_path / "results.md").read_text()
    assert "| rein |" in table and "(66.4, paper; 66.7 official README)" in table and "(56.1, paper)" in table
    # fake data: the table says first that the run only exercises the pipeline
    assert table.startswith(f"**{reproduce.OFFLINE_NOTE}**")
    assert "only exercises the pipeline" in reproduce.OFFLINE_NOTE


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--source", "gtav=x", "--target", "cityscapes=y", "--backbone", "b"], "--source takes NAME=PATH"),
        (["--source", "gta=x", "--backbone", "b"], "--target NAME=PATH is needed"),
        (["--source", "gta=x", "--target", "cityscapes=y"], "--backbone is needed"),
        (["--methods", "adapter"], "--methods takes"),
        (["--mapillary_scoring", "quarter"], "invalid choice: 'quarter'"),
    ],
)
def test_command_line_errors_say_what_to_do(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        reproduce.main(["--output_dir", str(tmp_path), *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_missing_data_set_folder_stops_with_its_name(tmp_path, capsys):
    flags = ["--source", f"gta={tmp_path / 'nowhere'}", "--target", "cityscapes=y", "--backbone", "b"]
    with pytest.raises(SystemExit):
        reproduce.main(["--output_dir", str(tmp_path / "out"), *flags])
    assert f"gta: no folder '{tmp_path / 'nowhere'}'" in capsys.readouterr().err


@pytest.mark.parametrize("scoring", ["half", "full"])
def test_mapillary_is_scored_on_half_size_copies_unless_asked_otherwise(tmp_path, scoring):
    written = write_fake_dataset("mapillary", str(tmp_path / "mapillary"), num_images=2, split="val")
    flags = [] if scoring == "half" else ["--mapillary_scoring", "full"]
    args, _ = HfArgumentParser((reproduce.ProtocolArguments, TrainingArguments)).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path / "out"), *flags]
    )
    assert args.mapillary_scoring == scoring
    dataset = reproduce.load_target("mapillary", str(tmp_path / "mapillary"), args)
    for example, (_, train_ids) in zip(dataset, written, strict=True):
        height, width = train_ids.shape
        expected = (width // 2, height // 2) if scoring == "half" else (width, height)
        assert example["label"].size == expected and example["image"].size == expected
    cityscapes = write_fake_dataset("cityscapes", str(tmp_path / "cityscapes"), num_images=1, split="val")
    label = reproduce.load_target("cityscapes", str(tmp_path / "cityscapes"), args)[0]["label"]
    assert label.size == cityscapes[0][1].shape[::-1]  # the other targets at full size either way
