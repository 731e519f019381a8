"""Convert a checkpoint of the official Rein code (w1oves/Rein) into a rein_peft adapter, and its Mask2Former head
and DINOv2 backbone into a transformers `Mask2FormerForUniversalSegmentation`.

The official segmentor is an mmseg `EncoderDecoder`: `backbone.reins.*` are Rein's tensors, `decode_head.*` the
`ReinMask2FormerHead` (mmdet's `Mask2FormerHead` with mmdet / mmcv module names), and `backbone.*` the DINOv2 weights
in the official DINOv2 repository's names (the released checkpoints leave them out; `docs/official-checkpoints.md`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import Mask2FormerForUniversalSegmentation

from ..tuners.rein.config import ReinConfig
from ..tuners.rein.model import _tensor_stem
from ..tuners.rein.utils import unchanged_on_failure
from ..utils.compat import peft_deprecations_silenced
from .safe_load import UnsafeCheckpointError, load_checkpoint

logger = logging.getLogger(__name__)

# official tensor name (after "reins.") -> rein_peft tensor name
OFFICIAL_TO_REIN_PEFT = {
    "learnable_tokens": "rein_tokens",
    "learnable_tokens_a": "rein_tokens_a",
    "learnable_tokens_b": "rein_tokens_b",
    "scale": "rein_scale",
    "mlp_token2feat.weight": "rein_token2feat.weight",
    "mlp_token2feat.bias": "rein_token2feat.bias",
    "mlp_delta_f.weight": "rein_delta_f.weight",
    "mlp_delta_f.bias": "rein_delta_f.bias",
    "transform.weight": "rein_transform.weight",
    "transform.bias": "rein_transform.bias",
    "merge.weight": "rein_merge.weight",
    "merge.bias": "rein_merge.bias",
}
OFFICIAL_MODULE_NAME = "reins"
# mmengine saves {"meta", "state_dict", "message_hub", "optimizer", "param_schedulers"}: the weights are here
MMENGINE_WEIGHTS = "state_dict"
OFFICIAL_HEAD_PREFIX = "decode_head."
OFFICIAL_BACKBONE_PREFIX = "backbone."
# mmseg's SegDataPreProcessor: the normalisation constants, if a checkpoint keeps them
OFFICIAL_PREPROCESSOR_PREFIX = "data_preprocessor."
# the official head's Linear(Q, Q) from Rein's linked queries to the content queries (`replace_query_feat=True`)
OFFICIAL_QUERY_FEAT = "querys2feat"
REIN_QUERY_FEAT = "rein_query_feat"

# Name rules: (official name pattern, target). A target is a template formatted with the pattern's groups (`{i1}` is
# group `i` plus one), or a tuple of templates: the official tensor is split into that many equal chunks along dim 0
# (a fused q/k/v projection). Head targets are names in `Mask2FormerForUniversalSegmentation`; backbone targets are
# relative to the DINOv2 module found in the model. docs/official-checkpoints.md explains every rule.
PIXEL_DECODER = "model.pixel_level_module.decoder"
TRANSFORMER_DECODER = "model.transformer_module.decoder"
HEAD_RULES: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    # pixel decoder (mmdet MSDeformAttnPixelDecoder): input ConvModules (1x1 conv with bias + GroupNorm), low res first
    (
        r"pixel_decoder\.input_convs\.(?P<i>\d+)\.conv\.(?P<p>weight|bias)",
        PIXEL_DECODER + ".input_projections.{i}.0.{p}",
    ),
    (
        r"pixel_decoder\.input_convs\.(?P<i>\d+)\.gn\.(?P<p>weight|bias)",
        PIXEL_DECODER + ".input_projections.{i}.1.{p}",
    ),
    (r"pixel_decoder\.level_encoding\.weight", PIXEL_DECODER + ".level_embed"),
    (
        r"pixel_decoder\.encoder\.layers\.(?P<i>\d+)\.self_attn\."
        r"(?P<m>sampling_offsets|attention_weights|value_proj|output_proj)\.(?P<p>weight|bias)",
        PIXEL_DECODER + ".encoder.layers.{i}.self_attn.{m}.{p}",
    ),
    (
        r"pixel_decoder\.encoder\.layers\.(?P<i>\d+)\.ffn\.layers\.0\.0\.(?P<p>weight|bias)",
        PIXEL_DECODER + ".encoder.layers.{i}.fc1.{p}",
    ),
    (
        r"pixel_decoder\.encoder\.layers\.(?P<i>\d+)\.ffn\.layers\.1\.(?P<p>weight|bias)",
        PIXEL_DECODER + ".encoder.layers.{i}.fc2.{p}",
    ),
    (
        r"pixel_decoder\.encoder\.layers\.(?P<i>\d+)\.norms\.0\.(?P<p>weight|bias)",
        PIXEL_DECODER + ".encoder.layers.{i}.self_attn_layer_norm.{p}",
    ),
    (
        r"pixel_decoder\.encoder\.layers\.(?P<i>\d+)\.norms\.1\.(?P<p>weight|bias)",
        PIXEL_DECODER + ".encoder.layers.{i}.final_layer_norm.{p}",
    ),
    # FPN level(s) below the encoder's: mmdet applies lateral_convs[i] to feature i, transformers adapter_{i+1}
    (r"pixel_decoder\.lateral_convs\.(?P<i>\d+)\.conv\.weight", PIXEL_DECODER + ".adapter_{i1}.0.weight"),
    (r"pixel_decoder\.lateral_convs\.(?P<i>\d+)\.gn\.(?P<p>weight|bias)", PIXEL_DECODER + ".adapter_{i1}.1.{p}"),
    (r"pixel_decoder\.output_convs\.(?P<i>\d+)\.conv\.weight", PIXEL_DECODER + ".layer_{i1}.0.weight"),
    (r"pixel_decoder\.output_convs\.(?P<i>\d+)\.gn\.(?P<p>weight|bias)", PIXEL_DECODER + ".layer_{i1}.1.{p}"),
    (r"pixel_decoder\.mask_feature\.(?P<p>weight|bias)", PIXEL_DECODER + ".mask_projection.{p}"),
    # transformer decoder (mmdet Mask2FormerTransformerDecoder): cross-attention, norm, self-attention, norm, FFN, norm
    (
        r"transformer_decoder\.layers\.(?P<i>\d+)\.self_attn\.attn\.in_proj_(?P<p>weight|bias)",
        tuple(TRANSFORMER_DECODER + ".layers.{i}.self_attn." + proj + "_proj.{p}" for proj in ("q", "k", "v")),
    ),
    (
        r"transformer_decoder\.layers\.(?P<i>\d+)\.self_attn\.attn\.out_proj\.(?P<p>weight|bias)",
        TRANSFORMER_DECODER + ".layers.{i}.self_attn.out_proj.{p}",
    ),
    (
        r"transformer_decoder\.layers\.(?P<i>\d+)\.cross_attn\.attn\.(?P<p>in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
        TRANSFORMER_DECODER + ".layers.{i}.cross_attn.{p}",
    ),
    (
        r"transformer_decoder\.layers\.(?P<i>\d+)\.ffn\.layers\.0\.0\.(?P<p>weight|bias)",
        TRANSFORMER_DECODER + ".layers.{i}.fc1.{p}",
    ),
    (
        r"transformer_decoder\.layers\.(?P<i>\d+)\.ffn\.layers\.1\.(?P<p>weight|bias)",
        TRANSFORMER_DECODER + ".layers.{i}.fc2.{p}",
    ),
    (
        r"transformer_decoder\.layers\.(?P<i>\d+)\.norms\.0\.(?P<p>weight|bias)",
        TRANSFORMER_DECODER + ".layers.{i}.cross_attn_layer_norm.{p}",
    ),
    (
        r"transformer_decoder\.layers\.(?P<i>\d+)\.norms\.1\.(?P<p>weight|bias)",
        TRANSFORMER_DECODER + ".layers.{i}.self_attn_layer_norm.{p}",
    ),
    (
        r"transformer_decoder\.layers\.(?P<i>\d+)\.norms\.2\.(?P<p>weight|bias)",
        TRANSFORMER_DECODER + ".layers.{i}.final_layer_norm.{p}",
    ),
    (r"transformer_decoder\.post_norm\.(?P<p>weight|bias)", TRANSFORMER_DECODER + ".layernorm.{p}"),
    # the head around the decoder
    (r"decoder_input_projs\.(?P<i>\d+)\.(?P<p>weight|bias)", "model.transformer_module.input_projections.{i}.{p}"),
    (r"level_embed\.weight", "model.transformer_module.level_embed.weight"),
    (r"query_embed\.weight", "model.transformer_module.queries_embedder.weight"),
    (r"query_feat\.weight", "model.transformer_module.queries_features.weight"),
    (r"cls_embed\.(?P<p>weight|bias)", "class_predictor.{p}"),
    (r"mask_embed\.0\.(?P<p>weight|bias)", TRANSFORMER_DECODER + ".mask_predictor.mask_embedder.0.0.{p}"),
    (r"mask_embed\.2\.(?P<p>weight|bias)", TRANSFORMER_DECODER + ".mask_predictor.mask_embedder.1.0.{p}"),
    (r"mask_embed\.4\.(?P<p>weight|bias)", TRANSFORMER_DECODER + ".mask_predictor.mask_embedder.2.0.{p}"),
)
# the official DINOv2 (facebookresearch/dinov2 `DinoVisionTransformer`) -> transformers' Dinov2 modules
BACKBONE_RULES: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    (r"cls_token", "embeddings.cls_token"),
    (r"mask_token", "embeddings.mask_token"),
    (r"pos_embed", "embeddings.position_embeddings"),
    (r"register_tokens", "embeddings.register_tokens"),  # DINOv2 with registers (dinov2_vit*14_reg4)
    (r"patch_embed\.proj\.(?P<p>weight|bias)", "embeddings.patch_embeddings.projection.{p}"),
    (r"blocks\.(?P<i>\d+)\.(?P<m>norm1|norm2)\.(?P<p>weight|bias)", "encoder.layer.{i}.{m}.{p}"),
    (
        r"blocks\.(?P<i>\d+)\.attn\.qkv\.(?P<p>weight|bias)",
        tuple("encoder.layer.{i}.attention." + proj + "_proj.{p}" for proj in ("q", "k", "v")),
    ),
    (r"blocks\.(?P<i>\d+)\.attn\.proj\.(?P<p>weight|bias)", "encoder.layer.{i}.attention.o_proj.{p}"),
    (r"blocks\.(?P<i>\d+)\.ls1\.gamma", "encoder.layer.{i}.layer_scale1.lambda1"),
    (r"blocks\.(?P<i>\d+)\.ls2\.gamma", "encoder.layer.{i}.layer_scale2.lambda1"),
    (r"blocks\.(?P<i>\d+)\.mlp\.(?P<m>fc1|fc2)\.(?P<p>weight|bias)", "encoder.layer.{i}.mlp.{m}.{p}"),
    # SwiGLU feed-forward (DINOv2-g): w12 holds the gate and up projections, chunked in that order
    (
        r"blocks\.(?P<i>\d+)\.mlp\.w12\.(?P<p>weight|bias)",
        ("encoder.layer.{i}.mlp.gate_proj.{p}", "encoder.layer.{i}.mlp.up_proj.{p}"),
    ),
    (r"blocks\.(?P<i>\d+)\.mlp\.w3\.(?P<p>weight|bias)", "encoder.layer.{i}.mlp.down_proj.{p}"),
    (r"norm\.(?P<p>weight|bias)", "layernorm.{p}"),
)
# a key of the DINOv2 module that locates it inside any model (a Mask2Former's backbone, a wrapper around it)
DINOV2_ANCHOR = "embeddings.patch_embeddings.projection.weight"
# what to train and save beside the adapter when a whole checkpoint is converted (as README's segmentation section)
MASK2FORMER_DECODER_MODULES = ["model.pixel_level_module.decoder", "model.transformer_module", "class_predictor"]
MASK2FORMER_HEAD_PREFIXES = ("model.pixel_level_module.decoder.", "model.transformer_module.", "class_predictor.")
MASK2FORMER_QUERY_TABLES = (
    "model.transformer_module.queries_embedder.weight",
    "model.transformer_module.queries_features.weight",
)


class OfficialCheckpointError(ValueError):
    """An official checkpoint does not fit the model it is converted into."""


@dataclass
class OfficialCheckpointMapping:
    """Where every tensor of an official checkpoint goes.

    Attributes:
        rein_tensors: The `Reins` module's tensors by official name (`learnable_tokens`, `scale`, ...).
        adapter_tensors: Further adapter tensors by rein_peft name: the head's `querys2feat` as `rein_query_feat`.
        model_tensors: Tensors for the base model, by its state-dict keys (the head and the DINOv2 backbone).
        unused: Official keys that go nowhere -> why.
    """

    rein_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    adapter_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    model_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)


def _compile(rules: tuple[tuple[str, str | tuple[str, ...]], ...]) -> tuple[tuple[re.Pattern, tuple[str, ...]], ...]:
    return tuple(
        (re.compile(pattern), target if isinstance(target, tuple) else (target,)) for pattern, target in rules
    )


_HEAD_RULES, _BACKBONE_RULES = _compile(HEAD_RULES), _compile(BACKBONE_RULES)
_DECODER_LAYER = re.compile(r"transformer_decoder\.layers\.(\d+)\.")
_ENCODER_LAYER = re.compile(r"pixel_decoder\.encoder\.layers\.(\d+)\.")


def _rename(name: str, rules: tuple[tuple[re.Pattern, tuple[str, ...]], ...]) -> list[str] | None:
    """The target name(s) of an official tensor name, or `None` if no rule knows it."""
    for pattern, templates in rules:
        match = pattern.fullmatch(name)
        if match is not None:
            groups = match.groupdict()
            if "i" in groups:
                groups["i1"] = str(int(groups["i"]) + 1)
            return [template.format(**groups) for template in templates]
    return None


def read_checkpoint(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a state dict, a `.safetensors` file, or a `.pth` file read safely.

    A `.pth` file is read by `safe_load.load_checkpoint`: `weights_only=True`, nothing it names imported or
    called, mmengine's `meta` / `message_hub` / optimizer state loaded as inert data and dropped. mmengine keeps the
    weights under "state_dict"; a plain state dict is taken as it is.

    Raises:
        OfficialCheckpointError: The file cannot be read safely (it would run code when loaded), or its state dict
            holds something other than tensors.
    """
    if isinstance(checkpoint, Mapping):
        state_dict = checkpoint
    elif str(checkpoint).endswith(".safetensors"):
        state_dict = load_file(os.fspath(checkpoint))
    else:
        try:
            state_dict = load_checkpoint(checkpoint)
        except UnsafeCheckpointError as error:
            raise OfficialCheckpointError(
                f"'{os.fspath(checkpoint)}' was not loaded: {error}. rein_peft reads checkpoints with PyTorch's "
                "weights_only unpickler and never runs code from a file; a released Rein checkpoint holds tensors, "
                "numbers and mmengine's bookkeeping only. Get the file from its official source."
            ) from None
    if isinstance(state_dict, Mapping) and MMENGINE_WEIGHTS in state_dict:
        state_dict = state_dict[MMENGINE_WEIGHTS]
    if not isinstance(state_dict, Mapping):
        raise OfficialCheckpointError(
            f"The checkpoint holds a {type(state_dict).__name__}, not a state dict (a mapping of names to tensors, "
            f"or mmengine's dict with the weights under '{MMENGINE_WEIGHTS}')."
        )
    others = {key: type(value).__name__ for key, value in state_dict.items() if not isinstance(value, torch.Tensor)}
    if others:
        raise OfficialCheckpointError(
            f"The checkpoint's state dict holds {len(others)} value(s) that are not tensors: "
            f"{dict(list(others.items())[:10])}. Every entry of a state dict must be a tensor"
            + (
                "; Rein's `scale` is the 0-dim tensor the official code saves: pass torch.tensor(value)."
                if any(key.split(".")[-1] == "scale" for key in others)
                else "."
            )
        )
    return dict(state_dict)


def _check_rein_tensors(tensors: Mapping[str, torch.Tensor], keys: Mapping[str, str]) -> None:
    """Check the official Rein tensors (by official name; `keys` gives each one's key in the checkpoint) against the
    shapes the official `Reins` / `LoRAReins` modules save, before any of them is used.

    Raises:
        OfficialCheckpointError: Naming the official key, the shape it should have and what to do.
    """
    problems = []

    prefix = next((full_key[: -len(name)] for name, full_key in keys.items()), "")  # "backbone.reins." or ""

    def key(name: str) -> str:
        return keys.get(name, prefix + name)

    low_rank = "learnable_tokens_a" in tensors or "learnable_tokens_b" in tensors
    token_names = ("learnable_tokens_a", "learnable_tokens_b") if low_rank else ("learnable_tokens",)
    for name in token_names:
        if name not in tensors:
            problems.append(
                f"'{key(name)}' is missing: the official Reins saves 'learnable_tokens' [layers, tokens, width], "
                "LoRAReins 'learnable_tokens_a' [layers, tokens, rank] and 'learnable_tokens_b' [layers, rank, width]"
            )
    # every shape as a pattern of sizes: names stand for sizes that must agree across tensors
    expected = {
        "learnable_tokens": ("layers", "tokens", "width"),
        "learnable_tokens_a": ("layers", "tokens", "rank"),
        "learnable_tokens_b": ("layers", "rank", "width"),
        "scale": (),
        "mlp_token2feat.weight": ("width", "width"),
        "mlp_token2feat.bias": ("width",),
        "mlp_delta_f.weight": ("width", "width"),
        "mlp_delta_f.bias": ("width",),
        "transform.weight": ("queries", "width"),
        "transform.bias": ("queries",),
        "merge.weight": ("queries", "3 * queries"),
        "merge.bias": ("queries",),
    }
    sizes: dict[str, int] = {}
    for name, pattern in expected.items():
        if name not in tensors:
            continue
        tensor = tensors[name]
        shape = list(tensor.shape)
        if name == "scale" and shape == [1]:  # rein_peft's own form of the 0-dim parameter
            shape = []
        if not tensor.is_floating_point():
            problems.append(f"'{key(name)}' holds {tensor.dtype} values; Rein's tensors are floating point")
        if len(shape) != len(pattern):
            problems.append(
                f"'{key(name)}' has shape {shape}, expected {list(pattern)}"
                + (" (0-dim: the official Reins' one learned scale)" if name == "scale" else "")
            )
            continue
        for size, symbol in zip(shape, pattern, strict=True):
            factor, base = (3, symbol.removeprefix("3 * ")) if symbol.startswith("3 * ") else (1, symbol)
            if base not in sizes and size % factor == 0:
                sizes[base] = size // factor
            if size != factor * sizes.get(base, -1):
                agreed = ", ".join(f"{symbol}={value}" for symbol, value in sizes.items())
                problems.append(
                    f"'{key(name)}' has shape {shape}, expected {list(pattern)} with {agreed} as the other Rein "
                    "tensors say"
                )
                break
    linked = {name for name in ("transform.weight", "transform.bias", "merge.weight", "merge.bias") if name in tensors}
    if linked and len(linked) != 4:
        problems.append(
            f"query linking needs 'transform.weight', 'transform.bias', 'merge.weight' and 'merge.bias', the "
            f"checkpoint has only {sorted(linked)}"
        )
    if problems:
        raise OfficialCheckpointError(
            "The official Rein tensors are not what the official Reins / LoRAReins save: "
            + "; ".join(problems)
            + ". Pass the checkpoint as the official code wrote it (its `state_dict`), unchanged."
        )


def _dinov2_prefix(model_state: Mapping[str, torch.Tensor]) -> str | None:
    """Where the DINOv2 modules sit in a model's state dict ("model.pixel_level_module.encoder." in a Mask2Former)."""
    prefixes = [key[: -len(DINOV2_ANCHOR)] for key in model_state if key.endswith(DINOV2_ANCHOR)]
    return prefixes[0] if len(prefixes) == 1 else None


def _head_config_problems(head: Mapping[str, torch.Tensor], config: Any) -> list[str]:
    """Sizes of the official head that the transformers config must repeat, said as the config fields to set."""
    problems = []
    decoder_layers = {int(m.group(1)) for name in head if (m := _DECODER_LAYER.match(name))}
    if decoder_layers and len(decoder_layers) != config.decoder_layers - 1:
        problems.append(
            f"the checkpoint's transformer decoder has {len(decoder_layers)} layers and the model's "
            f"{config.decoder_layers - 1}: build it with Mask2FormerConfig(decoder_layers={len(decoder_layers) + 1}) "
            "(transformers counts the prediction before the first layer as a layer)"
        )
    encoder_layers = {int(m.group(1)) for name in head if (m := _ENCODER_LAYER.match(name))}
    if encoder_layers and len(encoder_layers) != config.encoder_layers:
        problems.append(
            f"the checkpoint's pixel decoder has {len(encoder_layers)} deformable-attention layers and the model's "
            f"{config.encoder_layers}: set Mask2FormerConfig(encoder_layers={len(encoder_layers)})"
        )
    if "cls_embed.weight" in head and head["cls_embed.weight"].shape[0] - 1 != config.num_labels:
        num_labels = head["cls_embed.weight"].shape[0] - 1
        problems.append(
            f"the checkpoint classifies {num_labels} classes (+ no-object) and the model {config.num_labels}: set "
            f"Mask2FormerConfig(num_labels={num_labels})"
        )
    return problems


def place_tensor(
    official_key: str,
    tensor: torch.Tensor,
    targets: list[str],
    model_state: Mapping[str, torch.Tensor],
    placed: dict[str, torch.Tensor],
    problems: list[str],
) -> None:
    """Put `tensor` (split into `len(targets)` equal chunks along dim 0: a fused q/k/v projection) into `placed`
    under the model's `targets`, or say in `problems` why a chunk does not fit the model."""
    for target, chunk in zip(targets, tensor.tensor_split(len(targets)), strict=True):
        if target not in model_state:
            problems.append(f"'{official_key}' goes to '{target}', which the model does not have")
        elif model_state[target].shape != chunk.shape:
            problems.append(
                f"'{official_key}' gives '{target}' shape {list(chunk.shape)}, the model's is "
                f"{list(model_state[target].shape)}"
            )
        else:
            placed[target] = chunk


def map_official_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor], base_model: nn.Module
) -> OfficialCheckpointMapping:
    """Say where every tensor of an official Rein checkpoint goes in `base_model`, without changing it.

    With a `Mask2FormerForUniversalSegmentation` base model the whole segmentor maps: `backbone.reins.*` to the
    adapter, `decode_head.*` (mmdet's Mask2Former head, names as in docs/official-checkpoints.md) to the model's
    pixel decoder, transformer decoder and class predictor, the head's `querys2feat` to the adapter's
    `rein_query_feat`, and `backbone.*` DINOv2 weights, if the checkpoint has them, to the model's DINOv2. Any other
    base model takes the Rein tensors only and the rest is listed as unused.

    Args:
        checkpoint: Path of an official checkpoint or a state dict, as for `convert_official_checkpoint`.
        base_model: The transformers model the checkpoint is converted into.

    Returns:
        An `OfficialCheckpointMapping`: every tensor of the checkpoint is in exactly one of its tables.

    Raises:
        OfficialCheckpointError: For a file that cannot be read safely, Rein tensors missing or not shaped as the
            official code saves them (named by their official keys), tensors no rule knows, shapes or sizes the model
            does not share (naming the config field to set), or model tensors of the head or backbone that the
            checkpoint leaves unset.
    """
    state_dict = read_checkpoint(checkpoint)
    mapping = OfficialCheckpointMapping()
    whole = isinstance(base_model, Mask2FormerForUniversalSegmentation)
    model_state = base_model.state_dict()
    dinov2_prefix = _dinov2_prefix(model_state)
    head, backbone, unknown, problems, rein_keys = {}, {}, [], [], {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if OFFICIAL_MODULE_NAME in parts:  # a whole segmentor: "backbone.reins.learnable_tokens"
            official_name = ".".join(parts[parts.index(OFFICIAL_MODULE_NAME) + 1 :])
            if official_name not in OFFICIAL_TO_REIN_PEFT:
                raise OfficialCheckpointError(f"Unknown Rein tensor '{key}' in the official checkpoint.")
            mapping.rein_tensors[official_name] = tensor
            rein_keys[official_name] = key
        elif key in OFFICIAL_TO_REIN_PEFT:  # the Reins module's own state dict
            mapping.rein_tensors[key] = tensor
            rein_keys[key] = key
        elif not whole:
            mapping.unused[key] = (
                f"{type(base_model).__name__} takes Rein's tensors only; convert into a "
                "Mask2FormerForUniversalSegmentation to use the decode head and the backbone too"
            )
        elif key.startswith(OFFICIAL_PREPROCESSOR_PREFIX):
            mapping.unused[key] = "normalisation constants (ImageNet mean/std of 0-255 RGB): the image processor's job"
        elif key.startswith(OFFICIAL_HEAD_PREFIX):
            head[key[len(OFFICIAL_HEAD_PREFIX) :]] = tensor
        elif key.startswith(OFFICIAL_BACKBONE_PREFIX):
            backbone[key[len(OFFICIAL_BACKBONE_PREFIX) :]] = tensor
        else:
            unknown.append(key)
    if not mapping.rein_tensors:
        raise OfficialCheckpointError(
            f"The checkpoint has no '{OFFICIAL_MODULE_NAME}.*' tensors; is it a checkpoint of the official Rein code?"
        )
    _check_rein_tensors(mapping.rein_tensors, rein_keys)
    linked = "transform.weight" in mapping.rein_tensors
    if linked and "query_feat.weight" in head:
        raise OfficialCheckpointError(
            "The checkpoint's head keeps its own content queries (`decode_head.query_feat`, ReinMask2FormerHead with "
            "replace_query_feat=False) while Rein links the positional ones. rein_peft's query linking replaces both "
            "of Mask2Former's query tables (content = rein_query_feat(queries)), so it cannot run this head."
        )
    problems += _head_config_problems(head, base_model.config) if whole else []

    for name, tensor in head.items():
        key = OFFICIAL_HEAD_PREFIX + name
        if name.startswith(f"{OFFICIAL_QUERY_FEAT}."):
            mapping.adapter_tensors[REIN_QUERY_FEAT + name[len(OFFICIAL_QUERY_FEAT) :]] = tensor
        elif linked and name == "query_embed.weight":
            mapping.unused[key] = "Rein's linked queries are the positional queries"
        elif (targets := _rename(name, _HEAD_RULES)) is None:
            unknown.append(key)
        else:
            place_tensor(key, tensor, targets, model_state, mapping.model_tensors, problems)
    for name, tensor in backbone.items():
        key = OFFICIAL_BACKBONE_PREFIX + name
        if (targets := _rename(name, _BACKBONE_RULES)) is None:
            unknown.append(key)
        elif dinov2_prefix is None:
            problems.append(f"'{key}' is a DINOv2 weight, but the model has no (single) DINOv2 backbone")
        else:
            targets = [dinov2_prefix + target for target in targets]
            place_tensor(key, tensor, targets, model_state, mapping.model_tensors, problems)
    if unknown:
        raise OfficialCheckpointError(
            f"The checkpoint holds {len(unknown)} tensor(s) that no rule maps: {unknown[:20]}. rein_peft converts the "
            "official Rein segmentor (backbone.reins.*, a ReinMask2FormerHead or Mask2FormerHead as decode_head.*, "
            "DINOv2 weights as backbone.*); see docs/official-checkpoints.md for every name it knows."
        )
    required = []
    if head:
        skipped = MASK2FORMER_QUERY_TABLES if linked else ()
        required += [key for key in model_state if key.startswith(MASK2FORMER_HEAD_PREFIXES) and key not in skipped]
    if backbone and dinov2_prefix is not None:
        required += [key for key in model_state if key.startswith(dinov2_prefix)]
    missing = [key for key in required if key not in mapping.model_tensors]
    if missing:
        problems.append(f"the checkpoint leaves {len(missing)} model tensor(s) unset: {missing[:20]}")
    if problems:
        raise OfficialCheckpointError(
            f"The official checkpoint does not fit this {type(base_model).__name__}: " + "; ".join(problems) + "."
        )
    return mapping


def load_official_model_tensors(base_model: nn.Module, mapping: OfficialCheckpointMapping) -> None:
    """Put the head and backbone tensors of `mapping` into `base_model` (before it is wrapped, so that the copies
    `modules_to_save` makes start from them), and log what the checkpoint holds that goes nowhere."""
    if mapping.unused:
        first_key, why = next(iter(mapping.unused.items()))
        logger.warning(
            "%d tensor(s) of the official checkpoint are not used, e.g. '%s': %s",
            len(mapping.unused),
            first_key,
            why,
        )
    if not mapping.model_tensors:
        return
    model_state = base_model.state_dict()
    # new tensors in the model's dtype and device, assigned rather than copied into the old ones, so that
    # `unchanged_on_failure` can put the old ones back; `requires_grad` stays the model's
    tensors = {
        key: tensor.to(device=model_state[key].device, dtype=model_state[key].dtype, copy=True)
        for key, tensor in mapping.model_tensors.items()
    }
    incompatible = base_model.load_state_dict(tensors, strict=False, assign=True)
    if incompatible.unexpected_keys:  # map_official_checkpoint checked every key against this model
        raise OfficialCheckpointError(f"The model has no {incompatible.unexpected_keys[:20]}.")


def config_from_official(tensors: Mapping[str, torch.Tensor], **config_kwargs: Any) -> ReinConfig:
    """The `ReinConfig` that an official checkpoint's tensors imply; `config_kwargs` add to or override it
    (`use_softmax` cannot be read from the tensors)."""
    low_rank = "learnable_tokens_a" in tensors
    tokens = tensors["learnable_tokens_a" if low_rank else "learnable_tokens"]  # [L, M, r] or [L, M, C]
    inferred = {
        "token_length": tokens.shape[1],
        "lora_dim": tokens.shape[2] if low_rank else None,
        # the official zero_mlp_delta_f variant replaces the scale parameter with the constant 1.0
        "zero_mlp_delta_f": "scale" not in tensors,
        "link_token_to_query": "transform.weight" in tensors,
    }
    if "transform.weight" in tensors:
        inferred["query_dims"] = tensors["transform.weight"].shape[0]
    return ReinConfig(**{**inferred, **config_kwargs})


def convert_official_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    base_model: nn.Module,
    output_dir: str | os.PathLike | None = None,
    adapter_name: str = "default",
    **config_kwargs: Any,
) -> PeftModel:
    """Turn an official Rein checkpoint into a rein_peft adapter on `base_model`; into a
    `Mask2FormerForUniversalSegmentation`, its decode head (and DINOv2 weights, if it has them) too.

    Args:
        checkpoint: Path of an official checkpoint (`.pth` as mmengine writes it, read safely by `read_checkpoint`:
            nothing in it is imported or run; or `.safetensors`), or a state dict: the
            segmentor's (`backbone.reins.*`, `decode_head.*`, `backbone.*` keys) or the `Reins` module's own
            (`learnable_tokens`, `scale`, ...). Full-rank (`Reins`) and low-rank (`LoRAReins`) tokens, with or
            without `transform` / `merge`.
        base_model: The transformers model the checkpoint was trained on, wrapped in place. A backbone (for the
            official DINOv2-L checkpoints a `Dinov2Model` or `Dinov2Backbone` with patch size 16) takes Rein's
            tensors only. A `Mask2FormerForUniversalSegmentation` sized as the official head (see
            docs/official-checkpoints.md) also takes the head, which then trains and saves with the adapter as
            `modules_to_save` (`MASK2FORMER_DECODER_MODULES`, unless `config_kwargs` name others).
        output_dir: If given, the adapter is also saved there with `save_pretrained`.
        adapter_name: Name of the adapter in the returned `PeftModel`.
        config_kwargs: Extra `ReinConfig` fields, e.g. `use_softmax=False` or `modules_to_save`.

    Returns:
        The `PeftModel` carrying the converted adapter. The 0-dim official `scale` becomes shape `[1]`.

    Raises:
        OfficialCheckpointError: See `map_official_checkpoint`. On this or any other error (e.g. a decoder whose
            query count is not the token length) `base_model` is left as it was.
    """
    mapping = map_official_checkpoint(checkpoint, base_model)
    if any(key.startswith(MASK2FORMER_HEAD_PREFIXES) for key in mapping.model_tensors):
        config_kwargs.setdefault("modules_to_save", list(MASK2FORMER_DECODER_MODULES))
    config = config_from_official(mapping.rein_tensors, **config_kwargs)
    # a checkpoint that does not fit leaves `base_model` as it was (the head's tensors are assigned, not copied into)
    with unchanged_on_failure(base_model):
        load_official_model_tensors(base_model, mapping)
        with peft_deprecations_silenced():
            peft_model = get_peft_model(base_model, config, adapter_name=adapter_name)
        # PEFT loads modules_to_save from the same state dict: keep their values (copied from the loaded head)
        adapter_state_dict = {
            key: tensor
            for key, tensor in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()
            if _tensor_stem(key) is None
        }
        for name, tensor in mapping.rein_tensors.items():
            adapter_state_dict[OFFICIAL_TO_REIN_PEFT[name]] = tensor.reshape(1) if name == "scale" else tensor
        adapter_state_dict |= mapping.adapter_tensors
        set_peft_model_state_dict(peft_model, adapter_state_dict, adapter_name=adapter_name)
    if output_dir is not None:
        peft_model.save_pretrained(output_dir, selected_adapters=[adapter_name])
    return peft_model
