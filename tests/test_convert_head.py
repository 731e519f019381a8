"""Whole official checkpoints (Rein + mmdet Mask2Former head + DINOv2) convert into a transformers Mask2Former.

The official names and shapes below are written from the mmdet / mmcv / DINOv2 modules (docs/official-checkpoints.md),
independently of rein_peft's rules; the reference forward is mmdet's computation written out plainly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from conftest import assert_same_numbers
from peft import PeftModel, get_peft_model_state_dict
from transformers.modeling_outputs import BackboneOutput
from transformers.models.mask2former.modeling_mask2former import Mask2FormerSinePositionEmbedding

from rein_peft import convert_official_checkpoint, get_queries, official_segmenter_config
from rein_peft.official.convert import OfficialCheckpointError, load_official_model_tensors, map_official_checkpoint

# the tiny segmentor: C wide everywhere (GroupNorm needs 32k), 4 backbone stages, 3 deformable levels
C, HEADS, POINTS, LEVELS, ENC_LAYERS, DEC_LAYERS, ENC_FFN, DEC_FFN, CLASSES = 32, 2, 4, 3, 2, 2, 64, 48, 3
BACKBONE_LAYERS, PATCH, IMAGE, TOKENS, RANK = 4, 8, 32, 6, 4
GROUPS = 32
PD, TD = "model.pixel_level_module.decoder", "model.transformer_module.decoder"
DINO = "model.pixel_level_module.encoder"


def tiny_mask2former(
    decoder_layers: int = DEC_LAYERS + 1, num_labels: int = CLASSES, num_queries: int = TOKENS
) -> tf.Mask2FormerForUniversalSegmentation:
    backbone = tf.Dinov2Config(
        hidden_size=C,
        num_hidden_layers=BACKBONE_LAYERS,
        num_attention_heads=2,
        intermediate_size=4 * C,
        image_size=IMAGE,
        patch_size=PATCH,
        out_features=[f"stage{i + 1}" for i in range(BACKBONE_LAYERS)],
        reshape_hidden_states=True,
        apply_layernorm=False,
    )
    config = tf.Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=num_labels,
        num_queries=num_queries,
        hidden_dim=C,
        mask_feature_size=C,
        feature_size=C,
        encoder_layers=ENC_LAYERS,
        decoder_layers=decoder_layers,
        dim_feedforward=DEC_FFN,
        encoder_feedforward_dim=ENC_FFN,
        num_attention_heads=HEADS,
        train_num_points=64,
    )
    torch.manual_seed(0)
    return tf.Mask2FormerForUniversalSegmentation(config).eval()


def _norm(official: str, target: str) -> list[tuple[str, tuple, str | tuple]]:
    return [(f"{official}.weight", (C,), f"{target}.weight"), (f"{official}.bias", (C,), f"{target}.bias")]


def _linear(official: str, target: str | tuple, out_features: int, in_features: int) -> list[tuple]:
    if isinstance(target, tuple):  # a fused projection, split along dim 0
        weights, biases = tuple(f"{t}.weight" for t in target), tuple(f"{t}.bias" for t in target)
        return [
            (f"{official}_weight", (out_features, in_features), weights),
            (f"{official}_bias", (out_features,), biases),
        ]
    return [
        (f"{official}.weight", (out_features, in_features), f"{target}.weight"),
        (f"{official}.bias", (out_features,), f"{target}.bias"),
    ]


def official_head_table(linked: bool) -> list[tuple[str, tuple, str | tuple]]:
    """(official name, shape, transformers name) of every tensor of the head, as mmdet saves a (Rein)Mask2FormerHead
    with the official config's structure (3 deformable levels, one FPN level below them, identity decoder inputs)."""
    rows = []
    pd, td = "decode_head.pixel_decoder", "decode_head.transformer_decoder"
    for i in range(LEVELS):  # ConvModule(1x1, bias, GN), from the lowest resolution up
        rows += [(f"{pd}.input_convs.{i}.conv.weight", (C, C, 1, 1), f"{PD}.input_projections.{i}.0.weight")]
        rows += [(f"{pd}.input_convs.{i}.conv.bias", (C,), f"{PD}.input_projections.{i}.0.bias")]
        rows += _norm(f"{pd}.input_convs.{i}.gn", f"{PD}.input_projections.{i}.1")
    rows += [(f"{pd}.level_encoding.weight", (LEVELS, C), f"{PD}.level_embed")]
    for j in range(ENC_LAYERS):
        layer, target = f"{pd}.encoder.layers.{j}", f"{PD}.encoder.layers.{j}"
        rows += _linear(
            f"{layer}.self_attn.sampling_offsets",
            f"{target}.self_attn.sampling_offsets",
            HEADS * LEVELS * POINTS * 2,
            C,
        )
        rows += _linear(
            f"{layer}.self_attn.attention_weights", f"{target}.self_attn.attention_weights", HEADS * LEVELS * POINTS, C
        )
        rows += _linear(f"{layer}.self_attn.value_proj", f"{target}.self_attn.value_proj", C, C)
        rows += _linear(f"{layer}.self_attn.output_proj", f"{target}.self_attn.output_proj", C, C)
        rows += _linear(f"{layer}.ffn.layers.0.0", f"{target}.fc1", ENC_FFN, C)
        rows += _linear(f"{layer}.ffn.layers.1", f"{target}.fc2", C, ENC_FFN)
        rows += _norm(f"{layer}.norms.0", f"{target}.self_attn_layer_norm") + _norm(
            f"{layer}.norms.1", f"{target}.final_layer_norm"
        )
    rows += [(f"{pd}.lateral_convs.0.conv.weight", (C, C, 1, 1), f"{PD}.adapter_1.0.weight")]  # no bias under GN
    rows += _norm(f"{pd}.lateral_convs.0.gn", f"{PD}.adapter_1.1")
    rows += [(f"{pd}.output_convs.0.conv.weight", (C, C, 3, 3), f"{PD}.layer_1.0.weight")]
    rows += _norm(f"{pd}.output_convs.0.gn", f"{PD}.layer_1.1")
    rows += [(f"{pd}.mask_feature.weight", (C, C, 1, 1), f"{PD}.mask_projection.weight")]
    rows += [(f"{pd}.mask_feature.bias", (C,), f"{PD}.mask_projection.bias")]
    for j in range(DEC_LAYERS):
        layer, target = f"{td}.layers.{j}", f"{TD}.layers.{j}"
        qkv = tuple(f"{target}.self_attn.{p}_proj" for p in "qkv")
        rows += _linear(f"{layer}.self_attn.attn.in_proj", qkv, 3 * C, C)
        rows += _linear(f"{layer}.self_attn.attn.out_proj", f"{target}.self_attn.out_proj", C, C)
        rows += [(f"{layer}.cross_attn.attn.in_proj_weight", (3 * C, C), f"{target}.cross_attn.in_proj_weight")]
        rows += [(f"{layer}.cross_attn.attn.in_proj_bias", (3 * C,), f"{target}.cross_attn.in_proj_bias")]
        rows += _linear(f"{layer}.cross_attn.attn.out_proj", f"{target}.cross_attn.out_proj", C, C)
        rows += _linear(f"{layer}.ffn.layers.0.0", f"{target}.fc1", DEC_FFN, C)
        rows += _linear(f"{layer}.ffn.layers.1", f"{target}.fc2", C, DEC_FFN)
        rows += _norm(f"{layer}.norms.0", f"{target}.cross_attn_layer_norm")
        rows += _norm(f"{layer}.norms.1", f"{target}.self_attn_layer_norm")
        rows += _norm(f"{layer}.norms.2", f"{target}.final_layer_norm")
    rows += _norm(f"{td}.post_norm", f"{TD}.layernorm")
    rows += [("decode_head.level_embed.weight", (LEVELS, C), "model.transformer_module.level_embed.weight")]
    rows += _linear("decode_head.cls_embed", "class_predictor", CLASSES + 1, C)
    for k in range(3):  # nn.Sequential(Linear, ReLU, Linear, ReLU, Linear)
        rows += _linear(f"decode_head.mask_embed.{2 * k}", f"{TD}.mask_predictor.mask_embedder.{k}.0", C, C)
    if linked:  # ReinMask2FormerHead(replace_query_feat=True): no query tables, a Linear from Rein's queries
        rows += _linear("decode_head.querys2feat", "rein_query_feat", C, C)
    else:
        rows += [("decode_head.query_embed.weight", (TOKENS, C), "model.transformer_module.queries_embedder.weight")]
        rows += [("decode_head.query_feat.weight", (TOKENS, C), "model.transformer_module.queries_features.weight")]
    return rows


def official_backbone_table() -> list[tuple[str, tuple, str | tuple]]:
    """The DINOv2 weights in the official DINOv2 repository's names, as `tools/generate_full_weights.py` adds them."""
    rows = [
        ("backbone.cls_token", (1, 1, C), f"{DINO}.embeddings.cls_token"),
        ("backbone.mask_token", (1, C), f"{DINO}.embeddings.mask_token"),
        ("backbone.pos_embed", (1, 1 + (IMAGE // PATCH) ** 2, C), f"{DINO}.embeddings.position_embeddings"),
        (
            "backbone.patch_embed.proj.weight",
            (C, 3, PATCH, PATCH),
            f"{DINO}.embeddings.patch_embeddings.projection.weight",
        ),
        ("backbone.patch_embed.proj.bias", (C,), f"{DINO}.embeddings.patch_embeddings.projection.bias"),
    ]
    for i in range(BACKBONE_LAYERS):
        block, layer = f"backbone.blocks.{i}", f"{DINO}.encoder.layer.{i}"
        rows += _norm(f"{block}.norm1", f"{layer}.norm1") + _norm(f"{block}.norm2", f"{layer}.norm2")
        qkv = tuple(f"{layer}.attention.{p}_proj" for p in "qkv")
        rows += [(f"{block}.attn.qkv.weight", (3 * C, C), tuple(f"{t}.weight" for t in qkv))]
        rows += [(f"{block}.attn.qkv.bias", (3 * C,), tuple(f"{t}.bias" for t in qkv))]
        rows += _linear(f"{block}.attn.proj", f"{layer}.attention.o_proj", C, C)
        rows += [(f"{block}.ls1.gamma", (C,), f"{layer}.layer_scale1.lambda1")]
        rows += [(f"{block}.ls2.gamma", (C,), f"{layer}.layer_scale2.lambda1")]
        rows += _linear(f"{block}.mlp.fc1", f"{layer}.mlp.fc1", 4 * C, C) + _linear(
            f"{block}.mlp.fc2", f"{layer}.mlp.fc2", C, 4 * C
        )
    return rows + _norm("backbone.norm", f"{DINO}.layernorm")


def official_rein_tensors(linked: bool) -> dict[str, torch.Tensor]:
    """LoRAReins tensors for the tiny backbone, with query linking into C-wide queries or without."""
    shapes = {
        "learnable_tokens_a": (BACKBONE_LAYERS, TOKENS, RANK),
        "learnable_tokens_b": (BACKBONE_LAYERS, RANK, C),
        "scale": (),
        "mlp_token2feat.weight": (C, C),
        "mlp_token2feat.bias": (C,),
        "mlp_delta_f.weight": (C, C),
        "mlp_delta_f.bias": (C,),
    }
    if linked:
        shapes |= {"transform.weight": (C, C), "transform.bias": (C,), "merge.weight": (C, 3 * C), "merge.bias": (C,)}
    return {f"backbone.reins.{name}": shape for name, shape in shapes.items()}


def synthetic_checkpoint(linked: bool = True, backbone: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded values for every official tensor: matrices std 1/sqrt(fan-in), norm weights near 1, vectors O(0.3)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {name: shape for name, shape, _ in official_head_table(linked)}
    shapes |= official_rein_tensors(linked)
    if backbone:
        shapes |= {name: shape for name, shape, _ in official_backbone_table()}
    state_dict = {}
    for name, shape in shapes.items():
        values = torch.randn(shape, generator=generator)
        if len(shape) >= 2:
            values = values / math.prod(shape[1:]) ** 0.5
        elif ".norms." in name or "norm" in name.split(".")[-2] or ".gn." in name:
            values = 1 + 0.2 * values if name.endswith("weight") else 0.2 * values
        else:
            values = 0.3 * values
        state_dict[name] = values
    return state_dict


def _targets(target: str | tuple) -> tuple[str, ...]:
    return target if isinstance(target, tuple) else (target,)


@pytest.mark.parametrize("linked", [True, False])
def test_every_official_tensor_lands_where_the_table_says(tmp_path, linked):
    state_dict = synthetic_checkpoint(linked)
    torch.save({"meta": {}, "state_dict": state_dict}, tmp_path / "iter_40000.pth")
    base = tiny_mask2former()
    mapping = map_official_checkpoint(tmp_path / "iter_40000.pth", base)
    peft_model = convert_official_checkpoint(tmp_path / "iter_40000.pth", base)
    # the decoder as the adapter holds (and saves) it: the modules_to_save copies; the backbone as the model has it
    saved = {
        key.removeprefix("base_model.model."): value for key, value in get_peft_model_state_dict(peft_model).items()
    }
    model_state = {**base.state_dict(), **saved}
    adapter = {name: param for name, param in peft_model.named_parameters() if "rein_query_feat" in name}
    landed = set()
    for name, _, target in official_head_table(linked) + official_backbone_table():
        official = state_dict[name]
        if _targets(target)[0].startswith("rein_query_feat"):  # a copied value: bit-equal
            (value,) = [param for key, param in adapter.items() if key.endswith(target.split(".")[-1])]
            assert torch.equal(value, official)
        else:
            parts = official.tensor_split(len(_targets(target)))
            for key, part in zip(_targets(target), parts, strict=True):
                assert torch.equal(model_state[key], part), key
                landed.add(key)
    # every tensor is accounted for exactly once, none left over
    assert set(mapping.model_tensors) == landed
    assert not mapping.unused
    rein = {f"backbone.reins.{name}" for name in mapping.rein_tensors}
    assert rein == set(official_rein_tensors(linked))
    # and every tensor of the model's head and backbone got one, except the query tables Rein replaces when linked
    head_and_backbone = {
        key
        for key in tiny_mask2former().state_dict()
        if key.startswith((PD, "model.transformer_module", "class_predictor", DINO))
    }
    replaced = {"model.transformer_module.queries_embedder.weight", "model.transformer_module.queries_features.weight"}
    assert head_and_backbone - landed == (replaced if linked else set())
    config = peft_model.peft_config["default"]
    assert config.link_token_to_query == linked
    assert sorted(config.modules_to_save) == sorted(
        ["model.pixel_level_module.decoder", "model.transformer_module", "class_predictor"]
    )


def tiny_official_config(backbone: tf.PretrainedConfig | str) -> tf.Mask2FormerConfig:
    """The official segmenter scaled down to this file's synthetic Rein-and-head checkpoint: one width `C`, the
    official count of decoder layers `DEC_LAYERS`."""
    return official_segmenter_config(
        backbone,
        CLASSES,
        hidden_dim=C,
        num_decoder_layers=DEC_LAYERS,
        encoder_layers=ENC_LAYERS,
        dim_feedforward=DEC_FFN,
        encoder_feedforward_dim=ENC_FFN,
        num_attention_heads=HEADS,
        num_queries=TOKENS,
        train_num_points=64,
    )


def test_a_checkpoint_maps_onto_the_segmenter_built_from_one_width_and_the_official_layer_count():
    """`official_segmenter_config(hidden_dim=C, num_decoder_layers=DEC_LAYERS)`, counted as mmdet counts, builds the
    head the checkpoint has: every tensor lands on the same key, with the same value, as on the plain
    `Mask2FormerConfig(decoder_layers=DEC_LAYERS + 1)`."""
    config = tiny_official_config(tiny_mask2former().config.backbone_config)
    assert config.decoder_layers == DEC_LAYERS + 1
    torch.manual_seed(0)
    mapping = map_official_checkpoint(synthetic_checkpoint(), tf.Mask2FormerForUniversalSegmentation(config))
    reference = map_official_checkpoint(synthetic_checkpoint(), tiny_mask2former())
    assert not mapping.unused and mapping.model_tensors.keys() == reference.model_tensors.keys()
    for key, value in reference.model_tensors.items():  # copies of the same checkpoint's tensors: bit-equal
        assert torch.equal(mapping.model_tensors[key], value), key
    assert mapping.rein_tensors.keys() == reference.rein_tensors.keys()


def test_unknown_and_ill_fitting_tensors_raise_naming_them():
    state_dict = synthetic_checkpoint()
    with pytest.raises(OfficialCheckpointError, match=r"decode_head\.conv_seg\.weight"):
        map_official_checkpoint({**state_dict, "decode_head.conv_seg.weight": torch.zeros(3, 3)}, tiny_mask2former())
    with pytest.raises(OfficialCheckpointError, match=r"auxiliary_head\.conv\.weight"):
        map_official_checkpoint({**state_dict, "auxiliary_head.conv.weight": torch.zeros(3, 3)}, tiny_mask2former())
    with pytest.raises(OfficialCheckpointError, match=r"decoder_layers=3"):
        map_official_checkpoint(state_dict, tiny_mask2former(decoder_layers=DEC_LAYERS + 2))
    with pytest.raises(OfficialCheckpointError, match=rf"num_labels={CLASSES}"):
        map_official_checkpoint(state_dict, tiny_mask2former(num_labels=CLASSES + 2))
    missing = {
        key: value for key, value in state_dict.items() if key != "decode_head.transformer_decoder.post_norm.bias"
    }
    with pytest.raises(
        OfficialCheckpointError, match=r"unset: \['model\.transformer_module\.decoder\.layernorm\.bias'\]"
    ):
        map_official_checkpoint(missing, tiny_mask2former())
    wrong = {**state_dict, "backbone.pos_embed": torch.zeros(1, 5, C)}
    with pytest.raises(OfficialCheckpointError, match=r"backbone\.pos_embed.*\[1, 5, 32\].*\[1, 17, 32\]"):
        map_official_checkpoint(wrong, tiny_mask2former())
    # a head that keeps its own content queries while Rein links the positional ones cannot be expressed
    kept = {**state_dict, "decode_head.query_feat.weight": torch.zeros(TOKENS, C)}
    with pytest.raises(OfficialCheckpointError, match="replace_query_feat=False"):
        map_official_checkpoint(kept, tiny_mask2former())


def test_the_preprocessor_constants_are_listed_as_unused():
    state_dict = {**synthetic_checkpoint(), "data_preprocessor.mean": torch.tensor([123.675, 116.28, 103.53])}
    mapping = map_official_checkpoint(state_dict, tiny_mask2former())
    assert list(mapping.unused) == ["data_preprocessor.mean"]
    assert "image processor" in mapping.unused["data_preprocessor.mean"]


def test_a_failed_conversion_leaves_the_model_unchanged():
    base = tiny_mask2former()
    before = {key: value.clone() for key, value in base.state_dict().items()}
    with pytest.raises(OfficialCheckpointError):  # refused while mapping, before anything is loaded
        convert_official_checkpoint({**synthetic_checkpoint(), "decode_head.conv_seg.weight": torch.zeros(1)}, base)
    assert all(torch.equal(before[key], value) for key, value in base.state_dict().items())
    # refused by Rein after the head's tensors went in: 7 queries for 6 tokens
    base = tiny_mask2former(num_queries=TOKENS + 1)
    before = {key: value.clone() for key, value in base.state_dict().items()}
    with pytest.raises(ValueError, match="num_queries|token_length"):
        convert_official_checkpoint(synthetic_checkpoint(), base)
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(before[key], value) for key, value in base.state_dict().items())


def test_a_bare_backbone_takes_reins_only_and_lists_the_rest_as_unused():
    state_dict = synthetic_checkpoint()
    backbone = tiny_mask2former().model.pixel_level_module.encoder
    mapping = map_official_checkpoint(state_dict, backbone)
    assert set(mapping.unused) == {key for key in state_dict if ".reins." not in key}
    assert all("Mask2FormerForUniversalSegmentation" in why for why in mapping.unused.values())
    assert not mapping.model_tensors and not mapping.adapter_tensors


# --- the computation: mmdet's ReinMask2FormerHead written out plainly, on the official tensors -------------------


def mmdet_sine_encoding(height: int, width: int, num_feats: int, offset: float = 0.0) -> torch.Tensor:
    """mmdet SinePositionalEncoding(num_feats, normalize=True) of an unpadded map: [2 num_feats, height, width]."""
    eps, scale, temperature = 1e-6, 2 * math.pi, 10000
    y = (torch.arange(1, height + 1, dtype=torch.float32) + offset) / (height + eps) * scale
    x = (torch.arange(1, width + 1, dtype=torch.float32) + offset) / (width + eps) * scale
    frequencies = temperature ** (2 * (torch.arange(num_feats) // 2) / num_feats)

    def channels(position: torch.Tensor) -> torch.Tensor:  # [n] -> [n, num_feats]: sin, cos, sin, cos, ...
        angles = position[:, None] / frequencies
        return torch.where(torch.arange(num_feats) % 2 == 0, angles.sin(), angles.cos())

    pos_y = channels(y)[:, None, :].expand(height, width, num_feats)
    pos_x = channels(x)[None, :, :].expand(height, width, num_feats)
    return torch.cat([pos_y, pos_x], -1).permute(2, 0, 1)


def test_sine_positional_encodings_agree():
    for height, width in [(4, 4), (8, 16), (32, 32)]:
        ours = Mask2FormerSinePositionEmbedding(num_position_features=64, normalize=True)(
            (1, 3, height, width), "cpu", torch.float32
        )[0]
        assert_same_numbers(ours, mmdet_sine_encoding(height, width, 64))
    # DETR's offset -0.5 variant (not the official config's) would differ by up to half a position step
    assert (mmdet_sine_encoding(8, 8, 64, offset=-0.5) - mmdet_sine_encoding(8, 8, 64)).abs().max() > 0.1


class MmdetHead:
    """ReinMask2FormerHead.forward (mmdet MSDeformAttnPixelDecoder + Mask2FormerTransformerDecoder), functional."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.sd = state_dict

    def linear(self, x, name):
        return x @ self.sd[f"{name}.weight"].T + self.sd[f"{name}.bias"]

    def layer_norm(self, x, name):
        return F.layer_norm(x, (x.shape[-1],), self.sd[f"{name}.weight"], self.sd[f"{name}.bias"])

    def conv_gn(self, x, name, padding=0):
        x = F.conv2d(x, self.sd[f"{name}.conv.weight"], self.sd.get(f"{name}.conv.bias"), padding=padding)
        return F.group_norm(x, GROUPS, self.sd[f"{name}.gn.weight"], self.sd[f"{name}.gn.bias"])

    def ffn(self, x, name):
        return self.linear(torch.relu(self.linear(x, f"{name}.layers.0.0")), f"{name}.layers.1")

    def deformable_attention(self, name, query, value, reference, shapes):
        """mmcv MultiScaleDeformableAttention without its residual: query [B, N, C], reference [B, N, levels, 2]."""
        batch, num_query, _ = query.shape
        head_dim = C // HEADS
        value = self.linear(value, f"{name}.value_proj").view(batch, -1, HEADS, head_dim)
        offsets = self.linear(query, f"{name}.sampling_offsets").view(batch, num_query, HEADS, LEVELS, POINTS, 2)
        weights = self.linear(query, f"{name}.attention_weights").view(batch, num_query, HEADS, LEVELS * POINTS)
        weights = weights.softmax(-1).view(batch, num_query, HEADS, LEVELS, POINTS)
        out, start = torch.zeros(batch, num_query, HEADS, head_dim), 0
        for level, (height, width) in enumerate(shapes):
            locations = reference[:, :, None, level, None, :] + offsets[:, :, :, level] / torch.tensor([width, height])
            level_value = value[:, start : start + height * width]  # [B, hw, heads, d]
            start += height * width
            for head in range(HEADS):
                grid = 2 * locations[:, :, head] - 1  # [B, N, points, 2] in [-1, 1]
                image = level_value[:, :, head].transpose(1, 2).reshape(batch, head_dim, height, width)
                sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                out[:, :, head] += (sampled * weights[:, None, :, head, level]).sum(-1).transpose(1, 2)
        return self.linear(out.flatten(2), f"{name}.output_proj")

    def pixel_decoder(self, feats):
        pd = "decode_head.pixel_decoder"
        batch, queries, positions, references, shapes = feats[0].shape[0], [], [], [], []
        for i in range(LEVELS):  # the lowest resolutions, low first
            feat = feats[len(feats) - 1 - i]
            height, width = feat.shape[-2:]
            queries.append(self.conv_gn(feat, f"{pd}.input_convs.{i}").flatten(2).transpose(1, 2))
            level = self.sd[f"{pd}.level_encoding.weight"][i]
            positions.append((mmdet_sine_encoding(height, width, C // 2) + level[:, None, None]).flatten(1).T)
            ys, xs = torch.meshgrid(
                (torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij"
            )
            references.append(torch.stack([xs.flatten(), ys.flatten()], -1))  # MlvlPointGenerator / (size * stride)
            shapes.append((height, width))
        query, position = torch.cat(queries, 1), torch.cat(positions)[None]
        reference = torch.cat(references)[None, :, None].expand(batch, -1, LEVELS, 2)
        for j in range(ENC_LAYERS):
            layer = f"{pd}.encoder.layers.{j}"
            query = self.layer_norm(
                query + self.deformable_attention(f"{layer}.self_attn", query + position, query, reference, shapes),
                f"{layer}.norms.0",
            )
            query = self.layer_norm(query + self.ffn(query, f"{layer}.ffn"), f"{layer}.norms.1")
        outs = [
            part.transpose(1, 2).reshape(batch, C, height, width)
            for part, (height, width) in zip(query.split([h * w for h, w in shapes], 1), shapes, strict=True)
        ]
        for i in range(len(feats) - LEVELS - 1, -1, -1):
            lateral = self.conv_gn(feats[i], f"{pd}.lateral_convs.{i}")
            y = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(torch.relu(self.conv_gn(y, f"{pd}.output_convs.{i}", padding=1)))
        mask_feature = F.conv2d(outs[-1], self.sd[f"{pd}.mask_feature.weight"], self.sd[f"{pd}.mask_feature.bias"])
        return mask_feature, outs[:LEVELS]

    def attention(self, name, query, key, value, mask=None):
        """nn.MultiheadAttention (mmcv MultiheadAttention without residual), batch first; `mask` True = blocked."""
        w, b = self.sd[f"{name}.in_proj_weight"].chunk(3), self.sd[f"{name}.in_proj_bias"].chunk(3)
        q, k, v = (x @ wi.T + bi for x, wi, bi in zip((query, key, value), w, b, strict=True))
        split = lambda x: x.view(x.shape[0], x.shape[1], HEADS, C // HEADS).transpose(1, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(C // HEADS)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        out = (scores.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)
        return self.linear(out, f"{name}.out_proj")

    def __call__(self, feats, queries):
        td = "decode_head.transformer_decoder"
        mask_feature, memories = self.pixel_decoder(feats)
        batch = feats[0].shape[0]
        keys = [
            m.flatten(2).transpose(1, 2) + self.sd["decode_head.level_embed.weight"][i] for i, m in enumerate(memories)
        ]
        key_positions = [mmdet_sine_encoding(*m.shape[-2:], C // 2).flatten(1).T[None] for m in memories]
        query_position = queries[None].expand(batch, -1, -1)
        query = self.linear(query_position, "decode_head.querys2feat")

        def predict(query, size):
            normed = self.layer_norm(query, f"{td}.post_norm")
            embedding = normed
            for k in (0, 2, 4):
                embedding = self.linear(embedding, f"decode_head.mask_embed.{k}")
                embedding = torch.relu(embedding) if k < 4 else embedding
            mask = torch.einsum("bqc,bchw->bqhw", embedding, mask_feature)
            blocked = F.interpolate(mask, size=size, mode="bilinear", align_corners=False).flatten(2).sigmoid() < 0.5
            return self.linear(normed, "decode_head.cls_embed"), mask, blocked[:, None]  # [B, 1 (heads), Q, hw]

        classes, mask, blocked = predict(query, memories[0].shape[-2:])
        for i in range(DEC_LAYERS):
            level, layer = i % LEVELS, f"{td}.layers.{i}"
            blocked = blocked & ~blocked.all(-1, keepdim=True)  # a query that would see nothing sees everything
            attended = self.attention(
                f"{layer}.cross_attn.attn",
                query + query_position,
                keys[level] + key_positions[level],
                keys[level],
                blocked,
            )
            query = self.layer_norm(query + attended, f"{layer}.norms.0")
            attended = self.attention(f"{layer}.self_attn.attn", query + query_position, query + query_position, query)
            query = self.layer_norm(query + attended, f"{layer}.norms.1")
            query = self.layer_norm(query + self.ffn(query, f"{layer}.ffn"), f"{layer}.norms.2")
            classes, mask, blocked = predict(query, memories[(i + 1) % LEVELS].shape[-2:])
        return classes, mask


def _official_pyramid(module, args, output):
    """The official DINOv2 feature pyramid (rein/models/backbones/dino_v2.py): the maps resized x4, x2, x1, x0.5."""
    maps = [
        F.interpolate(m, scale_factor=s, mode="bilinear", align_corners=False)
        for m, s in zip(output.feature_maps, (4, 2, 1, 0.5), strict=True)
    ]
    return BackboneOutput(feature_maps=tuple(maps))


def test_the_converted_model_computes_the_official_head():
    state_dict = synthetic_checkpoint(linked=True)
    peft_model = convert_official_checkpoint(state_dict, tiny_mask2former())
    captured = []
    backbone = peft_model.base_model.model.model.pixel_level_module.encoder
    backbone.register_forward_hook(_official_pyramid)  # levels of 16, 8, 4 and 2 px a side: level order matters
    backbone.register_forward_hook(lambda module, args, output: captured.append(output.feature_maps))
    pixel_values = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outputs = peft_model(pixel_values=pixel_values)
        classes, masks = MmdetHead(state_dict)(list(captured[0]), get_queries(peft_model))
    assert masks.shape == (2, TOKENS, 4 * IMAGE // PATCH, 4 * IMAGE // PATCH)
    assert_same_numbers(outputs.class_queries_logits, classes)
    assert_same_numbers(outputs.masks_queries_logits, masks)


def test_the_saved_adapter_carries_the_head(tmp_path):
    # a released checkpoint: Rein and the head, no DINOv2 weights (the base model brings its own)
    state_dict = synthetic_checkpoint(linked=True, backbone=False)
    converted = convert_official_checkpoint(state_dict, tiny_mask2former(), output_dir=tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_mask2former(), tmp_path / "adapter").eval()
    untouched = tiny_mask2former()  # the same seed: only the decoder's own initialisation
    pixel_values = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = converted(pixel_values=pixel_values)
        again = reloaded(pixel_values=pixel_values)
        assert (
            untouched(pixel_values=pixel_values).masks_queries_logits - expected.masks_queries_logits
        ).abs().max() > 1e-2
    assert_same_numbers(again.masks_queries_logits, expected.masks_queries_logits)
    assert_same_numbers(again.class_queries_logits, expected.class_queries_logits)


def official_dinov2_features(state_dict: dict[str, torch.Tensor], pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The official DinoVisionTransformer (facebookresearch/dinov2 blocks, LayerNorm eps 1e-6, no final norm on the
    features, positions at their own size): each block's patch tokens as [B, C, H/p, W/p]."""
    sd = {key.removeprefix("backbone."): value for key, value in state_dict.items() if ".reins." not in key}
    batch, side = pixel_values.shape[0], IMAGE // PATCH
    x = F.conv2d(pixel_values, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd["cls_token"].expand(batch, -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd["pos_embed"]
    features = []
    for i in range(BACKBONE_LAYERS):
        block = f"blocks.{i}"
        h = F.layer_norm(x, (C,), sd[f"{block}.norm1.weight"], sd[f"{block}.norm1.bias"], eps=1e-6)
        qkv = (h @ sd[f"{block}.attn.qkv.weight"].T + sd[f"{block}.attn.qkv.bias"]).view(batch, -1, 3, 2, C // 2)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, d]
        attended = ((q @ k.transpose(-1, -2)) * (C // 2) ** -0.5).softmax(-1) @ v
        attended = (
            attended.transpose(1, 2).flatten(2) @ sd[f"{block}.attn.proj.weight"].T + sd[f"{block}.attn.proj.bias"]
        )
        x = x + sd[f"{block}.ls1.gamma"] * attended
        h = F.layer_norm(x, (C,), sd[f"{block}.norm2.weight"], sd[f"{block}.norm2.bias"], eps=1e-6)
        h = F.gelu(h @ sd[f"{block}.mlp.fc1.weight"].T + sd[f"{block}.mlp.fc1.bias"])
        x = x + sd[f"{block}.ls2.gamma"] * (h @ sd[f"{block}.mlp.fc2.weight"].T + sd[f"{block}.mlp.fc2.bias"])
        features.append(x[:, 1:].transpose(1, 2).reshape(batch, C, side, side))
    return features


def test_the_converted_dinov2_computes_the_official_blocks():
    state_dict = synthetic_checkpoint()
    model = tiny_mask2former()
    load_official_model_tensors(model, map_official_checkpoint(state_dict, model))  # the base model alone, no Rein
    pixel_values = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model.model.pixel_level_module.encoder(pixel_values).feature_maps
        expected = official_dinov2_features(state_dict, pixel_values)
    for feature, reference in zip(ours, expected, strict=True):
        assert_same_numbers(feature, reference)
