"""examples/train_semantic_segmentation.py: real Trainer runs with UperNet and a query-linked Mask2Former, images of
any size, bad label maps, and the local mean-IoU metric."""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import evaluate
import numpy as np
import pytest
from conftest import HEAVY
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

import rein_peft  # noqa: F401  (registers Rein with PEFT)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
from train_semantic_segmentation import DECODER_MODULES, EMBEDDED_DATASET, main  # noqa: E402

QUICK = ["--max_train_samples", "64", "--max_eval_samples", "32", "--num_train_epochs", "1", "--skip_baseline"]


@HEAVY
@pytest.mark.parametrize(
    "decoder_flags", [["--decoder", "upernet"], ["--decoder", "mask2former", "--link_token_to_query"]]
)
def test_trains_saves_and_reloads_the_same_miou(tmp_path, decoder_flags):
    results = main(["--output_dir", str(tmp_path), *QUICK, *decoder_flags])
    assert results["miou_reloaded"] == results["miou_after"]
    assert 0 < results["miou_after"] <= 1
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    decoder = DECODER_MODULES[decoder_flags[1]]
    assert all(".rein." in key or any(f".{module}." in key for module in decoder) for key in tensors)
    if "--link_token_to_query" in decoder_flags:  # the linking layers travel with the adapter
        assert {"rein_transform", "rein_merge", "rein_query_feat"} <= {key.split(".")[-2] for key in tensors}
    # the model card: a base built from a config (no checkpoint to name), the embedded data, the mIoU reached
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.datasets == [EMBEDDED_DATASET] and f"| mean_iou | {results['miou_after']:.4g} |" in card.text
    assert "- Head: 3 labels: background, small square, large square" in card.text


def _save_dataset(folder: Path, label_values: list[int], sizes: list[tuple[int, int]]) -> None:
    """A dataset on disk with images of the given sizes and label maps filled with the given values."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for (width, height), value in zip(sizes, label_values, strict=True):
        images.append(Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)))
        label_map = np.zeros((height, width), dtype=np.uint8)
        label_map[: height // 2] = value
        labels.append(Image.fromarray(label_map))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(folder)


def test_images_of_any_size_are_resized_with_their_label_maps(tmp_path):
    sizes = [(50, 37), (120, 90), (9, 200), (64, 64)] * 4
    _save_dataset(tmp_path / "data", [1, 2, 255, 0] * 4, sizes)
    results = main(["--output_dir", str(tmp_path / "out"), "--dataset_name", str(tmp_path / "data"), *QUICK])
    assert results["miou_reloaded"] == results["miou_after"]


def test_label_maps_that_disagree_with_the_model_stop_with_one_line(tmp_path, capsys):
    _save_dataset(tmp_path / "data", [1, 7] * 8, [(64, 64)] * 16)
    # the script's `main` in this process (a fresh one adds only the imports): exit status 2, one line on stderr
    with pytest.raises(SystemExit) as stopped:
        main(["--output_dir", str(tmp_path / "out"), "--dataset_name", str(tmp_path / "data"), *QUICK])
    assert stopped.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith("error: The label maps hold values [7], but the model has 3 classes (0 to 2) and ignores 255.")
    )


def test_mean_iou_metric_matches_a_hand_computed_value():
    metric = evaluate.load(str(EXAMPLES / "metrics" / "mean_iou.py"))
    prediction, reference = np.array([[0, 1], [1, 1]]), np.array([[0, 1], [255, 0]])
    # kept pixels: reference [0, 1, 0], prediction [0, 1, 1]; class 0: 1 / 2, class 1: 1 / 2, class 2: absent
    result = metric.compute(predictions=[prediction], references=[reference], num_labels=3, ignore_index=255)
    assert result["mean_iou"] == pytest.approx(0.5)
    assert result["mean_accuracy"] == pytest.approx(0.75)
    assert result["overall_accuracy"] == pytest.approx(2 / 3)
    assert np.isnan(result["per_category_iou"][2])
