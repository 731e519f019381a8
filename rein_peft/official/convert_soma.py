"""Convert a released SoMA checkpoint (github ysj9909/SoMA, `soma_dinov2-L_*_best.pth`) onto the official segmenter
with SoMA's adapter: PEFT LoRA in SoMA's recipe (`rein_peft.soma_config`) and the Mask2Former head.

SoMA's segmentor is an mmseg `EncoderDecoder` whose backbone is its `SoraModel` around the DINOv2, so every backbone
tensor is `backbone.model.<DINOv2 name>`: its LoRA factors `blocks.{i}.attn.{q,k,v,proj}.lora_{A,B}.weight` and
`blocks.{i}.mlp.{fc1,fc2}.lora_{A,B}.weight` (A `[r, in]`, B `[out, r]`; q, k and v are separate linears in SoMA's
DINOv2), and, as `tools/extract_soma_weights.py` keeps them, `mask_token` and every backbone bias (the trained ones of
the adapted linears and the pretrained ones of the rest). `decode_head.*` is mmseg's Mask2Former head in mmdet's names
(the head Rein's checkpoints hold, mapped by the same rules). The frozen weights are not in the file: they come from
the DINOv2 the segmenter was built on. docs/soma.md ("Released checkpoints") lists every name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import Mask2FormerForUniversalSegmentation

from ..tuners.rein.utils import unchanged_on_failure
from ..tuners.soma import initialize_soma, soma_config
from ..utils.compat import peft_deprecations_silenced
from .convert import (
    _HEAD_RULES,
    BACKBONE_RULES,
    MASK2FORMER_DECODER_MODULES,
    MASK2FORMER_HEAD_PREFIXES,
    OFFICIAL_HEAD_PREFIX,
    OFFICIAL_PREPROCESSOR_PREFIX,
    OfficialCheckpointError,
    OfficialCheckpointMapping,
    _compile,
    _dinov2_prefix,
    _head_config_problems,
    _rename,
    load_official_model_tensors,
    place_tensor,
    read_checkpoint,
)

# SoMA's `SoraModel` keeps the DINOv2 it adapts as `.model`, inside the segmentor's `backbone`
SOMA_BACKBONE_PREFIX = "backbone.model."
LORA_MARKER = ".lora_"
# PEFT's state-dict names start with the PeftModel's path to the model it wraps
PEFT_MODEL_PREFIX = "base_model.model."
# SoMA's LoRA factors -> the LoRA layers of transformers' DINOv2 (PEFT names, relative to the DINOv2 module)
SOMA_LORA_RULES: tuple[tuple[str, str], ...] = (
    (
        r"blocks\.(?P<i>\d+)\.attn\.(?P<m>q|k|v)\.lora_(?P<f>A|B)\.weight",
        "encoder.layer.{i}.attention.{m}_proj.lora_{f}.weight",
    ),
    (r"blocks\.(?P<i>\d+)\.attn\.proj\.lora_(?P<f>A|B)\.weight", "encoder.layer.{i}.attention.o_proj.lora_{f}.weight"),
    (r"blocks\.(?P<i>\d+)\.mlp\.(?P<m>fc1|fc2)\.lora_(?P<f>A|B)\.weight", "encoder.layer.{i}.mlp.{m}.lora_{f}.weight"),
)
# SoMA's DINOv2 (`tools/convert_models/convert_dinov2_sora.py`) splits the official fused qkv into q, k and v; the
# other names are the official DINOv2's. A merged file (`tools/merge_soma_weights.py`) has the weights too.
SOMA_BACKBONE_RULES: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    (r"blocks\.(?P<i>\d+)\.attn\.(?P<m>q|k|v)\.(?P<p>weight|bias)", "encoder.layer.{i}.attention.{m}_proj.{p}"),
    *BACKBONE_RULES,
)
_LORA_RULES, _SOMA_BACKBONE_RULES = _compile(SOMA_LORA_RULES), _compile(SOMA_BACKBONE_RULES)
_LORA_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")


@dataclass
class SomaCheckpointMapping(OfficialCheckpointMapping):
    """Where every tensor of a SoMA checkpoint goes (`rein_tensors` stays empty).

    Attributes:
        adapter_tensors: The LoRA factors by their PEFT state-dict names (`...q_proj.lora_A.weight`).
        model_tensors: Head and backbone tensors (biases, mask token, weights if present) by the model's keys.
        unused: Keys that go nowhere -> why.
        rank: The LoRA rank of the factors.
        layers: The DINOv2 blocks that have factors (8 to 23 in SoMA's DINOv2-L).
    """

    rank: int = 0
    layers: list[int] = field(default_factory=list)


def _lora_problems(
    lora: Mapping[str, tuple[str, torch.Tensor]], model_state: Mapping[str, torch.Tensor], prefix: str
) -> tuple[int, list[str]]:
    """The rank the factors share and what does not fit: a factor without its partner, a shape that is not
    A `[r, in]` / B `[out, r]` of the model's linear, ranks that differ. `lora` maps a target name (relative to the
    DINOv2) to its checkpoint key and tensor."""
    problems, ranks = [], set()
    for target, (key, tensor) in lora.items():
        linear, factor = target.rsplit(".lora_", 1)
        partner = f"{linear}.lora_{'B' if factor.startswith('A') else 'A'}.weight"
        if partner not in lora:
            problems.append(f"'{key}' has no {partner.rsplit('.', 2)[1]} beside it")
        weight = model_state.get(f"{prefix}{linear}.weight")
        if weight is None:
            problems.append(f"'{key}' adapts '{prefix}{linear}', which the model does not have")
            continue
        rank = tensor.shape[0] if factor.startswith("A") else tensor.shape[-1]
        expected = [rank, weight.shape[1]] if factor.startswith("A") else [weight.shape[0], rank]
        if tensor.ndim != 2 or list(tensor.shape) != expected:
            problems.append(f"'{key}' has shape {list(tensor.shape)}, the model's linear needs {expected}")
        ranks.add(rank)
    if len(ranks) > 1:
        problems.append(f"the factors have ranks {sorted(ranks)}; SoMA's recipe has one rank for every linear")
    return next(iter(ranks), 0), problems


def map_soma_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor], base_model: nn.Module
) -> SomaCheckpointMapping:
    """Say where every tensor of a SoMA checkpoint goes in `base_model`, without changing it.

    Args:
        checkpoint: A released SoMA file (`.pth` as mmengine writes it, read safely by `read_checkpoint`: its `meta`
            and `ema_state_dict` are dropped, the weights SoMA evaluates are its `state_dict`), or a state dict.
        base_model: The segmenter before SoMA is applied: a `Mask2FormerForUniversalSegmentation` over a DINOv2 (the
            head maps too), or a model with one DINOv2 (the head is then listed as unused).

    Returns:
        A `SomaCheckpointMapping`: every tensor of the checkpoint is in exactly one of its tables.

    Raises:
        OfficialCheckpointError: No LoRA factors, tensors no rule knows, factors without partners, of the wrong shape
            or of different ranks, a head or backbone that does not fit the model (naming the config field to set),
            or head tensors of the model that the checkpoint leaves unset.
    """
    if hasattr(base_model, "peft_config"):
        raise OfficialCheckpointError(
            f"{type(base_model).__name__} has adapters already ({sorted(base_model.peft_config)}); pass the segmenter "
            "before any adapter (e.g. build_official_segmenter(backbone, num_labels, method='full')): the conversion "
            "adds SoMA's adapter itself, and residual=True gives the weights method='soma' starts from."
        )
    state_dict = read_checkpoint(checkpoint)
    model_state = base_model.state_dict()
    prefix = _dinov2_prefix(model_state)
    if prefix is None:
        raise OfficialCheckpointError(
            f"{type(base_model).__name__} has no (single) DINOv2 module; SoMA's checkpoints adapt a DINOv2. Build the "
            "segmenter with rein_peft.build_official_segmenter(backbone, num_labels, method='frozen') or pass its "
            "Mask2FormerForUniversalSegmentation before any adapter."
        )
    whole = isinstance(base_model, Mask2FormerForUniversalSegmentation)
    mapping = SomaCheckpointMapping()
    head, lora, unknown, problems = {}, {}, [], []
    for key, tensor in state_dict.items():
        if key.startswith(OFFICIAL_PREPROCESSOR_PREFIX):
            mapping.unused[key] = "normalisation constants (ImageNet mean/std of 0-255 RGB): the image processor's job"
        elif key.startswith(OFFICIAL_HEAD_PREFIX) and not whole:
            mapping.unused[key] = (
                f"{type(base_model).__name__} has no Mask2Former head; convert into the segmenter to use it"
            )
        elif key.startswith(OFFICIAL_HEAD_PREFIX):
            head[key[len(OFFICIAL_HEAD_PREFIX) :]] = tensor
        elif not key.startswith(SOMA_BACKBONE_PREFIX):
            unknown.append(key)
        elif LORA_MARKER in key:
            targets = _rename(key[len(SOMA_BACKBONE_PREFIX) :], _LORA_RULES)
            if targets is None:
                unknown.append(key)
            else:
                lora[targets[0]] = (key, tensor)
        elif (targets := _rename(key[len(SOMA_BACKBONE_PREFIX) :], _SOMA_BACKBONE_RULES)) is None:
            unknown.append(key)
        else:
            place_tensor(key, tensor, [prefix + t for t in targets], model_state, mapping.model_tensors, problems)
    if unknown:
        raise OfficialCheckpointError(
            f"The checkpoint holds {len(unknown)} tensor(s) that no rule maps: {unknown[:20]}. rein_peft converts "
            f"SoMA's segmentor ({SOMA_BACKBONE_PREFIX}* LoRA factors, biases and DINOv2 weights, a Mask2FormerHead "
            "as decode_head.*); docs/soma.md lists every name it knows."
        )
    if not lora:
        raise OfficialCheckpointError(
            f"The checkpoint has no LoRA factors ('{SOMA_BACKBONE_PREFIX}blocks.<i>...lora_A.weight'); is it a SoMA "
            "checkpoint? A Rein checkpoint (backbone.reins.*) converts with rein_peft.convert_official_checkpoint."
        )
    mapping.rank, lora_problems = _lora_problems(lora, model_state, prefix)
    problems += lora_problems
    mapping.adapter_tensors = {PEFT_MODEL_PREFIX + prefix + target: tensor for target, (_, tensor) in lora.items()}
    mapping.layers = sorted({int(_LORA_LAYER.match(target).group(1)) for target in lora})
    problems += _head_config_problems(head, base_model.config) if head else []
    for name, tensor in head.items():
        key = OFFICIAL_HEAD_PREFIX + name
        if (targets := _rename(name, _HEAD_RULES)) is None:
            unknown.append(key)
        else:
            place_tensor(key, tensor, targets, model_state, mapping.model_tensors, problems)
    if unknown:
        raise OfficialCheckpointError(
            f"The checkpoint's head holds {len(unknown)} tensor(s) that no rule maps: {unknown[:20]}; rein_peft "
            "converts mmseg's Mask2FormerHead (docs/official-checkpoints.md)."
        )
    if head:
        required = [key for key in model_state if key.startswith(MASK2FORMER_HEAD_PREFIXES)]
        missing = [key for key in required if key not in mapping.model_tensors]
        if missing:
            problems.append(f"the checkpoint leaves {len(missing)} head tensor(s) of the model unset: {missing[:20]}")
    if problems:
        raise OfficialCheckpointError(
            f"The SoMA checkpoint does not fit this {type(base_model).__name__}: " + "; ".join(problems) + "."
        )
    return mapping


def convert_soma_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    base_model: nn.Module,
    output_dir: str | os.PathLike | None = None,
    adapter_name: str = "default",
    residual: bool = False,
    lora_alpha: float | None = None,
) -> PeftModel:
    """Put a released SoMA checkpoint onto `base_model` as SoMA's PEFT LoRA adapter (`rein_peft.soma_config`, the
    rank and blocks read off the factors), its biases and head loaded into the model.

    Which frozen weights the factors add to:

    - `residual=False` (default): the original DINOv2 weights W, the layer computing W x + s B A x. This is what
      SoMA's own evaluation computes from these files: `tools/merge_soma_weights.py` puts the original DINOv2
      weights beside the factors and `tools/test.py` loads that merged file into the segmentor, so the published
      numbers are this model's.
    - `residual=True`: the residual W - s B0 A0 that SoMA's initialisation defines (`rein_peft.initialize_soma`
      recomputes it from the DINOv2 weights by SVD; the product of singular triplets does not depend on their signs),
      as the model built with `build_official_segmenter(..., method="soma")` has it. The two differ by the r minor
      singular components of each W.

    Args:
        checkpoint: A released SoMA file or a state dict, as for `map_soma_checkpoint`.
        base_model: The segmenter before any adapter, holding the original DINOv2 weights (e.g.
            `build_official_segmenter(backbone, num_labels, method="full")`), wrapped in place.
        output_dir: If given, the adapter is also saved there with `save_pretrained`.
        adapter_name: Name of the adapter in the returned `PeftModel`.
        residual: See above.
        lora_alpha: LoRA alpha; default the rank (scaling 1), as every SoMA config sets it (the files do not say).

    Returns:
        The `PeftModel`; its head (`modules_to_save`) and the adapted linears' biases train with the factors.

    Raises:
        OfficialCheckpointError: See `map_soma_checkpoint`. On this or any other error `base_model` is left as it
            was.
    """
    mapping = map_soma_checkpoint(checkpoint, base_model)
    has_head = any(key.startswith(MASK2FORMER_HEAD_PREFIXES) for key in mapping.model_tensors)
    config = soma_config(
        base_model,
        r=mapping.rank,
        lora_alpha=mapping.rank if lora_alpha is None else lora_alpha,
        layers_to_transform=mapping.layers,
        modules_to_save=list(MASK2FORMER_DECODER_MODULES) if has_head else None,
    )
    with unchanged_on_failure(base_model):
        load_official_model_tensors(base_model, mapping)
        with peft_deprecations_silenced():
            peft_model = get_peft_model(base_model, config, adapter_name=adapter_name)
        if residual:
            initialize_soma(peft_model, adapter_name=adapter_name)
        state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
        factors = {key for key in state if LORA_MARKER in key}
        extra, unset = sorted(set(mapping.adapter_tensors) - factors), sorted(factors - set(mapping.adapter_tensors))
        if extra or unset:
            raise OfficialCheckpointError(
                f"The checkpoint's factors and SoMA's recipe on {type(base_model).__name__} differ: the recipe has no "
                f"LoRA layer for {extra[:10]} and the checkpoint no factor for {unset[:10]}. SoMA adapts every "
                "attention and MLP linear of the blocks it adapts."
            )
        set_peft_model_state_dict(peft_model, state | mapping.adapter_tensors, adapter_name=adapter_name)
    if output_dir is not None:
        peft_model.save_pretrained(output_dir, selected_adapters=[adapter_name])
    return peft_model
