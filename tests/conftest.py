"""Tiny models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import transformers as tf
from peft import get_peft_model

from rein_peft import ReinConfig  # importing rein_peft registers Rein with PEFT

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HIDDEN, LAYERS, HEADS, MLP, IMAGE, PATCH, LABELS = 32, 2, 2, 64, 32, 8, 3
SIZES = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": MLP,
    "image_size": IMAGE,
    "patch_size": PATCH,
}


@dataclass(frozen=True)
class Family:
    """A supported model family: how to build a tiny one and what Rein must find in it."""

    name: str
    build: Callable[[], torch.nn.Module]
    layer_list: str  # where the encoder layers are, written out by hand for the tests
    num_prefix_tokens: int
    make_inputs: Callable[[int], dict] = lambda batch: {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE)}


def _siglip2_inputs(batch: int) -> dict:
    side = IMAGE // PATCH
    return {
        "pixel_values": torch.randn(batch, side * side, 3 * PATCH * PATCH),
        "pixel_attention_mask": torch.ones(batch, side * side, dtype=torch.long),
        "spatial_shapes": torch.tensor([[side, side]] * batch),
    }


def _clip_model() -> torch.nn.Module:
    config = tf.CLIPConfig(
        text_config={
            "hidden_size": HIDDEN,
            "num_hidden_layers": 3,
            "num_attention_heads": HEADS,
            "intermediate_size": MLP,
        },
        vision_config=SIZES,
        projection_dim=16,
    )
    return tf.CLIPModel(config)


def _clip_inputs(batch: int) -> dict:
    return {
        "pixel_values": torch.randn(batch, 3, IMAGE, IMAGE),
        "input_ids": torch.randint(0, 100, (batch, 5)),
    }


FAMILIES = {
    family.name: family
    for family in [
        Family("vit", lambda: tf.ViTForImageClassification(tf.ViTConfig(**SIZES, num_labels=LABELS)), "vit.layers", 1),
        Family(
            "deit",
            lambda: tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**SIZES, num_labels=LABELS)),
            "deit.layers",
            2,
        ),
        Family(
            "dinov2",
            lambda: tf.Dinov2ForImageClassification(tf.Dinov2Config(**SIZES, num_labels=LABELS)),
            "dinov2.encoder.layer",
            1,
        ),
        Family(
            "dinov2_registers",
            lambda: tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**SIZES, num_register_tokens=4)),
            "encoder.layer",
            5,
        ),
        Family(
            "dinov3",
            lambda: tf.DINOv3ViTModel(tf.DINOv3ViTConfig(**SIZES, num_register_tokens=4)),
            "model.layer",
            5,
        ),
        Family("clip_vision", lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**SIZES)), "encoder.layers", 1),
        Family("clip", _clip_model, "vision_model.encoder.layers", 1, _clip_inputs),
        Family("siglip", lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**SIZES)), "encoder.layers", 0),
        Family(
            "siglip2",
            lambda: tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**{**SIZES, "num_patches": (IMAGE // PATCH) ** 2})),
            "encoder.layers",
            0,
            _siglip2_inputs,
        ),
        Family(
            "beit", lambda: tf.BeitForImageClassification(tf.BeitConfig(**SIZES, num_labels=LABELS)), "beit.layers", 1
        ),
        Family(
            "data2vec_vision",
            lambda: tf.Data2VecVisionModel(tf.Data2VecVisionConfig(**SIZES)),
            "encoder.layer",
            1,
        ),
        Family(
            "dinov2_backbone",
            lambda: tf.Dinov2Backbone(tf.Dinov2Config(**SIZES, out_features=["stage1", "stage2"])),
            "encoder.layer",
            1,
        ),
    ]
}


# Two computations of the same numbers through different kernels, or through the same kernels on other memory or
# another thread count (MKL's float32 results depend on both), agree to float32 rounding: a few ulps per operation,
# over a tiny model's few dozen operations well below 1e-5 of the values' size. Bit-equality is asserted only where
# the very same tensors go through the very same kernels (a cache hit, copied weights).
FLOAT32_RTOL = 1e-5

# Tests that launch several processes (torchrun, accelerate launch) rendezvous on the launchers' default port 29500:
# pytest-xdist runs the tests marked so one after the other, on one worker (their `xdist_group`, added below). Their
# processes compute on one thread (OMP_NUM_THREADS=1 in their environment) and the reference they are compared with
# on two (`on_threads`) in every run, so scripts/test.sh's rerun of the numerics tests on the default threads leaves
# them out
MULTIPROCESS = pytest.mark.multiprocess

# The end-to-end runs that take a large share of the suite (a benchmark's quick mode, an example's training, the
# launchers): pytest-xdist starts them first (`pytest_collection_modifyitems` below), so that the other worker runs
# the many short tests meanwhile instead of one worker finishing a long test alone at the end
HEAVY = pytest.mark.heavy


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist the `multiprocess` tests in one xdist group; the tests marked `heavy` first, every other
    test in its collected order after them."""
    if config.pluginmanager.has_plugin("xdist"):
        for item in items:
            if item.get_closest_marker(MULTIPROCESS.name):
                item.add_marker(pytest.mark.xdist_group(MULTIPROCESS.name))
    items.sort(key=lambda item: item.get_closest_marker(HEAVY.name) is None)


@contextlib.contextmanager
def on_threads(count: int) -> Iterator[None]:
    """Compute on `count` threads inside the block (torch's intra-op threads; OMP_NUM_THREADS sets only the start)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_same_numbers(actual: torch.Tensor, expected: torch.Tensor, rtol: float = FLOAT32_RTOL) -> None:
    """Assert that two separately computed tensors hold the same numbers up to float32 rounding: each element within
    `rtol` of itself plus `rtol` of the largest value compared (so values near zero are judged on the tensor's
    scale, as rounding errors are)."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest absolute difference, relative to the largest value of `expected` (compare with `FLOAT32_RTOL`)."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def build(family: Family, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return family.build().eval()


def pixels(batch: int, seed: int = 0, side: int = IMAGE) -> torch.Tensor:
    """Seeded random images, [batch, 3, side, side]."""
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def tiny_dinov2(num_layers: int = LAYERS, hidden: int = HIDDEN, classifier: bool = True, **config_kwargs):
    config = tf.Dinov2Config(
        **{**SIZES, "num_hidden_layers": num_layers, "hidden_size": hidden, "num_labels": LABELS, **config_kwargs}
    )
    model = tf.Dinov2ForImageClassification(config) if classifier else tf.Dinov2Model(config)
    return model.eval()


def randomize_adapter(peft_model: torch.nn.Module, seed: int = 1) -> None:
    """Give every adapter tensor seeded values that change the output visibly while keeping activations O(1):
    matrices get std 1/sqrt(fan-in), vectors (biases, the scale) std 0.5."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".rein_" in name:
                values = torch.randn(param.shape, generator=generator)
                param.copy_(values / param.shape[-1] ** 0.5 if param.ndim >= 2 else values * 0.5)


def train_steps(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, optimizer, steps: int) -> list[float]:
    """Train `model` for `steps` steps on one batch; the loss of each step."""
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def adapted_dinov2(**config_kwargs) -> torch.nn.Module:
    """A tiny DINOv2 classifier wrapped with a Rein adapter (token_length 6 unless given) with seeded values."""
    peft_model = get_peft_model(tiny_dinov2(), ReinConfig(**{"token_length": 6, **config_kwargs}))
    randomize_adapter(peft_model)
    return peft_model


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


def tiny_mask2former_config(
    backbone_config: tf.PretrainedConfig, num_queries: int, query_width: int = 32, **overrides
) -> tf.Mask2FormerConfig:
    """A Mask2Former config small enough for the tests over `backbone_config` (its GroupNorms need widths of 32k);
    `overrides` set other fields."""
    return tf.Mask2FormerConfig(
        backbone_config=backbone_config,
        num_labels=LABELS,
        num_queries=num_queries,
        hidden_dim=query_width,
        mask_feature_size=query_width,
        feature_size=query_width,
        encoder_layers=1,
        decoder_layers=2,
        dim_feedforward=32,
        encoder_feedforward_dim=32,
        num_attention_heads=2,
        **{"common_stride": 4, "train_num_points": 64, **overrides},
    )


def tiny_upernet() -> torch.nn.Module:
    """A tiny UperNet segmentation model over a DINOv2 backbone (features of both layers, as feature maps)."""
    backbone = tf.Dinov2Config(**SIZES, out_features=["stage1", "stage2"], reshape_hidden_states=True)
    config = tf.UperNetConfig(
        backbone_config=backbone, num_labels=LABELS, hidden_size=16, pool_scales=[1, 2], use_auxiliary_head=False
    )
    torch.manual_seed(0)
    return tf.UperNetForSemanticSegmentation(config).eval()
