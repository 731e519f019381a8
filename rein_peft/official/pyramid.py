"""The backbone of the official Rein segmenter, as transformers classes.

- `resize_patch_embedding`: DINOv2 with its patch kernel and position grid resized (14 -> 16, 37x37 -> 32x32 at 512),
  as `tools/convert_models/convert_dinov2_large_512x512.py` of the official code does.
- `Dinov2PyramidConfig` / `Dinov2PyramidBackbone`: a `Dinov2Backbone` whose feature maps, all at the patch stride,
  are resized by `feature_scales` (x4, x2, x1, x0.5: strides 4, 8, 16, 32 at patch 16) into the pyramid that the
  official backbone hands its decoder (`rein/models/backbones/dino_v2.py`, `forward`), and whose position table is
  interpolated to other input sizes as the official backbone does it (`OfficialPositionEmbeddings`).

`import rein_peft` registers the config and the backbone with transformers' auto classes (`register_pyramid`), so
`AutoBackbone` and Mask2Former / UperNet configs whose `backbone_config` is a `Dinov2PyramidConfig` build and load it.
"""

from __future__ import annotations

import math
import os

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoBackbone, AutoConfig, AutoModel, Dinov2Backbone, Dinov2Config, PreTrainedModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import BackboneOutput
from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings
from transformers.utils import can_return_tuple

PYRAMID_MODEL_TYPE = "dinov2_pyramid"
# the official pyramid: strides patch/4, patch/2, patch, 2 * patch (4, 8, 16, 32 at patch 16)
OFFICIAL_FEATURE_SCALES = (4, 2, 1, 0.5)
# the official conversion (`convert_dinov2_large_512x512.py`) and the pyramid (`dino_v2.py`, `forward`)
KERNEL_RESIZE_MODE = "bicubic"
PYRAMID_RESIZE_MODE = "bilinear"
# the official position interpolation (`dino_v2.py`, `interpolate_pos_encoding`): bicubic, by scale factors
# (grid + POSITION_SCALE_OFFSET) / sqrt(N) that keep DINO's guard against floating-point error
POSITION_RESIZE_MODE = "bicubic"
POSITION_SCALE_OFFSET = 0.1
# transformers 5 renames DINOv2's checkpoint keys on load by class name; the pyramid backbone has the same keys
DINOV2_CONVERSION_MAPPING = "Dinov2Model"
DINOV2_MODEL_TYPES = ("dinov2", "dinov2_with_registers", PYRAMID_MODEL_TYPE)


@strict
class Dinov2PyramidConfig(Dinov2Config):
    r"""Configuration of a `Dinov2PyramidBackbone`: a `Dinov2Config` that also says how each feature map is resized.

    Args:
        feature_scales (`list[float]`, *optional*, defaults to `[4, 2, 1, 0.5]`):
            One factor per entry of `out_features`: each feature map (at the patch stride) is resized bilinearly
            (`align_corners=False`) by it; a factor of 1 leaves the map untouched. The default is the official Rein
            pyramid: strides 4, 8, 16 and 32 for patch 16.

    Every other argument is a `Dinov2Config` argument. The official segmenter uses
    `out_features=["stage8", "stage12", "stage16", "stage24"]` and `apply_layernorm=False` on DINOv2-L at patch 16.
    """

    model_type = PYRAMID_MODEL_TYPE

    feature_scales: list[float | int] | tuple[float | int, ...] = OFFICIAL_FEATURE_SCALES

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.feature_scales = list(self.feature_scales)
        if not all(scale > 0 for scale in self.feature_scales):
            raise ValueError(f"feature_scales must be positive resize factors, got {self.feature_scales}.")

    def check_feature_scales(self) -> None:
        """Raise a clear error if `feature_scales` does not give one factor per feature map. Checked when the backbone
        is built, not here: `from_pretrained` sets `out_features` after it builds the config (from a DINOv2
        checkpoint's single default feature), and transformers builds a default config to save only the changes."""
        if len(self.feature_scales) != len(self.out_features):
            raise ValueError(
                f"Dinov2PyramidConfig has {len(self.out_features)} out_features {self.out_features} but "
                f"{len(self.feature_scales)} feature_scales {self.feature_scales}: give one scale per feature map "
                "(1 keeps a map at the patch stride), e.g. feature_scales=[4, 2, 1, 0.5] for four maps."
            )
        if not self.reshape_hidden_states and any(scale != 1 for scale in self.feature_scales):
            raise ValueError(
                "feature_scales resize [B, C, H, W] feature maps, but reshape_hidden_states=False keeps them as "
                "[B, N, C] sequences. Set reshape_hidden_states=True, or feature_scales to all 1."
            )


class OfficialPositionEmbeddings(Dinov2Embeddings):
    """DINOv2's embeddings (same parameters, same names) with the position table interpolated as the official Rein
    backbone does it (`rein/models/backbones/dino_v2.py`, `interpolate_pos_encoding`).

    At an input whose patch grid is not the table's own `sqrt(N)` x `sqrt(N)` (or is not square), the patch positions
    `[1, C, sqrt(N), sqrt(N)]` are resized bicubically (`align_corners=False`, in float32) by
    `scale_factor=((h0 + 0.1) / sqrt(N), (w0 + 0.1) / sqrt(N))`, `h0`, `w0` the input's patch rows and columns.
    PyTorch samples with these factors, not with the sizes' ratio `h0 / sqrt(N)` that transformers'
    `size=(h0, w0)` gives, so the positions differ slightly wherever an image is not the table's size (whole-image
    inference, an image side below the crop). At the table's own size the table is used as it is, as in both.
    """

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The positions `[1, 1 + h0 * w0, C]` for `embeddings` `[B, 1 + h0 * w0, C]` of a `height` x `width` image."""
        num_positions = self.position_embeddings.shape[1] - 1
        if embeddings.shape[1] - 1 == num_positions and height == width:
            return self.position_embeddings
        grid = math.isqrt(num_positions)
        patch_height, patch_width = self.patch_embeddings.patch_size
        rows, columns = height // patch_height, width // patch_width
        positions = self.position_embeddings.float()
        patch_positions = positions[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # [1, C, grid, grid]
        patch_positions = nn.functional.interpolate(
            patch_positions,
            scale_factor=((rows + POSITION_SCALE_OFFSET) / grid, (columns + POSITION_SCALE_OFFSET) / grid),
            mode=POSITION_RESIZE_MODE,
            align_corners=False,
        )  # [1, C, rows, columns]
        patch_positions = patch_positions.permute(0, 2, 3, 1).reshape(1, rows * columns, -1)
        return torch.cat([positions[:, :1], patch_positions], dim=1).to(embeddings.dtype)


class Dinov2PyramidBackbone(Dinov2Backbone):
    """A `Dinov2Backbone` whose feature maps are resized by `config.feature_scales` into a feature pyramid.

    The parameters, their names and the encoder are `Dinov2Backbone`'s: it loads any DINOv2 checkpoint unchanged, and
    Rein finds and refines it like any DINOv2. Feature map k is `interpolate(map_k, scale_factor=feature_scales[k],
    mode="bilinear", align_corners=False)`, or the map itself where the scale is 1. The position table is interpolated
    to other input sizes as the official backbone does it (`OfficialPositionEmbeddings`).

    Example:
        ```py
        >>> import rein_peft
        >>> from transformers import AutoBackbone
        >>> config = rein_peft.Dinov2PyramidConfig.from_pretrained(
        ...     "dinov2-large-p16", out_features=["stage8", "stage12", "stage16", "stage24"], apply_layernorm=False
        ... )
        >>> backbone = AutoBackbone.from_pretrained("dinov2-large-p16", config=config)  # maps at 1/4 ... 1/32
        ```
    """

    config_class = Dinov2PyramidConfig

    def __init__(self, config: Dinov2PyramidConfig) -> None:
        config.check_feature_scales()
        super().__init__(config)
        embeddings = OfficialPositionEmbeddings(config)
        embeddings.load_state_dict(self.embeddings.state_dict())  # the initialised parameters, on their device
        self.embeddings = embeddings

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BackboneOutput:
        output = super().forward(pixel_values, attention_mask=attention_mask, **kwargs)
        output.feature_maps = tuple(
            feature_map
            if scale == 1
            else nn.functional.interpolate(
                feature_map, scale_factor=scale, mode=PYRAMID_RESIZE_MODE, align_corners=False
            )  # [B, C, H * scale, W * scale]
            for feature_map, scale in zip(output.feature_maps, self.config.feature_scales, strict=True)
        )
        return output


def register_pyramid() -> None:
    """Register `Dinov2PyramidConfig` and `Dinov2PyramidBackbone` with transformers' auto classes, and DINOv2's
    checkpoint key renames with the backbone's class name. Runs on `import rein_peft`; calling it again changes
    nothing."""
    AutoConfig.register(PYRAMID_MODEL_TYPE, Dinov2PyramidConfig, exist_ok=True)
    AutoBackbone.register(Dinov2PyramidConfig, Dinov2PyramidBackbone, exist_ok=True)
    # without them the attention weights of a DINOv2 checkpoint load as random, with only a load report to say so
    register_checkpoint_conversion_mapping(
        Dinov2PyramidBackbone.__name__, get_checkpoint_conversion_mapping(DINOV2_CONVERSION_MAPPING), overwrite=True
    )


# --- the official backbone conversion --------------------------------------------------------------------------------


def _resize_float32(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`[N, C, h, w]` -> `[N, C, *size]`, bicubic (`align_corners=False`) in float32, back in the tensor's dtype."""
    resized = nn.functional.interpolate(tensor.float(), size=size, mode=KERNEL_RESIZE_MODE, align_corners=False)
    return resized.to(tensor.dtype)


def _resize_embeddings(embeddings: nn.Module, patch_size: int, grid: int) -> None:
    """Resize one DINOv2 embeddings module in place: the patch kernel to `patch_size`, the patch positions to a
    `grid` x `grid` grid (the CLS position kept)."""
    patch_embeddings = embeddings.patch_embeddings
    old = patch_embeddings.projection  # Conv2d(3, C, kernel p, stride p)
    projection = nn.Conv2d(
        old.in_channels, old.out_channels, kernel_size=patch_size, stride=patch_size, bias=old.bias is not None
    ).to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        projection.weight.copy_(_resize_float32(old.weight, (patch_size, patch_size)))  # [C, 3, p, p]
        if old.bias is not None:
            projection.bias.copy_(old.bias)
    projection.weight.requires_grad_(old.weight.requires_grad)
    if old.bias is not None:
        projection.bias.requires_grad_(old.bias.requires_grad)
    patch_embeddings.projection = projection
    patch_embeddings.patch_size = (patch_size, patch_size)
    patch_embeddings.image_size = (grid * patch_size, grid * patch_size)
    patch_embeddings.num_patches = grid * grid
    embeddings.patch_size = patch_size

    positions = embeddings.position_embeddings  # [1, 1 + g * g, C]: CLS, then the patch grid row by row
    old_grid, width = math.isqrt(positions.shape[1] - 1), positions.shape[2]
    if old_grid * old_grid != positions.shape[1] - 1:
        raise ValueError(
            f"The position embeddings hold {positions.shape[1] - 1} patch positions, which is no square grid: "
            "resize_patch_embedding needs a DINOv2 with one CLS position and a square patch grid."
        )
    patch_positions = positions[:, 1:].reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2)  # [1, C, g, g]
    patch_positions = _resize_float32(patch_positions, (grid, grid)).permute(0, 2, 3, 1).reshape(1, grid * grid, width)
    embeddings.position_embeddings = nn.Parameter(
        torch.cat([positions[:, :1], patch_positions], dim=1).detach(), requires_grad=positions.requires_grad
    )


def resize_patch_embedding(
    model: PreTrainedModel | str | os.PathLike, patch_size: int = 16, image_size: int = 512
) -> PreTrainedModel:
    """Give a DINOv2 the patch size and position grid of the official Rein backbone, as the official conversion does.

    The patch kernel `[C, 3, p, p]` is resized to `patch_size` x `patch_size` and the patch positions to a grid of
    `image_size // patch_size` a side (DINOv2 from 14 to 16 and 37x37 to 32x32 at 512), both bicubic with
    `align_corners=False` in float32; the CLS position is kept. The config's `patch_size` and `image_size` are
    updated, so `save_pretrained` writes a checkpoint that `from_pretrained` loads without any size mismatch.

    Args:
        model: A transformers DINOv2 of any size, with or without registers (`Dinov2Model`, `Dinov2Backbone`,
            `Dinov2ForImageClassification`, their `Dinov2WithRegisters*` and `Dinov2Pyramid*` counterparts), changed
            in place; or a checkpoint name or folder, loaded with `AutoModel`.
        patch_size: The new patch size (16 in the official system).
        image_size: The image side the new position grid is made for (512 in the official 512x512 configs); a
            multiple of `patch_size`. Other sizes still work: DINOv2 interpolates the positions on the fly.

    Returns:
        The model with the resized patch embedding.

    Command line, for a checkpoint on disk: `python -m rein_peft.resize_backbone <in> <out> --patch-size 16
    --image-size 512`.
    """
    if not isinstance(model, nn.Module):
        model = AutoModel.from_pretrained(model)
    config = model.config
    if getattr(config, "model_type", None) not in DINOV2_MODEL_TYPES:
        raise ValueError(
            f"resize_patch_embedding resizes DINOv2 models (model_type one of {DINOV2_MODEL_TYPES}), got "
            f"{type(model).__name__} with model_type {getattr(config, 'model_type', None)!r}. For a segmenter, resize "
            "its DINOv2 checkpoint first and build the segmenter from the resized checkpoint."
        )
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(
            f"image_size must be a positive multiple of patch_size, got image_size={image_size}, "
            f"patch_size={patch_size} (the official system: patch_size=16, image_size=512)."
        )
    # DINOv2's embeddings modules (with or without registers): patch embedding and position table side by side
    embeddings = [module for module in model.modules() if hasattr(module, "patch_embeddings")]
    if not embeddings or not all(isinstance(module.position_embeddings, nn.Parameter) for module in embeddings):
        raise ValueError(f"{type(model).__name__} has no DINOv2 embeddings with a position table to resize.")
    for module in embeddings:
        _resize_embeddings(module, patch_size, image_size // patch_size)
    config.patch_size, config.image_size = patch_size, image_size
    return model
