"""Official DINOv2 weights into a transformers DINOv2 folder, without the Hub.

The official Rein recipe starts from facebookresearch/dinov2's `dinov2_vitl14_pretrain.pth` (a `DinoVisionTransformer`
state dict: `patch_embed.proj`, `blocks.N.attn.qkv`, `blocks.N.ls1.gamma`, `pos_embed`, `cls_token`, ...) and the
official `tools/convert_models/convert_dinov2_large_512x512.py` resizes it to patch 16 and a 32x32 position grid.
Either file converts
with `convert_dinov2_checkpoint` (on the command line: `python -m rein_peft.convert_dinov2`), which writes
`config.json` and `model.safetensors`, from which `rein_peft.build_official_segmenter` (and
`Dinov2Model.from_pretrained`) load it. The sizes come from the tensors; the tensor names follow
`rein_peft.official.convert.BACKBONE_RULES` (docs/official-checkpoints.md lists them).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from .convert import (
    _BACKBONE_RULES,
    OFFICIAL_BACKBONE_PREFIX,
    OFFICIAL_MODULE_NAME,
    OfficialCheckpointError,
    _rename,
    read_checkpoint,
)
from .pyramid import resize_patch_embedding
from .segmenter import OFFICIAL_BACKBONE

# every official DINOv2 (ViT-S/14 384 wide, B 768, L 1024, g 1536) has attention heads 64 wide
OFFICIAL_HEAD_DIM = 64
# the official ViT's LayerNorm: partial(nn.LayerNorm, eps=1e-6)
OFFICIAL_LAYER_NORM_EPS = 1e-6
PATCH_WEIGHT, POSITIONS = "patch_embed.proj.weight", "pos_embed"
REGISTERS, MASK_TOKEN, SWIGLU_WEIGHT = "register_tokens", "mask_token", "blocks.0.mlp.w12.weight"
_BLOCK = re.compile(r"blocks\.(\d+)\.")
# the largest MLP ratio tried when a SwiGLU feed-forward's width is turned back into transformers' `mlp_ratio`
MAX_MLP_RATIO = 32


@dataclass
class Dinov2CheckpointMapping:
    """An official DINOv2 checkpoint read for transformers.

    Attributes:
        config: The transformers config its tensors imply (`Dinov2WithRegistersConfig` if it has register tokens).
        tensors: The model's tensors by transformers' names (`embeddings.cls_token`, `encoder.layer.0.attention.
            q_proj.weight`, ...); the fused `qkv` and SwiGLU `w12` projections split.
        unused: Checkpoint keys that go nowhere -> why (the rest of a whole segmentor's checkpoint).
    """

    config: Dinov2Config | Dinov2WithRegistersConfig
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)


def _swiglu_mlp_ratio(hidden_size: int, swiglu_width: int) -> int:
    """transformers' `mlp_ratio` whose SwiGLU width (two thirds of the MLP, rounded up to 8) is `swiglu_width`."""
    for ratio in range(1, MAX_MLP_RATIO + 1):
        if (int(hidden_size * ratio * 2 / 3) + 7) // 8 * 8 == swiglu_width:
            return ratio
    raise OfficialCheckpointError(
        f"The SwiGLU feed-forward is {swiglu_width} wide on a {hidden_size}-wide model, which no whole mlp_ratio "
        "gives in transformers' Dinov2SwiGLUFFN (width = ceil8(2/3 * ratio * hidden))."
    )


def _dinov2_config(state_dict: Mapping[str, torch.Tensor], num_attention_heads: int | None) -> Dinov2Config:
    """The transformers config of an official DINOv2 state dict (names without prefix), from its tensors' shapes."""
    for name in (PATCH_WEIGHT, POSITIONS, "blocks.0.norm1.weight"):
        if name not in state_dict:
            raise OfficialCheckpointError(
                f"The checkpoint has no '{name}': is it a DINOv2 of facebookresearch/dinov2 (a DinoVisionTransformer "
                f"state dict such as dinov2_vitl14_pretrain.pth)? It holds {sorted(state_dict)[:8]}..."
            )
    hidden_size, num_channels, patch_height, patch_width = state_dict[PATCH_WEIGHT].shape  # [C, 3, p, p]
    if patch_height != patch_width:
        raise OfficialCheckpointError(f"'{PATCH_WEIGHT}' has a {patch_height}x{patch_width} kernel, not a square one.")
    grid_cells = state_dict[POSITIONS].shape[1] - 1  # [1, 1 + g * g, C]: CLS, then the patch grid
    grid = math.isqrt(grid_cells)
    if grid * grid != grid_cells:
        raise OfficialCheckpointError(
            f"'{POSITIONS}' holds {grid_cells} patch positions, which is no square grid (DINOv2: one CLS position "
            "and a square grid, 37x37 for dinov2_vitl14, 32x32 after the official conversion to patch 16)."
        )
    blocks = sorted({int(match.group(1)) for key in state_dict if (match := _BLOCK.match(key))})
    if blocks != list(range(len(blocks))):
        raise OfficialCheckpointError(
            f"The checkpoint's blocks are numbered {blocks[:8]}..., not 0 to {len(blocks) - 1}; chunked blocks "
            "(`blocks.<chunk>.<i>`, a training checkpoint with block_chunks) are not supported: save the backbone "
            "with block_chunks=0, as the released files are."
        )
    if num_attention_heads is None:
        if hidden_size % OFFICIAL_HEAD_DIM:
            raise OfficialCheckpointError(
                f"The model is {hidden_size} wide, which is no multiple of the official head width "
                f"{OFFICIAL_HEAD_DIM}: pass num_attention_heads (--num-attention-heads) yourself."
            )
        num_attention_heads = hidden_size // OFFICIAL_HEAD_DIM
    if SWIGLU_WEIGHT in state_dict:  # SwiGLU (ViT-g): w12 [2 * width, C]
        use_swiglu_ffn, mlp_ratio = True, _swiglu_mlp_ratio(hidden_size, state_dict[SWIGLU_WEIGHT].shape[0] // 2)
    else:
        use_swiglu_ffn, mlp_width = False, state_dict["blocks.0.mlp.fc1.weight"].shape[0]
        mlp_ratio = mlp_width // hidden_size
        if mlp_ratio * hidden_size != mlp_width:
            raise OfficialCheckpointError(
                f"The MLP is {mlp_width} wide on a {hidden_size}-wide model; transformers' DINOv2 takes whole "
                "mlp_ratio values only."
            )
    sizes = {
        "hidden_size": hidden_size,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": num_attention_heads,
        "mlp_ratio": mlp_ratio,
        "use_swiglu_ffn": use_swiglu_ffn,
        "image_size": grid * patch_width,
        "patch_size": patch_width,
        "num_channels": num_channels,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "layer_norm_eps": OFFICIAL_LAYER_NORM_EPS,
        "use_mask_token": MASK_TOKEN in state_dict,
    }
    if REGISTERS in state_dict:  # [1, R, C]
        return Dinov2WithRegistersConfig(**sizes, num_register_tokens=state_dict[REGISTERS].shape[1])
    return Dinov2Config(**sizes)


def map_dinov2_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor], num_attention_heads: int | None = None
) -> Dinov2CheckpointMapping:
    """Read an official DINOv2 checkpoint and say where each tensor goes in transformers' DINOv2, changing nothing.

    Args:
        checkpoint: A `.pth` (read safely, as `convert_official_checkpoint` reads them) or `.safetensors` file, or a
            state dict: facebookresearch/dinov2's `DinoVisionTransformer` names, or a whole official segmentor's
            (`backbone.*` DINOv2 weights, the rest listed as unused).
        num_attention_heads: Heads per layer; default hidden size / 64, as in every official DINOv2.

    Returns:
        A `Dinov2CheckpointMapping`: the config, every tensor by its transformers name, and what goes nowhere.

    Raises:
        OfficialCheckpointError: For a file that cannot be read safely, tensors no rule knows, or shapes that do not
            make a DINOv2.
    """
    state_dict = read_checkpoint(checkpoint)
    unused = {}
    if OFFICIAL_BACKBONE_PREFIX + PATCH_WEIGHT in state_dict:  # a whole segmentor: keep its DINOv2
        backbone = {}
        for key, tensor in state_dict.items():
            if key.startswith(OFFICIAL_BACKBONE_PREFIX) and OFFICIAL_MODULE_NAME not in key.split("."):
                backbone[key[len(OFFICIAL_BACKBONE_PREFIX) :]] = tensor
            else:
                unused[key] = "not the DINOv2: convert the segmentor with rein_peft.convert_official_checkpoint"
        state_dict = backbone
    config = _dinov2_config(state_dict, num_attention_heads)
    tensors, unknown = {}, []
    for name, tensor in state_dict.items():
        if (targets := _rename(name, _BACKBONE_RULES)) is None:
            unknown.append(name)
            continue
        for target, chunk in zip(targets, tensor.tensor_split(len(targets)), strict=True):
            tensors[target] = chunk
    if unknown:
        raise OfficialCheckpointError(
            f"The checkpoint holds {len(unknown)} tensor(s) that are no part of facebookresearch/dinov2's "
            f"DinoVisionTransformer as rein_peft knows it: {unknown[:20]} (docs/official-checkpoints.md lists the "
            "names it converts)."
        )
    return Dinov2CheckpointMapping(config=config, tensors=tensors, unused=unused)


def convert_dinov2_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    save_directory: str | os.PathLike | None = None,
    patch_size: int | None = None,
    image_size: int | None = None,
    num_attention_heads: int | None = None,
) -> Dinov2Model | Dinov2WithRegistersModel:
    """Turn an official DINOv2 checkpoint into a transformers `Dinov2Model` (or `Dinov2WithRegistersModel`).

    Example (the official Rein backbone, DINOv2-L at patch 16 on 512x512, from the released DINOv2 file):
        ```py
        >>> import rein_peft
        >>> rein_peft.convert_dinov2_checkpoint("dinov2_vitl14_pretrain.pth", "dinov2-large-p16", patch_size=16)
        >>> model = rein_peft.build_official_segmenter("dinov2-large-p16")
        ```

    Args:
        checkpoint: facebookresearch/dinov2's `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`, the official Rein
            conversion of it (`convert_dinov2_large_512x512.py`: patch 16, 32x32 positions), a whole official
            segmentor checkpoint with its DINOv2 under `backbone.`, or such a state dict. `.pth` files are read with
            PyTorch's weights_only unpickler; nothing in them is run.
        save_directory: If given, the model is saved there (`config.json`, `model.safetensors`).
        patch_size: Resize the patch kernel and the position grid to this patch size (16 for the official Rein
            backbone), bicubic as the official conversion (`rein_peft.resize_patch_embedding`); default: the
            checkpoint's (14 for the released DINOv2, 16 for the official conversion).
        image_size: The image side of the resized position grid (default: 512, the official crop, when the patch
            size changes; else the checkpoint's).
        num_attention_heads: Heads per layer; default hidden size / 64, as in every official DINOv2.

    Returns:
        The model, in eval mode, its sizes read from the tensors: width, depth, MLP ratio (SwiGLU for ViT-g), patch
        size, image size (positions grid x patch), register tokens.

    Raises:
        OfficialCheckpointError: See `map_dinov2_checkpoint`; also if the tensors do not fill the model.
    """
    mapping = map_dinov2_checkpoint(checkpoint, num_attention_heads)
    model_class = Dinov2WithRegistersModel if isinstance(mapping.config, Dinov2WithRegistersConfig) else Dinov2Model
    model = model_class(mapping.config).eval()
    expected = model.state_dict()
    problems = [f"{key} is unset" for key in expected if key not in mapping.tensors]
    problems += [
        f"{key} is {list(tensor.shape)}, the model's {list(expected[key].shape)}"
        for key, tensor in mapping.tensors.items()
        if key in expected and tensor.shape != expected[key].shape
    ]
    problems += [f"{key} has no place in {model_class.__name__}" for key in mapping.tensors if key not in expected]
    if problems:
        raise OfficialCheckpointError(
            f"The checkpoint's tensors do not make a {model_class.__name__} of the sizes they imply "
            f"({mapping.config.hidden_size} wide, {mapping.config.num_hidden_layers} layers): {problems[:10]}."
        )
    model.load_state_dict(mapping.tensors, strict=True)
    patch_size = patch_size or mapping.config.patch_size
    if image_size is None and patch_size != mapping.config.patch_size:
        image_size = OFFICIAL_BACKBONE["image_size"]  # 512, the official crop
    if image_size is not None and (patch_size, image_size) != (mapping.config.patch_size, mapping.config.image_size):
        model = resize_patch_embedding(model, patch_size=patch_size, image_size=image_size)
    if save_directory is not None:
        model.save_pretrained(save_directory)
    return model
