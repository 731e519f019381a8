"""What the tuners of rein_peft read off a model's structure alike (as PEFT's `tuners_utils` serves its tuners): its
patch embedding and the list of encoder blocks nearest to it. Imports nothing of rein_peft."""

from __future__ import annotations

from torch import nn

PATCH_EMBEDDING_NAMES = ("patch_embedding", "patch_embeddings")
LAYER_LIST_TYPES = (nn.ModuleList, nn.Sequential)


def find_patch_embedding(model: nn.Module) -> str | None:
    """Name of the model's (first) patch embedding, or None."""
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in PATCH_EMBEDDING_NAMES:
            return name
        if isinstance(module, nn.Conv2d) and module.kernel_size == module.stride and module.kernel_size[0] > 1:
            return name
    return None


def common_prefix_length(a: str, b: str) -> int:
    """How many leading dotted parts the module names `a` and `b` share."""
    length = 0
    for part_a, part_b in zip(a.split("."), b.split("."), strict=False):
        if part_a != part_b:
            break
        length += 1
    return length


def is_block_list(module: nn.Module) -> bool:
    """A non-empty `nn.ModuleList` / `nn.Sequential` of same-class blocks that have submodules."""
    blocks = list(module) if isinstance(module, LAYER_LIST_TYPES) else []
    return bool(blocks) and len({type(block) for block in blocks}) == 1 and bool(list(blocks[0].children()))


def find_layer_list(model: nn.Module, anchor_name: str) -> str | None:
    """Name of the list of same-class blocks closest to `anchor_name` (ties: the larger one)."""
    candidates = []
    for name, module in model.named_modules():
        if not is_block_list(module):
            continue
        num_params = sum(p.numel() for p in module.parameters())
        candidates.append((common_prefix_length(name, anchor_name), num_params, name))
    return max(candidates)[2] if candidates else None
