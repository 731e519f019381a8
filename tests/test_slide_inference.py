"""rein_peft.official.evaluation: per-pixel class scores of each segmentation family, sliding-window inference
against a plain reference, the test-time resize, and the data-set mean IoU against `evaluate`'s module."""

from __future__ import annotations

import math

import datasets
import evaluate
import numpy as np
import pytest
import torch
import transformers as tf
from conftest import SIZES, assert_same_numbers, tiny_upernet
from PIL import Image

from rein_peft import evaluate_segmentation, keep_ratio_size, slide_inference, whole_inference
from rein_peft.official import protocol
from rein_peft.official.evaluation import MEAN_IOU_METRIC

LABELS = 3


def _dpt() -> torch.nn.Module:
    config = tf.DPTConfig(
        **{**SIZES, "num_hidden_layers": 4},
        neck_hidden_sizes=[16, 16, 16, 16],
        fusion_hidden_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        num_labels=LABELS,
        use_auxiliary_head=False,
    )
    return tf.DPTForSemanticSegmentation(config)


def _eomt() -> torch.nn.Module:
    config = tf.EomtConfig(**{**SIZES, "num_hidden_layers": 4}, num_queries=5, num_blocks=2, num_labels=LABELS)
    return tf.EomtForUniversalSegmentation(config)


def _mask2former() -> torch.nn.Module:
    stages = ["stage1", "stage2", "stage3", "stage4"]
    backbone = tf.Dinov2Config(**{**SIZES, "num_hidden_layers": 4}, out_features=stages, reshape_hidden_states=True)
    config = protocol.segmenter_config("mask2former", backbone, LABELS, hidden_size=32, num_queries=5)
    return tf.Mask2FormerForUniversalSegmentation(config)


# DPT and EoMT take images of their config's size (32) only: the sliding window hands them crops of that size
FAMILIES = {"upernet": tiny_upernet, "dpt": _dpt, "eomt": _eomt, "mask2former": _mask2former}


@pytest.fixture(params=sorted(FAMILIES))
def model(request) -> torch.nn.Module:
    torch.manual_seed(0)
    return FAMILIES[request.param]().eval()


def _pixels(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_class_scores_are_the_standard_semantic_scores(model):
    pixels = _pixels(32, 32)
    scores = whole_inference(model, pixels)
    assert scores.shape == (1, LABELS, 32, 32)
    outputs = model(pixel_values=pixels)
    if hasattr(outputs, "masks_queries_logits"):  # written out: sum over queries of class prob x mask prob
        masks = torch.nn.functional.interpolate(outputs.masks_queries_logits, size=(32, 32), mode="bilinear")
        probs = outputs.class_queries_logits.softmax(-1)
        expected = torch.zeros(1, LABELS, 32, 32)
        for query in range(probs.shape[1]):
            for label in range(LABELS):  # the last class, "no object", is left out
                expected[0, label] += probs[0, query, label] * masks[0, query].sigmoid()
    else:
        expected = torch.nn.functional.interpolate(outputs.logits, size=(32, 32), mode="bilinear")
    assert_same_numbers(scores, expected)


@torch.no_grad()
def test_one_crop_covering_the_image_is_whole_image_inference(model):
    pixels = _pixels(32, 32)
    expected = whole_inference(model, pixels)
    torch.testing.assert_close(slide_inference(model, pixels, crop_size=48, stride=32), expected)
    torch.testing.assert_close(slide_inference(model, pixels, crop_size=32, stride=11), expected)


def _reference_slide(model, pixels: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Plainly: the crops start every `stride` pixels, and one more flush with the far side where the last does not
    reach it; each pixel's score is the mean over the crops that contain it."""
    _, _, height, width = pixels.shape

    def starts(length: int) -> list[int]:
        if length <= crop:
            return [0]
        positions = list(range(0, length - crop + 1, stride))
        return positions + ([length - crop] if positions[-1] != length - crop else [])

    total = torch.zeros(1, LABELS, height, width, dtype=torch.float64)
    count = torch.zeros(height, width, dtype=torch.float64)
    for top in starts(height):
        for left in starts(width):
            scores = whole_inference(model, pixels[:, :, top : top + crop, left : left + crop]).double()
            for row in range(scores.shape[2]):
                for col in range(scores.shape[3]):
                    total[0, :, top + row, left + col] += scores[0, :, row, col]
                    count[top + row, left + col] += 1
    return (total / count).float()


@pytest.mark.parametrize(("height", "width", "crop", "stride"), [(40, 72, 32, 21), (32, 64, 32, 32), (24, 56, 32, 16)])
@torch.no_grad()
def test_overlaps_are_averaged_exactly(height, width, crop, stride):
    torch.manual_seed(0)
    model = tiny_upernet()
    pixels = _pixels(height, width, seed=1)
    expected = _reference_slide(model, pixels, crop, stride)
    torch.testing.assert_close(slide_inference(model, pixels, crop_size=crop, stride=stride), expected)


@torch.no_grad()
def test_slide_inference_on_every_family_matches_the_reference(model):
    pixels = _pixels(40, 56, seed=2)
    expected = _reference_slide(model, pixels, 32, 21)
    torch.testing.assert_close(slide_inference(model, pixels, crop_size=32, stride=21), expected)


def test_official_grid_and_bad_strides():
    from rein_peft.official.evaluation import _window_starts

    assert _window_starts(1024, 512, 341) == [0, 341, 512]  # Cityscapes at 1024x512: 3 crops across, 1 down
    assert _window_starts(1280, 512, 341) == [0, 341, 682, 768] and _window_starts(720, 512, 341) == [0, 208]
    with pytest.raises(ValueError, match="stride must be in"):
        slide_inference(tiny_upernet(), _pixels(32, 32), crop_size=16, stride=20)


def test_test_size_keeps_the_aspect_ratio_within_the_scale():
    # (height, width) in, scale (height, width), (height, width) out
    assert keep_ratio_size(1024, 2048, (512, 1024)) == (512, 1024)  # Cityscapes
    assert keep_ratio_size(720, 1280, (720, 1280)) == (720, 1280)  # BDD100K, unchanged
    assert keep_ratio_size(3024, 4032, (512, 1024)) == (512, 683)  # a 4:3 Mapillary image: the short side binds
    assert keep_ratio_size(4032, 3024, (512, 1024)) == (683, 512)  # the same image upright
    assert keep_ratio_size(1000, 3000, (512, 1024)) == (341, 1024)  # a panorama: the long side binds
    assert keep_ratio_size(1000, 3000, (1024, 512)) == (341, 1024)  # mmseg's (width, height) spelling: the same


def _labelled_dataset(num_images: int, height: int, width: int) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(num_images)]
    labels = []
    for _ in range(num_images):
        label = rng.integers(0, LABELS, (height, width)).astype(np.uint8)
        label[:2] = 255
        labels.append(Image.fromarray(label))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_data_set_mean_iou_is_evaluates_mean_iou_of_the_resized_predictions():
    """Images at 30x50 tested at half size with a sliding window; the predictions resized back to the labels."""
    torch.manual_seed(0)
    model = tiny_upernet()
    data = _labelled_dataset(3, 30, 50)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    result = evaluate_segmentation(
        model, data, mean, std, test_size=(15, 25), crop_size=16, stride=10, predictions_of=[1]
    )

    predictions, references = [], []
    for example in data:
        image = example["image"].resize((25, 15), Image.BILINEAR)
        pixels = (torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.25
        scores = _reference_slide(model, pixels, 16, 10)
        scores = torch.nn.functional.interpolate(scores, size=(30, 50), mode="bilinear", align_corners=False)
        predictions.append(scores.argmax(1)[0].numpy())
        references.append(np.asarray(example["label"]))
    expected = evaluate.load(MEAN_IOU_METRIC).compute(
        predictions=predictions, references=references, num_labels=LABELS, ignore_index=255
    )
    assert result["mean_iou"] == pytest.approx(expected["mean_iou"], abs=1e-12)
    for value, reference in zip(result["per_category_iou"], expected["per_category_iou"], strict=True):
        assert (value is None and math.isnan(reference)) or value == pytest.approx(reference, abs=1e-12)
    assert result["num_images"] == 3 and list(result["predictions"]) == [1]
    np.testing.assert_array_equal(result["predictions"][1][2], predictions[1])
