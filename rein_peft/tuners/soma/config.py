"""SoMA's recipe as a plain PEFT `LoraConfig`: where the adapters go in a vision transformer, read off its structure.

SoMA (Yun et al., CVPR 2025, github ysj9909/SoMA, `configs/sora/sora_dinov2-L_mask2former.py`) puts LoRA of rank 16,
alpha 16, without dropout, on every linear of a block (attention q, k, v, proj and MLP fc1, fc2) in all but the first
third of the blocks (8 to 23 of DINOv2-L's 24), and trains those linears' biases too. `soma_config` writes that as a
`LoraConfig` for any transformers ViT-family model; `initialize_soma` then sets the factors from the minor singular
components.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

SOMA_RANK = 16  # `rank = 16` in SoMA's config
SOMA_ALPHA = 16  # lora_alpha = rank: scaling 1
FROZEN_FRACTION_DENOMINATOR = 3  # the first third of the blocks gets no adapter (`start_lora_idx = 8` of 24)
SOMA_BIAS = "lora_only"  # the biases of the adapted linears train, no other bias
PATCH_EMBEDDING_NAMES = ("patch_embedding", "patch_embeddings")
BLOCK_LIST_TYPES = (nn.ModuleList, nn.Sequential)


@dataclass(frozen=True)
class SomaTargets:
    """Where SoMA goes in one model: the list of encoder blocks and the linears of a block."""

    block_list: str  # e.g. "dinov2.encoder.layer"
    num_layers: int
    linear_names: list[str]  # relative to a block, e.g. ["attention.q_proj", ..., "mlp.fc2"]


def _is_patch_embedding(name: str, module: nn.Module) -> bool:
    if name.rpartition(".")[2] in PATCH_EMBEDDING_NAMES:
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == module.stride and module.kernel_size[0] > 1


def _block_linears(blocks: nn.Module) -> list[str]:
    """The `nn.Linear` modules of the first block of a non-empty list of same-class blocks (names relative to the
    block), or [] for any other module."""
    children = list(blocks) if isinstance(blocks, BLOCK_LIST_TYPES) else []
    if not children or len({type(block) for block in children}) != 1:
        return []
    return [name for name, module in children[0].named_modules() if isinstance(module, nn.Linear)]


def find_soma_targets(model: nn.Module) -> SomaTargets:
    """The encoder blocks of a vision transformer and the linears in each: the first list of same-class blocks that
    hold `nn.Linear` modules, in the model's module order, after its patch embedding (a module named
    `patch_embedding(s)` or a patchifying `Conv2d`) if it has one. transformers registers a vision tower's embeddings
    before its encoder and a segmenter's backbone before its decoder, so this is the ViT's encoder (DINOv2's
    `encoder.layer`, ViT's `layers`, CLIP's `vision_model.encoder.layers`, not its text tower).

    Raises:
        ValueError: The model has no such list (not a ViT-family model), or already holds PEFT adapter layers.
    """
    adapted = next((name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)), None)
    if adapted is not None:
        raise ValueError(
            f"{type(model).__name__} already has PEFT adapter layers ('{adapted}'): soma_config reads the linears of "
            "the unadapted model, and SoMA's initialisation decomposes the original weights. Call it on the model "
            "before get_peft_model."
        )
    modules = list(model.named_modules())
    start = next((index for index, (name, module) in enumerate(modules) if _is_patch_embedding(name, module)), 0)
    for name, module in modules[start:]:
        linears = _block_linears(module)
        if linears:
            return SomaTargets(block_list=name, num_layers=len(module), linear_names=linears)
    raise ValueError(
        f"SoMA found no list of encoder blocks with linear layers in {type(model).__name__}: it adapts the attention "
        "and MLP linears of a vision transformer's blocks (an nn.ModuleList of same-class blocks after the patch "
        "embedding). Build the LoraConfig by hand for this model, with target_modules naming those linears."
    )


def soma_config(
    model: nn.Module,
    r: int = SOMA_RANK,
    lora_alpha: int = SOMA_ALPHA,
    num_frozen_layers: int | None = None,
    layers_to_transform: list[int] | None = None,
    modules_to_save: list[str] | None = None,
) -> LoraConfig:
    """SoMA's recipe for `model` as a plain PEFT `LoraConfig`: LoRA of rank `r` without dropout on every linear of the
    encoder blocks after the first third, the biases of those linears trained (`bias="lora_only"`). Pass it to
    `peft.get_peft_model`, then call `initialize_soma` on the result (before any training), as PEFT's PiSSA
    initialises from the principal components; save the trained adapter with `save_soma_adapter`.

    What the config needs is read off `model` (`find_soma_targets`): the list of encoder blocks (the first list of
    same-class blocks with linear layers after the patch embedding: DINOv2's `encoder.layer`, ViT's `layers`), its
    length, and the linears of a block (for transformers' DINOv2 and ViT: `attention.q_proj`, `k_proj`, `v_proj`,
    `o_proj`, `mlp.fc1`, `mlp.fc2`). `target_modules` lists those names, `layers_pattern` is the block list's full
    name (escaped as a regex, so that a model's other lists, a text tower or a decoder, are never adapted) and
    `layers_to_transform` the block indices. A model on the meta device works (nothing is computed).

    Args:
        model: A transformers ViT-family model (DINOv2, ViT, their classifiers and backbones, a segmenter over one).
        r: LoRA rank (16 in SoMA).
        lora_alpha: LoRA alpha (16 in SoMA, so scaling alpha / r = 1).
        num_frozen_layers: Blocks at the start left without adapter; default a third of the blocks (8 of 24).
        layers_to_transform: The block indices to adapt instead (0-based); default all after the frozen ones.
            Give this or `num_frozen_layers`, not both.
        modules_to_save: Modules that train and are saved whole besides the adapter (a classifier, a decoder head).

    Returns:
        A `LoraConfig` (peft_type LORA): adapters made with it load with PEFT alone, without rein_peft.

    Raises:
        ValueError: For a model without encoder blocks, a rank or alpha that is not positive, or layer choices that
            do not fit the model.

    Example:
        ```py
        >>> model = Dinov2ForImageClassification.from_pretrained("facebook/dinov2-large", num_labels=10)
        >>> config = rein_peft.soma_config(model, modules_to_save=["classifier"])
        >>> config.layers_to_transform  # [8, ..., 23]
        >>> model = get_peft_model(model, config)
        >>> rein_peft.initialize_soma(model)
        ```
    """
    if r < 1 or lora_alpha <= 0:
        raise ValueError(f"SoMA needs a positive rank and alpha, got r={r} and lora_alpha={lora_alpha}.")
    targets = find_soma_targets(model)
    last = targets.num_layers - 1
    if layers_to_transform is not None and num_frozen_layers is not None:
        raise ValueError(
            f"Give num_frozen_layers ({num_frozen_layers}: adapt blocks {num_frozen_layers} to {last}) or "
            f"layers_to_transform ({layers_to_transform}), not both."
        )
    if layers_to_transform is None:
        frozen = targets.num_layers // FROZEN_FRACTION_DENOMINATOR if num_frozen_layers is None else num_frozen_layers
        if not 0 <= frozen < targets.num_layers:
            raise ValueError(
                f"num_frozen_layers={frozen}, but {type(model).__name__} has {targets.num_layers} blocks in "
                f"'{targets.block_list}': leave between 0 and {last} of them without adapter."
            )
        layers_to_transform = list(range(frozen, targets.num_layers))
    bad = [index for index in layers_to_transform if not 0 <= index <= last]
    if bad or not layers_to_transform:
        raise ValueError(
            f"layers_to_transform={layers_to_transform} asks for blocks {bad or 'none'}, but {type(model).__name__} "
            f"has {targets.num_layers} blocks in '{targets.block_list}' (0 to {last}): name at least one of them."
        )
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        target_modules=targets.linear_names,
        layers_to_transform=sorted(set(layers_to_transform)),
        layers_pattern=re.escape(targets.block_list),
        bias=SOMA_BIAS,
        modules_to_save=modules_to_save,
    )
