"""`official_segmenter_config` / `build_official_segmenter`: the official 512x512 Rein segmenter, its parameter counts
at full size (built on the meta device) and a scaled-down copy that loads a checkpoint, trains, saves and reloads."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import HEADS, HEAVY, MLP, assert_same_numbers, pixels
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

import rein_peft
from rein_peft import (
    Dinov2PyramidBackbone,
    Dinov2PyramidConfig,
    build_official_segmenter,
    official,
    official_segmenter_config,
    semantic_scores,
)
from rein_peft.official.segmenter import HEAD_MODULES, apply_method, mask_targets

# the scaled-down copy: 6 layers (pyramid from layers 2, 3, 4, 6), width 32, patch 8 on 64x64 images
TINY_BACKBONE = {
    "hidden_size": 32,
    "num_hidden_layers": 6,
    "num_attention_heads": HEADS,
    "intermediate_size": MLP,
    "patch_size": 8,
    "image_size": 64,
}
TINY_DECODER = {
    "num_queries": 6,
    "hidden_dim": 32,
    "num_decoder_layers": 2,
    "encoder_layers": 1,
    "dim_feedforward": 32,
    "encoder_feedforward_dim": 32,
    "num_attention_heads": 2,
    "train_num_points": 64,
}
NUM_LABELS, SIDE = 3, 64
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BACKBONE = "model.pixel_level_module.encoder"


def rein_parameters(layers: int, tokens: int, rank: int, width: int, query_width: int) -> int:
    """Rein with low-rank tokens and query linking (REIN.md): tokens A, B; token2feat, delta_f; scale; transform,
    merge."""
    low_rank_tokens = layers * tokens * rank + layers * rank * width
    mlps = 2 * (width * width + width)
    linking = (width * query_width + query_width) + (3 * query_width * query_width + query_width)
    return low_rank_tokens + mlps + 1 + linking


def linear_parameters(width: int) -> int:
    return width * width + width


def trainable(model: nn.Module) -> dict[str, int]:
    return {name: param.numel() for name, param in model.named_parameters() if param.requires_grad}


def test_official_config_is_the_official_recipe():
    config = official_segmenter_config()
    backbone = config.backbone_config
    assert isinstance(backbone, Dinov2PyramidConfig)
    assert (backbone.hidden_size, backbone.num_hidden_layers, backbone.patch_size, backbone.image_size) == (
        1024,
        24,
        16,
        512,
    )
    assert backbone.out_features == ["stage8", "stage12", "stage16", "stage24"]  # out_indices 7, 11, 15, 23 (0-based)
    assert backbone.apply_layernorm is False and backbone.feature_scales == [4, 2, 1, 0.5]
    assert (config.feature_strides, config.common_stride) == ([4, 8, 16, 32], 4)
    assert (config.num_queries, config.hidden_dim, config.encoder_layers, config.num_labels) == (100, 256, 6, 19)
    assert (config.feature_size, config.mask_feature_size, config.dim_feedforward) == (256, 256, 2048)
    assert (config.encoder_feedforward_dim, config.decoder_layers) == (1024, 10)  # transformers' count: 9 + 1
    losses = (config.class_weight, config.mask_weight, config.dice_weight, config.no_object_weight)
    assert losses == (2.0, 5.0, 5.0, 0.1)
    assert (config.train_num_points, config.oversample_ratio, config.importance_sample_ratio) == (12544, 3.0, 0.75)
    with torch.device("meta"):
        model = tf.Mask2FormerForUniversalSegmentation(config)
    assert len(model.model.transformer_module.decoder.layers) == 9  # masked-attention layers
    assert len(model.model.pixel_level_module.decoder.encoder.layers) == 6  # deformable layers, on 3 levels
    assert model.model.pixel_level_module.decoder.num_feature_levels == 3
    group_norms = [module for module in model.modules() if isinstance(module, nn.GroupNorm)]
    assert group_norms and all(module.num_groups == 32 for module in group_norms)
    assert type(model.get_submodule(BACKBONE)) is Dinov2PyramidBackbone


@pytest.mark.parametrize("num_decoder_layers", [1, 2, 9])
def test_one_width_and_the_official_layer_count_size_the_head(num_decoder_layers):
    backbone = tf.Dinov2Config(**TINY_BACKBONE)
    config = official_segmenter_config(backbone, hidden_dim=32, num_decoder_layers=num_decoder_layers)
    assert config.hidden_dim == config.feature_size == config.mask_feature_size == 32
    assert (config.dim_feedforward, config.encoder_feedforward_dim) == (8 * 32, 4 * 32)  # the official 2048 / 1024
    assert config.decoder_layers == num_decoder_layers + 1  # transformers counts the prediction before layer 1
    with torch.device("meta"):
        model = tf.Mask2FormerForUniversalSegmentation(config)
    assert len(model.model.transformer_module.decoder.layers) == num_decoder_layers
    assert official.mask2former_decoder_fields(32, num_decoder_layers) == {
        "hidden_dim": 32,
        "feature_size": 32,
        "mask_feature_size": 32,
        "decoder_layers": num_decoder_layers + 1,
    }
    sizes = importlib.import_module("rein_peft.official.protocol").mask2former_sizes(32)
    assert sizes["decoder_layers"] == 3  # the small Mask2Former: 2 layers
    overridden = official_segmenter_config(backbone, hidden_dim=32, dim_feedforward=48)
    assert (overridden.dim_feedforward, overridden.decoder_layers) == (48, 10)


def test_the_old_spellings_of_the_sizes_warn_and_build_the_same_config():
    backbone = tf.Dinov2Config(**TINY_BACKBONE)
    with pytest.warns(FutureWarning, match=r"hidden_dim=32, num_decoder_layers=2 instead"):
        old = official_segmenter_config(
            backbone, hidden_dim=32, feature_size=32, mask_feature_size=32, decoder_layers=3
        )
    assert old.to_dict() == official_segmenter_config(backbone, hidden_dim=32, num_decoder_layers=2).to_dict()
    with pytest.raises(ValueError, match=r"feature_size=64 differs from hidden_dim=32.*hidden_dim=64"):
        official_segmenter_config(backbone, hidden_dim=32, feature_size=64)
    with pytest.raises(ValueError, match=r"decoder_layers=3 .*2 layers.* contradicts num_decoder_layers=4"):
        official_segmenter_config(backbone, num_decoder_layers=4, decoder_layers=3)
    with pytest.raises(ValueError, match="hidden_dim and num_decoder_layers must be positive"):
        official_segmenter_config(backbone, num_decoder_layers=0)


def test_the_old_semantic_logits_name_warns_with_the_new_name():
    message = r"`rein_peft.official.semantic_logits` is deprecated.*rein_peft.semantic_scores`"
    with pytest.warns(FutureWarning, match=message):
        old = official.semantic_logits
    assert old is rein_peft.semantic_scores is official.semantic_scores
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names do not warn
        rein_peft.semantic_scores  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'semantic_logit'"):
        official.semantic_logit  # noqa: B018


def test_full_size_trainable_parameters():
    """Rein's 2,990,081 (REIN.md) plus its map to the decoder's content queries, plus the head; and the baselines."""
    config = official_segmenter_config()
    counts = {}
    for method in ("rein", "frozen", "full", "lora"):
        with torch.device("meta"):
            counts[method] = trainable(apply_method(tf.Mask2FormerForUniversalSegmentation(config), method))
    rein = sum(count for name, count in counts["rein"].items() if ".rein.rein_" in name and "query_feat" not in name)
    assert rein == rein_parameters(24, 100, 16, 1024, 256) == 2_990_081
    query_feat = sum(count for name, count in counts["rein"].items() if "rein_query_feat" in name)
    assert query_feat == linear_parameters(256)  # the official head's `querys2feat`
    head = sum(counts["frozen"].values())
    assert head == 20_565_204
    assert sum(counts["rein"].values()) == 2_990_081 + query_feat + head == 23_621_077
    assert sum(counts["lora"].values()) == head + 24 * 2 * 2 * 16 * 1024  # A and B of q and v in each layer
    assert sum(counts["full"].values()) == 324_764_884


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A patch-8 DINOv2 checkpoint (patch 16 stands for it at this scale) with seeded weights."""
    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    tf.Dinov2Model(tf.Dinov2Config(**TINY_BACKBONE)).eval().save_pretrained(folder)
    return str(folder)


def tiny_config(checkpoint: str) -> tf.Mask2FormerConfig:
    return official_segmenter_config(checkpoint, num_labels=NUM_LABELS, **TINY_DECODER)


def _build(checkpoint: str, method: str) -> nn.Module:
    torch.manual_seed(0)
    return build_official_segmenter(checkpoint, NUM_LABELS, method, config=tiny_config(checkpoint))


def _labels(batch: int) -> dict:
    maps = torch.randint(0, NUM_LABELS, (batch, SIDE // 8, SIDE // 8), generator=torch.Generator().manual_seed(1))
    maps = maps.repeat_interleave(8, 1).repeat_interleave(8, 2)  # blocks of 8x8 pixels
    classes = [label_map.unique() for label_map in maps]
    masks = [
        (label_map[None] == present[:, None, None]).float() for label_map, present in zip(maps, classes, strict=True)
    ]
    return {"mask_labels": masks, "class_labels": classes}


def test_scaled_down_config_keeps_the_geometry_and_the_pyramid(tiny_checkpoint):
    config = tiny_config(tiny_checkpoint)
    assert config.backbone_config.out_features == ["stage2", "stage3", "stage4", "stage6"]
    assert (config.feature_strides, config.common_stride) == ([2, 4, 8, 16], 2)  # patch 8 / (4, 2, 1, 0.5)
    model = _build(tiny_checkpoint, "full").eval()
    images = pixels(2, seed=2, side=SIDE)
    with torch.no_grad():
        maps = model.get_submodule(BACKBONE)(pixel_values=images).feature_maps
        outputs = model(pixel_values=images)
    assert [tuple(feature.shape[-2:]) for feature in maps] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert outputs.masks_queries_logits.shape == (2, 6, 32, 32)  # masks at stride 2 here, 4 at full size
    assert outputs.class_queries_logits.shape == (2, 6, NUM_LABELS + 1)


def test_pyramid_levels_are_the_refined_outputs_of_the_official_layers(tiny_checkpoint):
    """Levels k = the Rein-refined output of layers 2, 3, 4, 6 of 6 (7, 11, 15, 23 of 24, 0-based), patch tokens as
    maps, resized by x4, x2, x1, x0.5."""
    model = _build(tiny_checkpoint, "rein").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".rein_" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(9)) * 0.1)
    backbone = model.get_base_model().get_submodule(BACKBONE)
    images, grid = pixels(1, seed=10, side=SIDE), SIDE // TINY_BACKBONE["patch_size"]
    with torch.no_grad():
        output = backbone(pixel_values=images, output_hidden_states=True)
    for feature, layer, scale in zip(output.feature_maps, [2, 3, 4, 6], [4, 2, 1, 0.5], strict=True):
        tokens = output.hidden_states[layer][:, 1:]  # hidden_states[k]: the output of layer k (1-based), refined
        expected = tokens.transpose(1, 2).reshape(1, -1, grid, grid)
        if scale != 1:
            expected = nn.functional.interpolate(expected, scale_factor=scale, mode="bilinear", align_corners=False)
        assert_same_numbers(feature, expected)


def test_mask_targets_and_semantic_scores():
    label_maps = torch.tensor([[[0, 2], [255, 2]], [[1, 1], [1, 255]]])
    targets = mask_targets(label_maps, ignore_index=255)
    assert [classes.tolist() for classes in targets["class_labels"]] == [[0, 2], [1]]
    torch.testing.assert_close(targets["mask_labels"][0], torch.tensor([[[1.0, 0], [0, 0]], [[0, 1], [0, 1]]]))
    torch.testing.assert_close(targets["mask_labels"][1], torch.tensor([[[1.0, 1], [1, 0]]]))
    class_logits, mask_logits = torch.randn(2, 5, 4), torch.randn(2, 5, 3, 3)  # 3 classes + no object, 5 queries
    outputs = tf.models.mask2former.modeling_mask2former.Mask2FormerForUniversalSegmentationOutput(
        class_queries_logits=class_logits, masks_queries_logits=mask_logits
    )
    expected = torch.zeros(2, 3, 3, 3)
    for query in range(5):  # the official inference: class probabilities (no object dropped) times sigmoid masks
        expected += class_logits.softmax(-1)[:, query, :3, None, None] * mask_logits[:, query, None].sigmoid()
    assert_same_numbers(semantic_scores(outputs), expected)


@pytest.mark.parametrize("method", ["rein", "frozen", "full", "lora"])
def test_scaled_down_segmenter_loads_the_checkpoint_and_trains_what_the_method_says(tiny_checkpoint, method, capsys):
    model = _build(tiny_checkpoint, method)
    checkpoint = tf.Dinov2Model.from_pretrained(tiny_checkpoint).state_dict()
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    backbone = base.get_submodule(BACKBONE).state_dict()
    for key, tensor in checkpoint.items():
        original = key.replace(".q_proj.", ".q_proj.base_layer.").replace(".v_proj.", ".v_proj.base_layer.")
        torch.testing.assert_close(backbone[original if method == "lora" else key], tensor, rtol=0, atol=0, msg=key)

    counts = trainable(model)
    backbone_counts = {name: count for name, count in counts.items() if ".encoder.encoder.layer" in name}
    head = sum(count for name, count in counts.items() if any(module in name for module in HEAD_MODULES))
    total = sum(p.numel() for name, p in base.named_parameters() if "original_module" not in name)
    if method == "rein":
        rein = sum(count for name, count in counts.items() if ".rein.rein_" in name)
        assert rein == rein_parameters(6, 6, 16, 32, 32) + linear_parameters(32)
        assert sum(counts.values()) == rein + head and not backbone_counts
        model.print_trainable_parameters()
        assert f"trainable params: {sum(counts.values()):,}" in capsys.readouterr().out
    elif method == "frozen":
        assert sum(counts.values()) == head and not backbone_counts
    elif method == "full":
        assert sum(counts.values()) == total
    else:  # LoRA r=16 on q and v of each of the 6 layers
        assert sum(backbone_counts.values()) == 6 * 2 * 2 * 16 * 32
        assert all("lora_" in name and ("q_proj" in name or "v_proj" in name) for name in backbone_counts)

    model.train()
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(pixel_values=pixels(2, seed=3, side=SIDE), **_labels(2)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not [name for name, param in model.named_parameters() if not param.requires_grad and param.grad is not None]


def test_official_rein_segmenter_saves_and_reloads(tiny_checkpoint, tmp_path):
    model = _build(tiny_checkpoint, "rein")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".rein_" in name:  # trained values: a visible refinement
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(7)) * 0.1)
    model.eval().save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_build(tiny_checkpoint, "full"), tmp_path).eval()
    images = pixels(1, seed=8, side=SIDE)
    with torch.no_grad():
        expected, output = model(pixel_values=images), reloaded(pixel_values=images)
        with reloaded.disable_adapter():
            unrefined = reloaded(pixel_values=images).masks_queries_logits
    torch.testing.assert_close(output.masks_queries_logits, expected.masks_queries_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.class_queries_logits, expected.class_queries_logits, rtol=1e-5, atol=1e-5)
    assert (unrefined - expected.masks_queries_logits).abs().max() > 1e-3


def test_official_segmenter_refuses_bad_inputs(tiny_checkpoint, tmp_path):
    torch.manual_seed(0)
    tf.Dinov2Model(tf.Dinov2Config(**{**TINY_BACKBONE, "patch_size": 14, "image_size": 56})).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="resized from 14 to 16.*rein_peft.resize_backbone"):
        official_segmenter_config(str(tmp_path))
    with pytest.raises(ValueError, match="patch size 14 but the segmenter's backbone 8.*resize_backbone"):
        build_official_segmenter(str(tmp_path), NUM_LABELS, config=tiny_config(tiny_checkpoint))
    shallower = tmp_path / "shallower"
    tf.Dinov2Model(tf.Dinov2Config(**{**TINY_BACKBONE, "num_hidden_layers": 4})).save_pretrained(shallower)
    with pytest.raises(ValueError, match="does not fill the pyramid backbone: missing .*encoder.layer.4"):
        build_official_segmenter(str(shallower), NUM_LABELS, config=tiny_config(tiny_checkpoint))
    with pytest.raises(ValueError, match="method must be one of"):
        build_official_segmenter(None, NUM_LABELS, method="adapter", config=tiny_config(tiny_checkpoint))
    plain = tf.Mask2FormerConfig(backbone_config=tf.Dinov2Config(**TINY_BACKBONE))
    with pytest.raises(ValueError, match="official_segmenter_config"):
        build_official_segmenter(None, NUM_LABELS, config=plain)
    with pytest.raises(ValueError, match="4 distinct layers"):
        official_segmenter_config(tf.Dinov2Config(**{**TINY_BACKBONE, "num_hidden_layers": 2}))
    assert rein_peft.build_official_segmenter is build_official_segmenter


@HEAVY
def test_segmentation_example_trains_the_official_segmenter(tmp_path):
    """`--official_segmenter`: the pyramid Mask2Former, scaled down to the embedded backbone, with Rein as official."""
    sys.path.insert(0, str(EXAMPLES))
    from train_semantic_segmentation import EMBEDDED_OFFICIAL_DECODER, main

    quick = ["--max_train_samples", "32", "--max_eval_samples", "16", "--num_train_epochs", "1", "--skip_baseline"]
    results = main(["--output_dir", str(tmp_path), "--official_segmenter", *quick])
    assert results["miou_reloaded"] == results["miou_after"]
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    queries, width = EMBEDDED_OFFICIAL_DECODER["num_queries"], EMBEDDED_OFFICIAL_DECODER["hidden_dim"]
    tokens_a = next(tensor for key, tensor in tensors.items() if key.endswith("rein_tokens_a"))
    assert tuple(tokens_a.shape) == (4, queries, 16)  # the official LoRA tokens, one per query, in all 4 layers
    assert any(key.endswith("rein_query_feat.weight") for key in tensors)
    head = sum(tensor.numel() for key, tensor in tensors.items() if ".rein." not in key)
    rein = sum(tensor.numel() for key, tensor in tensors.items() if ".rein." in key)
    assert rein == rein_parameters(4, queries, 16, 64, width) + linear_parameters(width)
    assert results["trainable_parameters"] == rein + head


@HEAVY
def test_domain_generalization_benchmark_compares_methods_on_the_official_segmenter(tmp_path, monkeypatch):
    """`--segmenter official`: every method on the same pyramid Mask2Former, Rein as the official one."""
    monkeypatch.syspath_prepend(str(EXAMPLES.parent / "benchmarks"))
    import domain_generalization as dg
    from dg_miniature.foundations import QUICK_SIZES
    from dg_miniature.methods import MINIATURE_OFFICIAL_DECODER

    # a decoder 32 wide (the official head's GroupNorms take multiples of 32) instead of the benchmark's 64: the counts
    # below follow the width, and the run costs a fraction
    flags = ["--quick", "--segmenter", "official", "--methods", "frozen", "rein_lora16", "--decoder_channels", "32"]
    result = dg.main([*flags, "--cache_dir", str(tmp_path / "cache"), "--output", str(tmp_path)])
    assert (tmp_path / "domain_generalization_vicreg_official_quick.json").is_file()
    summary, width = result["summary"], QUICK_SIZES["hidden"]
    queries, query_width = MINIATURE_OFFICIAL_DECODER["num_queries"], result["settings"]["decoder_channels"]
    head = summary["frozen"]["trainable_params"]
    assert summary["frozen"]["trainable_backbone_params"] == 0
    rein = rein_parameters(4, queries, 16, width, query_width) + linear_parameters(query_width)
    assert summary["rein_lora16"]["trainable_backbone_params"] == rein
    assert summary["rein_lora16"]["trainable_params"] == head + rein
    assert all(0 <= run["source_miou"] <= 1 for run in result["runs"])
