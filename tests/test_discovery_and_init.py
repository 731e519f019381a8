"""Discovery on models beyond the supported table, the official initialisation, and the cache's edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from conftest import adapted_dinov2, assert_same_numbers, pixels, randomize_adapter, tiny_dinov2
from peft import get_peft_model
from reference import ReferenceRein, official_tensors
from torch import nn

from rein_peft import ReinConfig, ReinUnsupportedModelError
from rein_peft.tuners.rein.discovery import discover

HIDDEN, PATCH = 32, 8


# --- initialisation (REIN.md) ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_dim", [None, 4])
def test_tokens_follow_the_official_init_not_the_guides_precedence_slip(lora_dim):
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_dinov2(), ReinConfig(lora_dim=lora_dim, scale_init=0.25))
    rein = peft_model.base_model.model.dinov2.encoder.rein
    if lora_dim is None:
        bound, tables = math.sqrt(6 / (3 * PATCH**2 + HIDDEN)), [rein.rein_tokens["default"]]
    else:
        bound = math.sqrt(6 / (3 * PATCH**2 + math.sqrt(HIDDEN * lora_dim)))
        tables = [rein.rein_tokens_a["default"], rein.rein_tokens_b["default"]]
    for table in tables:  # uniform(-bound, bound), with the discovered patch size 8
        assert 0.95 * bound < table.abs().max().item() <= bound
    for linear in (rein.rein_token2feat["default"], rein.rein_delta_f["default"]):
        assert linear.weight.abs().max().item() <= 1 / math.sqrt(HIDDEN)  # kaiming_uniform(a=sqrt(5))
    assert rein.rein_scale["default"].shape == (1,) and rein.rein_scale["default"].item() == 0.25


def test_zero_mlp_delta_f_starts_as_an_exact_identity():
    peft_model = get_peft_model(tiny_dinov2(), ReinConfig(zero_mlp_delta_f=True))
    rein = peft_model.base_model.model.dinov2.encoder.rein
    assert "default" not in rein.rein_scale  # the constant 1.0, not a parameter
    features = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        # x @ I + 0: every product is by 0 or 1 and every sum adds zeros, exact in any kernel
        assert torch.equal(rein.refine(features, "default", row=0), features)
        adapted = peft_model(pixels(2)).logits
        with peft_model.disable_adapter():
            plain = peft_model(pixels(2)).logits
    assert_same_numbers(adapted, plain)


# --- discovery beyond the table --------------------------------------------------------------------------------------


class TimmStyleViT(nn.Module):
    """timm's layout: tokens on the root, blocks in an nn.Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, HIDDEN, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, HIDDEN))
        self.reg_token = nn.Parameter(torch.randn(1, 4, HIDDEN))
        self.pos_embed = nn.Parameter(torch.randn(1, 16, HIDDEN))
        self.blocks = nn.Sequential(
            *[nn.TransformerEncoderLayer(HIDDEN, 2, 64, 0.0, batch_first=True) for _ in range(2)]
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2) + self.pos_embed
        tokens = torch.cat([self.cls_token, self.reg_token], 1).expand(len(pixels), -1, -1)
        return self.blocks(torch.cat([tokens, patches], 1))


def test_timm_style_model_is_found():
    targets = discover(TimmStyleViT(), ReinConfig())
    assert targets.layer_names == ["blocks.0", "blocks.1"]
    assert (targets.num_prefix_tokens, targets.hidden_size, targets.patch_size, targets.holder_name) == (5, 32, 8, "")
    assert targets.batch_first


class WrapperWithQueries(nn.Module):
    """A user's model around a SigLIP tower, with learned queries of its own outside the tower."""

    def __init__(self) -> None:
        super().__init__()
        config = tf.SiglipVisionConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, image_size=32)
        config.patch_size, config.intermediate_size = PATCH, 64
        self.tower = tf.SiglipVisionModel(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, 10, 16))


def test_tokens_outside_the_vision_tower_are_not_prefix_tokens():
    assert discover(WrapperWithQueries(), ReinConfig()).num_prefix_tokens == 0


def test_tokens_rein_cannot_place_are_refused():
    config = tf.YolosConfig(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=[32, 32]
    )
    config.patch_size, config.num_detection_tokens = PATCH, 3
    with pytest.raises(ReinUnsupportedModelError, match="detection_tokens.*num_prefix_tokens"):
        get_peft_model(tf.YolosModel(config), ReinConfig())


def test_layers_of_different_widths_outside_stages_are_refused_with_a_reason():
    """Both towers of a CLIP model named: two lists of different widths that are not the stages of one backbone."""
    config = tf.CLIPConfig(
        text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
        vision_config={
            "hidden_size": HIDDEN, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "image_size": 32, "patch_size": PATCH,
        },  # fmt: skip
    )
    with pytest.raises(ReinUnsupportedModelError, match="CLIPModel change width.*not the stages"):
        get_peft_model(tf.CLIPModel(config), ReinConfig(target_modules=r".*encoder\.layers\.\d+"))


def _sam(hidden: int, image_size: int) -> nn.Module:
    config = tf.SamVisionConfig(
        hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=PATCH,
        output_channels=16, window_size=2, global_attn_indexes=[1], mlp_dim=64,
    )  # fmt: skip
    return tf.SamVisionModel(config).eval()


def _vitdet() -> nn.Module:
    """VitDet with 8 channels on an 8x8 patch grid: its layers take and give channels-first maps."""
    config = tf.VitDetConfig(
        hidden_size=8, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=64, patch_size=8,
        pretrain_image_size=64,
    )  # fmt: skip
    return tf.VitDetModel(config)


# Channels-first layer outputs, at sizes where the width equals the grid's height and width (8 channels on an 8x8
# grid), so that only knowing the layout, not the shapes, can refuse them
CHANNELS_FIRST_MODELS = {
    "vitdet": (
        _vitdet,
        {},
        "VitDetModel feed its encoder layers channels-first feature maps",
    ),
    "vitdet_layers_named": (
        _vitdet,
        {"target_modules": r"encoder\.layer\.\d+"},
        "channels-first feature maps",
    ),
    # channels-last like SAM, but only at its configured size, where 8 channels equal the 8x8 grid: Rein cannot tell
    "sam_8_channels_8x8_grid": (lambda: _sam(hidden=8, image_size=64), {}, "cannot tell whether"),
}


@pytest.mark.parametrize("name", sorted(CHANNELS_FIRST_MODELS))
def test_channels_first_and_ambiguous_layouts_are_refused_when_the_adapter_is_created(name):
    build_model, config_kwargs, message = CHANNELS_FIRST_MODELS[name]
    torch.manual_seed(0)
    model = build_model().eval()
    with pytest.raises(ReinUnsupportedModelError, match=message) as refusal:
        get_peft_model(model, ReinConfig(token_length=5, **config_kwargs))
    assert type(model).__name__ in str(refusal.value) and "target_modules" in str(refusal.value)
    assert not any(type(module).__name__ == "ReinLayer" for module in model.modules())


def test_layers_with_spatial_hidden_states_are_refined():
    """SAM's layers keep [batch, height, width, hidden]: every position is a patch token."""
    torch.manual_seed(0)
    base = _sam(hidden=HIDDEN, image_size=64)
    reference_model = _sam(hidden=HIDDEN, image_size=64)
    reference_model.load_state_dict(base.state_dict())
    peft_model = get_peft_model(base, ReinConfig(token_length=5))
    randomize_adapter(peft_model)
    reference = ReferenceRein(official_tensors(peft_model))
    for index, layer in enumerate(reference_model.vision_encoder.layers):

        def hook(module, args, output, index=index):
            tokens = output.flatten(1, 2)  # [B, H*W, C]
            return reference.forward(tokens, index, batch_first=True, num_prefix=0).view(output.shape)

        layer.register_forward_hook(hook, prepend=True)
    images = pixels(2, side=64)
    with torch.no_grad():
        ours, theirs = peft_model(pixel_values=images), reference_model(pixel_values=images)
    assert (ours.last_hidden_state - theirs.last_hidden_state).abs().max().item() <= 1e-5


# --- the projection cache's edge cases -------------------------------------------------------------------------------


def test_cache_does_not_depend_on_autocast_order():
    peft_model = adapted_dinov2()
    with torch.no_grad():
        fresh = peft_model(pixels(2)).logits
        peft_model.base_model.model.dinov2.encoder.rein.projection_cache.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            peft_model(pixels(2))
        assert_same_numbers(peft_model(pixels(2)).logits, fresh)


def test_writes_through_data_are_picked_up_after_eval():
    peft_model = adapted_dinov2()
    rein = peft_model.base_model.model.dinov2.encoder.rein
    with torch.no_grad():
        peft_model(pixels(2))
        rein.rein_tokens["default"].data.mul_(2.0)  # bypasses the version counter, as an EMA update does
        peft_model.eval()
        after = peft_model(pixels(2)).logits
        rein.projection_cache.clear()
        assert_same_numbers(peft_model(pixels(2)).logits, after)


def test_moving_an_adapter_keeps_it_frozen():
    peft_model = get_peft_model(tiny_dinov2(), ReinConfig(token_length=6))
    peft_model.add_adapter("frozen", ReinConfig(token_length=6))
    rein = peft_model.base_model.model.dinov2.encoder.rein
    assert not rein.rein_tokens["frozen"].requires_grad
    rein._move_adapter_to_device_of_base_layer("frozen", torch.device("cpu"))
    assert not rein.rein_tokens["frozen"].requires_grad and not rein.rein_scale["frozen"].requires_grad
    assert rein.rein_tokens["default"].requires_grad


class DropsTokensBeforeLastBlock(TimmStyleViT):
    """Pools the sequence down before the last block, so that Rein cannot tell which tokens are left."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2) + self.pos_embed
        tokens = torch.cat([self.cls_token, self.reg_token], 1).expand(len(pixels), -1, -1)
        hidden = self.blocks[0](torch.cat([tokens, patches], 1))
        return self.blocks[1](hidden[:, :-4])


def test_tokens_dropped_inside_the_encoder_are_refused_at_forward():
    """(Tokens inserted in front of the sequence, as EoMT's queries, pass through: see test_segmentation.py.)"""
    peft_model = get_peft_model(DropsTokensBeforeLastBlock(), ReinConfig(token_length=4))
    with pytest.raises(ValueError, match="shrank from 21 to 17 tokens.*layers_to_transform"):
        peft_model(pixels(2))
    only_first = get_peft_model(DropsTokensBeforeLastBlock(), ReinConfig(token_length=4, layers_to_transform=[0]))
    assert only_first(pixels(2)).shape == (2, 17, HIDDEN)
