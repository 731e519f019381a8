"""Official DINOv2 weights (facebookresearch/dinov2 names, or the official Rein conversion to patch 16) convert into a
transformers DINOv2 folder without the Hub; with a released Rein-and-head checkpoint they make the official segmenter.

The reference mapping and the official forward below are written from facebookresearch/dinov2's
`DinoVisionTransformer` (fused `qkv`, `ls1.gamma`, SwiGLU `w12` / `w3`), independently of rein_peft's rules.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from conftest import assert_same_numbers
from peft import PeftModel
from test_convert_head import (
    CLASSES,
    HEADS,
    IMAGE,
    PATCH,
    C,
    official_dinov2_features,
    synthetic_checkpoint,
    tiny_official_config,
)

import rein_peft
from rein_peft import OfficialCheckpointError, build_official_segmenter, convert_dinov2_checkpoint
from rein_peft.convert_dinov2 import main
from rein_peft.official.convert_backbone import map_dinov2_checkpoint

# compares separately computed numbers: scripts/test.sh runs these tests again under OMP_NUM_THREADS=1
pytestmark = pytest.mark.numerics


def official_dinov2(
    width: int, layers: int, grid: int, patch: int, swiglu_width: int = 0, registers: int = 0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A `DinoVisionTransformer` state dict as facebookresearch/dinov2 saves it (block_chunks=0, LayerScale, qkv
    bias), random values."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    state_dict = {
        "cls_token": rand(1, 1, width),
        "pos_embed": rand(1, 1 + grid * grid, width),
        "mask_token": rand(1, width),
        "patch_embed.proj.weight": rand(width, 3, patch, patch),
        "patch_embed.proj.bias": rand(width),
        "norm.weight": 1 + rand(width),
        "norm.bias": rand(width),
    }
    if registers:
        state_dict["register_tokens"] = rand(1, registers, width)
    for i in range(layers):
        block = f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            state_dict |= {f"{block}.{norm}.weight": 1 + rand(width), f"{block}.{norm}.bias": rand(width)}
        state_dict |= {f"{block}.attn.qkv.weight": rand(3 * width, width), f"{block}.attn.qkv.bias": rand(3 * width)}
        state_dict |= {f"{block}.attn.proj.weight": rand(width, width), f"{block}.attn.proj.bias": rand(width)}
        state_dict |= {f"{block}.ls1.gamma": rand(width), f"{block}.ls2.gamma": rand(width)}
        if swiglu_width:
            state_dict |= {
                f"{block}.mlp.w12.weight": rand(2 * swiglu_width, width),
                f"{block}.mlp.w12.bias": rand(2 * swiglu_width),
                f"{block}.mlp.w3.weight": rand(width, swiglu_width),
                f"{block}.mlp.w3.bias": rand(width),
            }
        else:
            state_dict |= {f"{block}.mlp.fc1.weight": rand(4 * width, width), f"{block}.mlp.fc1.bias": rand(4 * width)}
            state_dict |= {f"{block}.mlp.fc2.weight": rand(width, 4 * width), f"{block}.mlp.fc2.bias": rand(width)}
    return state_dict


def reference_mapping(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' DINOv2 state dict from the official one, written out name by name."""
    ours = {
        "embeddings.cls_token": official["cls_token"],
        "embeddings.mask_token": official["mask_token"],
        "embeddings.position_embeddings": official["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": official["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": official["patch_embed.proj.bias"],
        "layernorm.weight": official["norm.weight"],
        "layernorm.bias": official["norm.bias"],
    }
    if "register_tokens" in official:
        ours["embeddings.register_tokens"] = official["register_tokens"]
    layer = 0
    while f"blocks.{layer}.norm1.weight" in official:
        old, new = f"blocks.{layer}.", f"encoder.layer.{layer}."
        for part in ("weight", "bias"):
            ours[new + f"norm1.{part}"] = official[old + f"norm1.{part}"]
            ours[new + f"norm2.{part}"] = official[old + f"norm2.{part}"]
            q, k, v = official[old + f"attn.qkv.{part}"].chunk(3)
            ours[new + f"attention.q_proj.{part}"] = q
            ours[new + f"attention.k_proj.{part}"] = k
            ours[new + f"attention.v_proj.{part}"] = v
            ours[new + f"attention.o_proj.{part}"] = official[old + f"attn.proj.{part}"]
            if old + "mlp.w12.weight" in official:
                gate, up = official[old + f"mlp.w12.{part}"].chunk(2)
                ours[new + f"mlp.gate_proj.{part}"], ours[new + f"mlp.up_proj.{part}"] = gate, up
                ours[new + f"mlp.down_proj.{part}"] = official[old + f"mlp.w3.{part}"]
            else:
                ours[new + f"mlp.fc1.{part}"] = official[old + f"mlp.fc1.{part}"]
                ours[new + f"mlp.fc2.{part}"] = official[old + f"mlp.fc2.{part}"]
        ours[new + "layer_scale1.lambda1"] = official[old + "ls1.gamma"]
        ours[new + "layer_scale2.lambda1"] = official[old + "ls2.gamma"]
        layer += 1
    return ours


@pytest.mark.parametrize(
    ("swiglu_width", "registers", "model_class"),
    [(0, 0, tf.Dinov2Model), (344, 4, tf.Dinov2WithRegistersModel)],
    ids=["vit", "swiglu-registers"],
)
def test_every_official_tensor_lands_where_the_reference_mapping_says(tmp_path, swiglu_width, registers, model_class):
    # 128 wide: two official 64-wide heads; SwiGLU 344 = ceil8(2/3 * 4 * 128), ViT-g's rule with mlp ratio 4
    official = official_dinov2(128, layers=2, grid=3, patch=14, swiglu_width=swiglu_width, registers=registers)
    torch.save(official, tmp_path / "dinov2_vitx14_pretrain.pth")

    model = convert_dinov2_checkpoint(tmp_path / "dinov2_vitx14_pretrain.pth", tmp_path / "converted")

    assert type(model) is model_class
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 2, 2)
    assert (config.mlp_ratio, config.use_swiglu_ffn, config.patch_size, config.image_size) == (
        4,
        bool(swiglu_width),
        14,
        42,
    )
    assert getattr(config, "num_register_tokens", 0) == registers and config.layer_norm_eps == 1e-6
    expected = reference_mapping(official)
    assert map_dinov2_checkpoint(official).unused == {}
    reloaded = model_class.from_pretrained(tmp_path / "converted")
    for name, tensors in (("converted", model.state_dict()), ("reloaded", reloaded.state_dict())):
        assert tensors.keys() == expected.keys(), name
        for key, tensor in expected.items():  # copies: bit-equal
            assert torch.equal(tensors[key], tensor), (name, key)


def official_block_chain(official: dict[str, torch.Tensor], pixel_values: torch.Tensor, heads: int) -> torch.Tensor:
    """The official forward of a SwiGLU DINOv2 with registers: tokens [CLS, registers, patches] after the last block,
    before the final norm (positions at their own size; registers added after the positions)."""
    width = official["cls_token"].shape[-1]
    batch = pixel_values.shape[0]
    patch = official["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(pixel_values, official["patch_embed.proj.weight"], official["patch_embed.proj.bias"], stride=patch)
    x = torch.cat([official["cls_token"].expand(batch, -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + official["pos_embed"]
    x = torch.cat([x[:, :1], official["register_tokens"].expand(batch, -1, -1), x[:, 1:]], 1)
    i = 0
    while f"blocks.{i}.norm1.weight" in official:
        b = {
            key.removeprefix(f"blocks.{i}."): value
            for key, value in official.items()
            if key.startswith(f"blocks.{i}.")
        }
        h = F.layer_norm(x, (width,), b["norm1.weight"], b["norm1.bias"], eps=1e-6)
        qkv = (h @ b["attn.qkv.weight"].T + b["attn.qkv.bias"]).view(batch, -1, 3, heads, width // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, d]
        attended = ((q @ k.transpose(-1, -2)) * (width // heads) ** -0.5).softmax(-1) @ v
        attended = attended.transpose(1, 2).flatten(2) @ b["attn.proj.weight"].T + b["attn.proj.bias"]
        x = x + b["ls1.gamma"] * attended
        h = F.layer_norm(x, (width,), b["norm2.weight"], b["norm2.bias"], eps=1e-6)
        gate, up = (h @ b["mlp.w12.weight"].T + b["mlp.w12.bias"]).chunk(2, dim=-1)  # SwiGLUFFN: silu(x1) * x2
        x = x + b["ls2.gamma"] * ((F.silu(gate) * up) @ b["mlp.w3.weight"].T + b["mlp.w3.bias"])
        i += 1
    return x


def test_the_converted_model_computes_the_official_forward():
    # plain ViT blocks: the whole-segmentor synthetic checkpoint's DINOv2 against the official blocks written out
    segmentor = synthetic_checkpoint()
    mapping = map_dinov2_checkpoint(segmentor, num_attention_heads=HEADS)
    assert mapping.unused and all(".reins." in key or key.startswith("decode_head.") for key in mapping.unused)
    model = convert_dinov2_checkpoint(segmentor, num_attention_heads=HEADS)
    pixel_values = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden_states = model(pixel_values, output_hidden_states=True).hidden_states[1:]
        expected = official_dinov2_features(segmentor, pixel_values)
    side = IMAGE // PATCH
    for ours, reference in zip(hidden_states, expected, strict=True):
        assert_same_numbers(ours[:, 1:].transpose(1, 2).reshape(2, C, side, side), reference)
    # SwiGLU with registers (ViT-g's feed-forward, the _reg4 files' register tokens), through the last block
    official = official_dinov2(64, layers=2, grid=4, patch=8, swiglu_width=176, registers=2, seed=1)
    model = convert_dinov2_checkpoint(official)
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model(pixel_values, output_hidden_states=True).hidden_states[-1]
        assert_same_numbers(ours, official_block_chain(official, pixel_values, heads=1))


def official_conversion_to_patch_16(official: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """tools/convert_models/convert_dinov2_large_512x512.py of w1oves/Rein, written out for any width and grid."""
    converted = dict(official)
    positions = official["pos_embed"]  # [1, 1 + g * g, C]
    old_grid, width = int((positions.shape[1] - 1) ** 0.5), positions.shape[2]
    patch_positions = positions[:, 1:].reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2)
    patch_positions = F.interpolate(patch_positions, size=(grid, grid), mode="bicubic", align_corners=False)
    converted["pos_embed"] = torch.cat(
        [positions[:, :1], patch_positions.permute(0, 2, 3, 1).reshape(1, grid * grid, width)], dim=1
    )
    converted["patch_embed.proj.weight"] = F.interpolate(
        official["patch_embed.proj.weight"].float(), size=(16, 16), mode="bicubic", align_corners=False
    )
    return converted


def test_the_official_rein_conversion_and_resizing_here_agree(tmp_path):
    official = official_dinov2(64, layers=2, grid=5, patch=14)
    torch.save(official_conversion_to_patch_16(official, grid=4), tmp_path / "dinov2_converted.pth")

    already = convert_dinov2_checkpoint(tmp_path / "dinov2_converted.pth", num_attention_heads=1)
    resized_here = convert_dinov2_checkpoint(official, patch_size=16, image_size=64, num_attention_heads=1)

    assert (already.config.patch_size, already.config.image_size) == (16, 64)
    unchanged = convert_dinov2_checkpoint(official, patch_size=14, num_attention_heads=1)  # its own patch: kept
    assert (unchanged.config.patch_size, unchanged.config.image_size) == (14, 70)
    assert torch.equal(unchanged.embeddings.position_embeddings, official["pos_embed"])
    assert (resized_here.config.patch_size, resized_here.config.image_size) == (16, 64)
    ours, theirs = resized_here.state_dict(), already.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert_same_numbers(ours[key], theirs[key])


def test_the_command_line_writes_a_folder_transformers_loads(tmp_path, capsys):
    official = official_dinov2(128, layers=1, grid=3, patch=14)
    torch.save({"meta": {"seed": np.int64(3)}, "state_dict": official}, tmp_path / "dinov2.pth")
    main([str(tmp_path / "dinov2.pth"), str(tmp_path / "out"), "--patch-size", "16", "--image-size", "48"])
    assert "Dinov2Model, 128 wide, 1 layers, 2 heads, patch 16, 3x3 position grid" in capsys.readouterr().out
    model = tf.Dinov2Model.from_pretrained(tmp_path / "out")
    assert model.embeddings.patch_embeddings.projection.weight.shape == (128, 3, 16, 16)
    with pytest.raises(SystemExit) as exit_code:
        main(["--help"])
    assert exit_code.value.code == 0
    with pytest.raises(SystemExit):  # a clear usage error, not a traceback
        main([str(tmp_path / "missing.pth"), str(tmp_path / "out2")])


def test_what_is_no_dinov2_is_refused_by_name():
    official = official_dinov2(128, layers=1, grid=3, patch=14)
    with pytest.raises(
        OfficialCheckpointError, match=r"no part of .*DinoVisionTransformer.*\['blocks\.0\.attn\.extra'\]"
    ):
        convert_dinov2_checkpoint(official | {"blocks.0.attn.extra": torch.zeros(1)})
    with pytest.raises(OfficialCheckpointError, match=r"96 wide, which is no multiple of the official head width 64"):
        convert_dinov2_checkpoint(official_dinov2(96, layers=1, grid=3, patch=14))
    with pytest.raises(OfficialCheckpointError, match=r"no 'pos_embed'"):
        convert_dinov2_checkpoint({key: value for key, value in official.items() if key != "pos_embed"})
    without_gamma = {key: value for key, value in official.items() if key != "blocks.0.ls1.gamma"}
    with pytest.raises(OfficialCheckpointError, match=r"encoder\.layer\.0\.layer_scale1\.lambda1 is unset"):
        convert_dinov2_checkpoint(without_gamma)


def test_official_dinov2_file_and_released_checkpoint_make_the_official_segmenter(tmp_path):
    whole = synthetic_checkpoint()  # Rein, the head and DINOv2 in the official names
    dinov2 = {key.removeprefix("backbone."): value for key, value in whole.items() if key.startswith("backbone.")}
    dinov2 = {key: value for key, value in dinov2.items() if not key.startswith("reins.")}
    released = {key: value for key, value in whole.items() if key not in {f"backbone.{name}" for name in dinov2}}
    torch.save(dinov2, tmp_path / "dinov2_pretrain.pth")
    torch.save({"meta": {"iter": np.int64(40000)}, "state_dict": released}, tmp_path / "iter_40000_published.pth")
    convert_dinov2_checkpoint(tmp_path / "dinov2_pretrain.pth", tmp_path / "dinov2", num_attention_heads=HEADS)
    config = tiny_official_config(str(tmp_path / "dinov2"))

    model = build_official_segmenter(
        tmp_path / "dinov2", config=config, checkpoint=tmp_path / "iter_40000_published.pth"
    )

    # the same checkpoint converted whole (its DINOv2 inside) onto an untrained segmenter
    reference = rein_peft.convert_official_checkpoint(whole, tf.Mask2FormerForUniversalSegmentation(config))
    assert isinstance(model, PeftModel) and model.peft_config["default"].link_token_to_query
    pixel_values = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    model.eval(), reference.eval()
    with torch.no_grad():
        ours, expected = model(pixel_values=pixel_values), reference(pixel_values=pixel_values)
        untrained = build_official_segmenter(tmp_path / "dinov2", config=config)(pixel_values=pixel_values)
    assert_same_numbers(ours.masks_queries_logits, expected.masks_queries_logits)
    assert_same_numbers(ours.class_queries_logits, expected.class_queries_logits)
    assert (untrained.class_queries_logits - expected.class_queries_logits).abs().max() > 1e-2


def test_a_released_checkpoint_needs_its_backbone_and_no_method(tmp_path):
    released = synthetic_checkpoint(backbone=False)  # Rein and the head, as the released files
    with pytest.raises(ValueError, match=r"holds no DINOv2 weights .* backbone="):
        build_official_segmenter(checkpoint=released_file(tmp_path, released))
    with pytest.raises(ValueError, match=r"method='rein' would build another"):
        build_official_segmenter(checkpoint=released_file(tmp_path, released), method="rein")


def test_the_official_segmenter_refuses_a_backbone_with_registers(tmp_path):
    convert_dinov2_checkpoint(official_dinov2(64, layers=4, grid=4, patch=8, registers=2), tmp_path / "reg")
    with pytest.raises(ValueError, match=r"is a 'dinov2_with_registers' model; .* no register tokens"):
        build_official_segmenter(tmp_path / "reg", num_labels=CLASSES, method="frozen")


def released_file(tmp_path, state_dict: dict) -> str:
    path = tmp_path / "iter_40000_published.pth"
    torch.save({"meta": {}, "state_dict": state_dict}, path)
    return str(path)
