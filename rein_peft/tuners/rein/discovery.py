"""Find, from the structure of a model, what Rein needs to know about it.

Nothing here is a list of known paths. The rules, in order:

- patch embedding: the first module that is a patchifying `Conv2d` (kernel == stride > 1) or is named
  `patch_embedding` / `patch_embeddings` (transformers' name for it, also where it is a `Linear`, as in SigLIP2);
- encoder layers: the `nn.ModuleList` (or `nn.Sequential`) of same-class blocks that sits closest to the patch
  embedding (so the vision tower of `CLIPModel`, not its text tower, and the backbone of a segmentation model, not its
  decoder); all of them must have the same width (staged models: see below);
- hidden size C: `in_features` of the first `nn.Linear` inside the first targeted layer;
- prefix tokens: the learned tokens the embedding prepends to the patches (CLS `cls_token` / `class_embedding`,
  distillation `distillation_token` / `dist_token`, registers `register_tokens` / `reg_token`), found on the
  nearest ancestor of the patch embedding that has any, up to the module that also holds the encoder layers: CLS 1,
  DeiT 2, DINOv2 with registers 1 + R, SigLIP 0. Any other learned `*_token(s)` there (YOLOS's detection tokens,
  which go at the end) is an error that asks for `num_prefix_tokens`; `mask_token` replaces patches and is ignored;
- layout: batch-first unless the layer holds a torch `nn.MultiheadAttention` built with `batch_first=False`;
- staged backbones (ConvNeXt, ConvNeXt V2, DINOv3 ConvNeXt, ResNet, Swin, Swin V2): when the layer list found is, or
  sits in, a list of stages that each hold their blocks in a list of their own, every stage is a group with its own
  Rein (`ReinStage`): all its blocks (`layers_to_transform` picks stages), no prefix tokens. The backbone (the nearest
  module above the stages whose forward takes `pixel_values`) runs on two blank images, of its configured size and 64
  pixels more (`probe_stages`); the one axis of a block's output that keeps its size between them is the channel
  axis, which gives each stage's layout (`[B, C, H, W]`, `[B, H, W, C]` or `[B, H*W, C]`) and width even where
  channels, height and width are equal; the first stage's stride stands for the patch size where there is no patch
  embedding (ResNet);
- otherwise channels-first maps are refused: encoder layers that sit in stages Rein does not recognise or contain
  spatial convolutions, or whose embeddings turn a probe image into a `[B, C, H, W]` map (VitDet). That probe runs
  the embeddings (the module that holds the patch embedding, below the one that also holds the layers) on a blank
  image whose patch grid is neither square nor as wide as the hidden size, so that the output's shape tells a token
  sequence `[B, N, C]`, a channels-last map `[B, H, W, C]` (SAM) and a channels-first one apart; embeddings that take
  only their configured image size are probed at that size, and a map whose sides there equal the hidden size is
  refused as one Rein cannot be sure of;
- patch size: the patchifying convolution's kernel, else `patch_size` in the model's config (or its vision/backbone
  sub-config);
- a mask decoder's learnable query tables, for query linking: the `nn.Embedding`s named as transformers names them
  (Mask2Former's `queries_features` and `queries_embedder`, EoMT's `query`).

`ReinConfig.target_modules`, `num_prefix_tokens`, `batch_first` and `patch_size` override each rule.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import partial

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from ..tuners_utils import (
    LAYER_LIST_TYPES,
    common_prefix_length,
    find_layer_list,
    find_patch_embedding,
    is_block_list,
)
from .config import ReinConfig
from .layer import QUERY_CONTENT, QUERY_POSITION, ReinLayer, ReinLinkedQueries

PREFIX_TOKEN_NAMES = (
    "cls_token",
    "class_embedding",
    "distillation_token",
    "dist_token",
    "register_tokens",
    "reg_token",
)
TOKEN_SUFFIXES = ("_token", "_tokens")
NOT_PREFIX_TOKEN_NAMES = ("mask_token",)
SUB_CONFIG_NAMES = ("vision_config", "backbone_config")
CONTAINER_TYPES = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
QUERY_TABLE_ROLES = {"queries_features": QUERY_CONTENT, "queries_embedder": QUERY_POSITION, "query": QUERY_CONTENT}


# how an encoder layer lays out its output hidden states, read off a probe of the model's embeddings
SEQUENCE = "sequence"  # [B, N, C] (or [N, B, C] with batch_first=False)
CHANNELS_LAST = "channels_last"  # [B, H, W, C]: every position is a patch token (SAM)
CHANNELS_FIRST = "channels_first"  # [B, C, H, W]: refused for ViTs (VitDet), the layout of ConvNeXt and ResNet stages
AMBIGUOUS = "ambiguous"  # [B, C, C, C]: refused
# patch grid of the probe image: not square, so that height and width cannot be mistaken for each other
PROBE_GRID = (2, 3)
DEFAULT_IMAGE_SIZE = 224
# a staged backbone is probed at its configured image size S and at S + PROBE_SIZE_STEP: between the two, every side
# of every stage's grid changes (at any stride up to the step), so the one axis of a layer's output that keeps its size
# is the channel axis, whatever the width and the grid. Sizes the backbone is made for: Swin's windows fit its grids
PROBE_SIZE_STEP = 64
PIXEL_VALUES = "pixel_values"


class ReinUnsupportedModelError(ValueError):
    """Rein cannot find what it needs in this model without help from the config."""


@dataclass(frozen=True)
class ReinStage:
    """One group of same-width layers that share one set of Rein tables: the whole encoder of a ViT, or one stage of
    a staged backbone (ConvNeXt, ResNet, Swin)."""

    holder_name: str  # the module the stage's ReinLayer hangs on
    layer_names: list[str]
    hidden_size: int
    layout: str  # SEQUENCE, CHANNELS_LAST or CHANNELS_FIRST: how the layers lay out their outputs


@dataclass(frozen=True)
class ReinTargets:
    """Where and how Rein attaches to one model."""

    stages: list[ReinStage]
    num_prefix_tokens: int
    batch_first: bool
    patch_size: int
    patch_embedding_name: str | None
    query_tables: dict[str, str]  # name of each of a mask decoder's query tables -> its role, with query linking

    @property
    def layer_names(self) -> list[str]:
        return [name for stage in self.stages for name in stage.layer_names]

    @property
    def holder_name(self) -> str:
        return self.stages[0].holder_name

    @property
    def hidden_size(self) -> int:
        return self.stages[0].hidden_size


def _how_to_configure(model: nn.Module) -> str:
    return (
        f"Rein found no vision-transformer encoder in {type(model).__name__}. Set "
        "`ReinConfig(target_modules=[...], num_prefix_tokens=...)`: target_modules names the encoder layers (a "
        "regex such as r'.*encoder\\.layers\\.\\d+' or a list of names), num_prefix_tokens the tokens before the "
        "patch tokens (1 for a CLS token, 0 for none); set patch_size too if the model has no patch embedding."
    )


def _parent_name(name: str) -> str:
    return name.rpartition(".")[0]


def _common_ancestor(a: str, b: str) -> str:
    return ".".join(a.split(".")[: common_prefix_length(a, b)])


def count_prefix_tokens(model: nn.Module, patch_embedding_name: str, layer_name: str, hidden_size: int) -> int:
    """Learned tokens prepended to the patch tokens, read off the nearest embedding module that has any."""
    top = _common_ancestor(patch_embedding_name, layer_name)  # the vision tower: look no higher
    name = patch_embedding_name
    while name != top:
        name = _parent_name(name)
        count = 0
        for param_name, param in model.get_submodule(name).named_parameters(recurse=False):
            if param_name in PREFIX_TOKEN_NAMES and param.shape[-1] == hidden_size:
                count += param.numel() // hidden_size
            elif param_name.endswith(TOKEN_SUFFIXES) and param_name not in NOT_PREFIX_TOKEN_NAMES:
                raise ReinUnsupportedModelError(
                    f"{type(model).__name__} has learned tokens '{name + '.' if name else ''}{param_name}' that "
                    "Rein cannot place in the sequence. Set `ReinConfig(num_prefix_tokens=...)` to the number of "
                    "tokens before the patch tokens (tokens after them are not supported)."
                )
        if count:
            return count
    return 0


def find_patch_size(model: nn.Module, patch_embedding_name: str | None) -> int | None:
    if patch_embedding_name is not None:
        for module in model.get_submodule(patch_embedding_name).modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size == module.stride:
                return module.kernel_size[0]
    config = getattr(model, "config", None)
    for sub_config in [config] + [getattr(config, name, None) for name in SUB_CONFIG_NAMES]:
        patch_size = getattr(sub_config, "patch_size", None)
        if patch_size is not None:
            return patch_size if isinstance(patch_size, int) else patch_size[0]
    return None


def _holder_name(model: nn.Module, layer_names: list[str]) -> str:
    """The nearest common ancestor of the layers that is not a container (a ModuleList cannot take an attribute)."""
    parents = [_parent_name(name).split(".") for name in layer_names]
    common = []
    for parts in zip(*parents, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    holder = ".".join(common)
    while holder and isinstance(model.get_submodule(holder), CONTAINER_TYPES):
        holder = _parent_name(holder)
    return holder


def _hidden_size(model: nn.Module, layer_name: str) -> int:
    for module in model.get_submodule(layer_name).modules():
        if isinstance(module, nn.Linear):
            return module.in_features
    raise ReinUnsupportedModelError(
        f"Target '{layer_name}' of {type(model).__name__} contains no nn.Linear, so it is not a transformer layer. "
        "Point `target_modules` at the encoder layers."
    )


def _batch_first(model: nn.Module, layer_name: str) -> bool:
    for module in model.get_submodule(layer_name).modules():
        if isinstance(module, nn.MultiheadAttention):
            return module.batch_first
    return True


def execution_device(module: nn.Module) -> torch.device:
    """Where a module computes: the device of its parameters or, when accelerate has offloaded them (`device_map`
    with "disk" or "cpu" entries: they wait on the meta device), the device accelerate's hook on the module brings
    them to for each forward."""
    device = next(module.parameters()).device
    if device.type != "meta":
        return device
    execution_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if execution_device is None:
        return torch.device("cpu")
    # accelerate names a GPU by its index
    return (
        torch.device("cuda", execution_device) if isinstance(execution_device, int) else torch.device(execution_device)
    )


def _configured_image_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for sub_config in [config] + [getattr(config, name, None) for name in SUB_CONFIG_NAMES]:
        image_size = getattr(sub_config, "image_size", None)
        if image_size is not None:
            return image_size if isinstance(image_size, int) else image_size[0]
    return DEFAULT_IMAGE_SIZE


def _layout_of(output: object, grid: tuple[int, int], hidden_size: int) -> str | None:
    """The layout that a probe's output shape shows, or None if it shows none."""
    features = output[0] if isinstance(output, tuple) else output
    if not isinstance(features, torch.Tensor):
        return None
    if features.dim() == 3:
        return SEQUENCE
    if features.dim() != 4:
        return None
    channels_last = tuple(features.shape[1:]) == (*grid, hidden_size)
    channels_first = tuple(features.shape[1:]) == (hidden_size, *grid)
    if channels_last and channels_first:
        return AMBIGUOUS
    return CHANNELS_LAST if channels_last else CHANNELS_FIRST if channels_first else None


@torch.no_grad()
def probe_layout(model: nn.Module, patch_embedding_name: str, layer_name: str, hidden_size: int) -> str | None:
    """Run the model's embeddings on blank images and read the layout of what they feed the encoder layers off the
    output's shape (see the module docstring); None where they cannot be probed with an image alone (SigLIP2's
    embeddings also take the patches' shapes)."""
    top = _common_ancestor(patch_embedding_name, layer_name)
    depth = len(top.split(".")) + 1 if top else 1
    embeddings = model.get_submodule(".".join(patch_embedding_name.split(".")[:depth]))
    convolutions = [module for module in embeddings.modules() if isinstance(module, nn.Conv2d)]
    if isinstance(embeddings, CONTAINER_TYPES) or not convolutions:
        return None
    patch = convolutions[0]
    stride = patch.stride[0]
    side = _configured_image_size(model) // stride
    # a non-square grid whose sides differ from the width; then, for embeddings that take only their own size, that
    grids = [PROBE_GRID if hidden_size not in PROBE_GRID else (hidden_size + 1, hidden_size + 2), (side, side)]
    modes = [(module, module.training) for module in embeddings.modules()]
    embeddings.eval()  # no dropout: the probe draws no random numbers
    try:
        for grid in grids:
            pixels = torch.zeros(
                1,
                patch.in_channels,
                grid[0] * stride,
                grid[1] * stride,
                dtype=patch.weight.dtype if patch.weight.is_floating_point() else torch.float32,
                device=execution_device(patch),
            )
            try:
                layout = _layout_of(embeddings(pixels), grid, hidden_size)
            except Exception:  # embeddings that take only their configured size: try that next
                continue
            if layout is not None:
                return layout
        return None
    finally:
        for module, training in modes:
            module.training = training


def _refuse_feature_maps(model: nn.Module, layer_names: list[str], layout: str | None) -> None:
    """Refuse encoder layers whose outputs are channels-first feature maps (or may be), naming the reason."""
    name = type(model).__name__
    explanation = (
        "Rein refines token sequences [batch, tokens, hidden] (and channels-last maps [batch, height, width, "
        "hidden]): refined along the wrong axis, a channels-first map would run and give wrong numbers. "
        "Staged backbones (ConvNeXt, ResNet, Swin: a list of stages, each with its list of blocks) are supported; "
        "for a vision transformer, point `ReinConfig(target_modules=...)` at layers whose outputs are token "
        "sequences."
    )
    layer_list = _parent_name(layer_names[0])
    in_stage = any(
        isinstance(module, LAYER_LIST_TYPES) and len({type(block) for block in module}) == 1
        for module in (model.get_submodule(ancestor) for ancestor in _ancestors(layer_list))
    )
    if in_stage:
        raise ReinUnsupportedModelError(
            f"The layers Rein found in {name} ('{layer_list}') are one stage of a staged model (ConvNeXt, ResNet, "
            f"Swin): each stage has its own width and feature-map size. {explanation}"
        )
    for layer_name in layer_names:
        for module_name, module in model.get_submodule(layer_name).named_modules():
            if isinstance(module, nn.Conv2d) and max(module.kernel_size) > 1:
                raise ReinUnsupportedModelError(
                    f"Layer '{layer_name}' of {name} holds a spatial convolution ('{module_name}', kernel "
                    f"{tuple(module.kernel_size)}), so its outputs are feature maps. {explanation}"
                )
    if layout == CHANNELS_FIRST:
        raise ReinUnsupportedModelError(
            f"The embeddings of {name} feed its encoder layers channels-first feature maps [batch, hidden, height, "
            f"width] (VitDet's layout). {explanation}"
        )
    if layout == AMBIGUOUS:
        raise ReinUnsupportedModelError(
            f"Rein cannot tell whether the feature maps of {name} are channels-first or channels-last: its hidden "
            f"size equals the height and width of the patch grid at the only image size its embeddings take. "
            f"{explanation}"
        )


def _direct_block_list(module: nn.Module) -> str | None:
    """Name of the first child of `module` that is a list of same-class blocks (a stage's blocks), or None."""
    return next((name for name, child in module.named_children() if is_block_list(child)), None)


def find_stage_list(model: nn.Module, layer_list: str) -> str | None:
    """The list of stages that `layer_list` is or sits in (the outermost one): a list of same-class modules that each
    hold their blocks in a list of their own (ConvNeXt's `stages`, each with `layers`; Swin's `layers`, each with
    `blocks`). None for a plain encoder."""
    found = None
    for name in [layer_list, *_ancestors(layer_list)]:
        module = model.get_submodule(name)
        if is_block_list(module) and all(_direct_block_list(stage) is not None for stage in module):
            found = name
    return found


def _group_by_list(layer_names: list[str]) -> list[list[str]]:
    """Layers grouped by the list that holds them, in order: one group per stage."""
    groups: dict[str, list[str]] = {}
    for name in layer_names:
        groups.setdefault(_parent_name(name), []).append(name)
    return list(groups.values())


def _staged_layer_names(model: nn.Module, config: ReinConfig, stage_list: str) -> list[list[str]]:
    """Every block of the stages that `layers_to_transform` picks (all by default), grouped by stage."""
    stages = model.get_submodule(stage_list)
    indices = list(range(len(stages))) if config.layers_to_transform is None else config.layers_to_transform
    bad = [index for index in indices if not 0 <= index < len(stages)]
    if bad:
        raise ValueError(
            f"layers_to_transform={config.layers_to_transform} asks for stages {bad}, but {type(model).__name__} "
            f"has {len(stages)} stages ('{stage_list}.0' to '{stage_list}.{len(stages) - 1}'); in a staged model "
            "layers_to_transform picks stages (name single blocks with target_modules)."
        )
    groups = []
    for index in sorted(set(indices)):
        blocks = f"{stage_list}.{index}.{_direct_block_list(stages[index])}"
        groups.append([f"{blocks}.{block}" for block in range(len(model.get_submodule(blocks)))])
    return groups


def _image_backbone(model: nn.Module, layer_name: str) -> nn.Module:
    """The nearest module above `layer_name` whose forward takes the images (`pixel_values`), else the model."""
    for name in _ancestors(layer_name):
        module = model.get_submodule(name)
        parameters = list(inspect.signature(module.forward).parameters)
        if parameters and parameters[0] == PIXEL_VALUES:
            return module
    return model


def _stage_layout(small: tuple[int, ...], large: tuple[int, ...]) -> tuple[str, int] | None:
    """(layout, width) of a layer's output from its shapes at the two probe sizes: the one axis besides the batch that
    keeps its size is the channel axis. None for any other pattern."""
    if len(small) != len(large) or len(small) not in (3, 4):
        return None
    constant = [axis for axis in range(1, len(small)) if small[axis] == large[axis]]
    if len(constant) != 1:
        return None
    layouts = {(3, 2): SEQUENCE, (4, 1): CHANNELS_FIRST, (4, 3): CHANNELS_LAST}
    layout = layouts.get((len(small), constant[0]))
    return None if layout is None else (layout, small[constant[0]])


def _positions(shape: tuple[int, ...], layout: str) -> int:
    """Grid positions (tokens) of one image in a layer output of this shape and layout."""
    spatial = shape[2:] if layout == CHANNELS_FIRST else shape[1:-1]
    return math.prod(spatial)


@torch.no_grad()
def probe_stages(model: nn.Module, groups: list[list[str]]) -> tuple[list[tuple[str, int]], int]:
    """Run the backbone on two blank square images (its configured size S and S + `PROBE_SIZE_STEP`) and read, off
    the shapes of every targeted layer's outputs, each stage's layout and width; and the stride of the first stage,
    which stands for the patch size.

    Returns:
        `[(layout, width)]`, one per group, and the first stage's stride in pixels.
    """
    backbone = _image_backbone(model, groups[0][0])
    convolutions = [module for module in backbone.modules() if isinstance(module, nn.Conv2d)]
    config = getattr(backbone, "config", None)
    num_channels = getattr(config, "num_channels", None) or (convolutions[0].in_channels if convolutions else 3)
    weight = next(parameter for parameter in backbone.parameters() if parameter.is_floating_point())
    anchor = convolutions[0] if convolutions else backbone
    side = _configured_image_size(backbone)
    sides = (side, side + PROBE_SIZE_STEP)
    shapes: dict[str, list[tuple[int, ...]]] = {name: [] for group in groups for name in group}

    def record(name: str, module: nn.Module, args: tuple, output: object) -> None:
        features = output[0] if isinstance(output, tuple) else output
        shapes[name].append(tuple(features.shape) if isinstance(features, torch.Tensor) else ())

    handles = [model.get_submodule(name).register_forward_hook(partial(record, name)) for name in shapes]
    modes = [(module, module.training) for module in backbone.modules()]
    rein_layers = [(layer, layer._disable_adapters) for layer in model.modules() if isinstance(layer, ReinLayer)]
    backbone.eval()  # no dropout, no batch-norm statistics: the probe changes nothing
    for layer, _ in rein_layers:  # a further adapter: read the base model's shapes
        layer._disable_adapters = True
    try:
        for probe_side in sides:
            pixels = torch.zeros(
                1, num_channels, probe_side, probe_side, dtype=weight.dtype, device=execution_device(anchor)
            )
            backbone(pixels)
    except Exception as error:
        raise ReinUnsupportedModelError(
            f"Rein runs {type(backbone).__name__} on blank {sides[0]}x{sides[0]} and {sides[1]}x{sides[1]} images "
            f"(its configured image size and {PROBE_SIZE_STEP} pixels more) to read the layout and width of each "
            f"stage's outputs, and that failed: {error!r}. Make sure the backbone takes images of those sizes (its "
            "config's `image_size`)."
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
        for layer, disabled in rein_layers:
            layer._disable_adapters = disabled
    layouts = []
    for group in groups:
        found = {name: _stage_layout(*shapes[name]) if len(shapes[name]) == 2 else None for name in group}
        if len(set(found.values())) != 1 or None in found.values():
            seen = {name: shapes[name] for name in group}
            raise ReinUnsupportedModelError(
                f"Rein cannot tell the channel axis of the outputs of the layers {group} of {type(model).__name__}: "
                f"their shapes on {sides[0]}x{sides[0]} and {sides[1]}x{sides[1]} images are {seen}, but Rein "
                "needs [batch, channels, height, width], [batch, height, width, channels] or [batch, tokens, "
                "channels], the same for every layer of a stage. Point `target_modules` at the blocks of each stage."
            )
        layouts.append(found[group[0]])
    first_layout = layouts[0][0]
    positions = _positions(shapes[groups[0][0]][0], first_layout)
    stride = round(side / math.sqrt(positions))
    return layouts, stride


def _staged_targets(
    model: nn.Module, config: ReinConfig, groups: list[list[str]], patch_embedding: str | None
) -> ReinTargets:
    """The targets of a staged backbone: one `ReinStage` per group of layers, its layout and width probed."""
    if config.num_prefix_tokens:
        raise ValueError(
            f"num_prefix_tokens={config.num_prefix_tokens}, but {type(model).__name__} is a staged backbone whose "
            "stages refine every position of their feature maps: leave num_prefix_tokens unset (or 0)."
        )
    if config.batch_first is False:
        raise ValueError("batch_first=False: the stages of a staged backbone are batch-first; leave it unset.")
    layouts, stride = probe_stages(model, groups)
    stages = [
        ReinStage(holder_name=_holder_name(model, group), layer_names=group, hidden_size=width, layout=layout)
        for group, (layout, width) in zip(groups, layouts, strict=True)
    ]
    holders = [stage.holder_name for stage in stages]
    if len(set(holders)) != len(holders):
        raise ReinUnsupportedModelError(
            f"The groups of layers Rein found in {type(model).__name__} ({groups}) share the module they would hang "
            f"on ({holders}): point `target_modules` at the blocks of whole stages."
        )
    return ReinTargets(
        stages=stages,
        num_prefix_tokens=0,
        batch_first=True,
        patch_size=config.patch_size or find_patch_size(model, patch_embedding) or stride,
        patch_embedding_name=patch_embedding,
        query_tables=find_query_tables(model, config) if config.link_token_to_query else {},
    )


def _ancestors(name: str) -> list[str]:
    """The names of the modules above `name`, nearest first, the model itself ("") last."""
    parts = name.split(".")
    return [".".join(parts[:index]) for index in range(len(parts) - 1, -1, -1)]


def find_query_tables(model: nn.Module, config: ReinConfig) -> dict[str, str]:
    """A mask decoder's learnable query tables (name -> role) that Rein's linked queries replace. Checks that they
    have `token_length` rows of width `query_dims`."""
    tables = {}
    for name, module in model.named_modules():
        role = QUERY_TABLE_ROLES.get(name.rpartition(".")[2])
        table = module.base_layer if isinstance(module, ReinLinkedQueries) else module
        if role is None or not isinstance(table, nn.Embedding):
            continue
        if table.num_embeddings != config.token_length:
            raise ValueError(
                f"With link_token_to_query=True Rein's tokens become the decoder's queries, but '{name}' of "
                f"{type(model).__name__} has {table.num_embeddings} queries and token_length is "
                f"{config.token_length}. "
                f"Set `ReinConfig(token_length={table.num_embeddings})` (or build the decoder with "
                f"num_queries={config.token_length})."
            )
        if table.embedding_dim != config.query_dims:
            raise ValueError(
                f"With link_token_to_query=True Rein's linked queries replace '{name}' of {type(model).__name__}, "
                f"which is {table.embedding_dim} wide, but query_dims is {config.query_dims}. Set "
                f"`ReinConfig(query_dims={table.embedding_dim})`."
            )
        tables[name] = role
    return tables


def _auto_layer_names(model: nn.Module, config: ReinConfig, layer_list: str | None) -> list[str]:
    if layer_list is None:
        raise ReinUnsupportedModelError(_how_to_configure(model))
    num_layers = len(model.get_submodule(layer_list))
    indices = list(range(num_layers)) if config.layers_to_transform is None else config.layers_to_transform
    bad = [index for index in indices if not 0 <= index < num_layers]
    if bad:
        raise ValueError(
            f"layers_to_transform={config.layers_to_transform} asks for layers {bad}, but {type(model).__name__} "
            f"has {num_layers} encoder layers ('{layer_list}.0' to '{layer_list}.{num_layers - 1}')."
        )
    return [f"{layer_list}.{index}" for index in sorted(set(indices))]


def _first_convolution(model: nn.Module) -> str | None:
    """Name of the model's first `Conv2d` (the stem of a backbone without patch embedding, ResNet's), or None."""
    return next((name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)), None)


def discover(model: nn.Module, config: ReinConfig) -> ReinTargets:
    """Resolve the layers Rein refines and the backbone's geometry, for `config` on `model`."""
    patch_embedding = find_patch_embedding(model)
    if config.target_modules is None:
        anchor = patch_embedding or _first_convolution(model)
        layer_list = find_layer_list(model, anchor) if anchor is not None else None
        stage_list = find_stage_list(model, layer_list) if layer_list is not None else None
        if stage_list is not None:
            return _staged_targets(model, config, _staged_layer_names(model, config, stage_list), patch_embedding)
        layer_names = _auto_layer_names(model, config, layer_list if patch_embedding is not None else None)
    else:
        layer_names = [name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)]
        if not layer_names:
            raise ValueError(
                f"target_modules={config.target_modules!r} (layers_to_transform={config.layers_to_transform}) "
                f"matched no module of {type(model).__name__}. Use the names printed by `model.named_modules()`, "
                "e.g. r'.*encoder\\.layer\\.\\d+'."
            )
        if find_stage_list(model, _parent_name(layer_names[0])) is not None:
            return _staged_targets(model, config, _group_by_list(layer_names), patch_embedding)

    hidden_size = _hidden_size(model, layer_names[0])
    widths = {name: _hidden_size(model, name) for name in layer_names}
    if len(set(widths.values())) > 1:
        raise ReinUnsupportedModelError(
            f"The layers Rein found in {type(model).__name__} change width ({widths}) but are not the stages of a "
            "staged backbone (a list of stages that each hold their blocks in a list), which get one Rein each. "
            "Point `target_modules` at same-width layers."
        )
    layout = probe_layout(model, patch_embedding, layer_names[0], hidden_size) if patch_embedding else None
    _refuse_feature_maps(model, layer_names, layout)
    num_prefix_tokens = config.num_prefix_tokens
    if num_prefix_tokens is None:
        if patch_embedding is None:
            raise ReinUnsupportedModelError(_how_to_configure(model))
        num_prefix_tokens = count_prefix_tokens(model, patch_embedding, layer_names[0], hidden_size)
    patch_size = config.patch_size or find_patch_size(model, patch_embedding)
    if patch_size is None:
        raise ReinUnsupportedModelError(
            f"Rein found no patch size in {type(model).__name__} (used to initialise the tokens). "
            "Set `ReinConfig(patch_size=...)`."
        )
    batch_first = config.batch_first if config.batch_first is not None else _batch_first(model, layer_names[0])
    stage = ReinStage(
        holder_name=_holder_name(model, layer_names),
        layer_names=layer_names,
        hidden_size=hidden_size,
        layout=CHANNELS_LAST if layout == CHANNELS_LAST else SEQUENCE,
    )
    return ReinTargets(
        stages=[stage],
        num_prefix_tokens=num_prefix_tokens,
        batch_first=batch_first,
        patch_size=patch_size,
        patch_embedding_name=patch_embedding,
        query_tables=find_query_tables(model, config) if config.link_token_to_query else {},
    )
