"""Released SoMA checkpoints (github ysj9909/SoMA) convert onto the segmenter as SoMA's PEFT LoRA adapter.

The SoMA names and shapes below are written from SoMA's code: its `SoraModel` keeps the DINOv2 as `backbone.model`,
q, k and v are separate linears with LoRA factors A `[r, in]`, B `[out, r]` in blocks `start_lora_idx` onwards, and
`tools/extract_soma_weights.py` keeps those factors, every backbone bias, the mask token and the `decode_head`. The
reference puts the effective weights into a plain copy of the model: W + s B A on the original W (what SoMA's
`tools/test.py` computes from the merged file), or on the residual W - U_r S_r Vh_r (SoMA's initialisation).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_same_numbers, pixels
from peft import PeftModel
from test_convert_head import (
    BACKBONE_LAYERS,
    DINO,
    IMAGE,
    C,
    official_backbone_table,
    official_head_table,
    synthetic_checkpoint,
    tiny_mask2former,
)

import rein_peft
from rein_peft import OfficialCheckpointError, convert_soma_checkpoint, map_soma_checkpoint
from rein_peft.official.segmenter import apply_method
from rein_peft.tuners.soma import SOMA_RANK

RANK, START = 4, BACKBONE_LAYERS // 3  # SoMA leaves the first third of the blocks without adapter
MLP = 4 * C
# SoMA's linear (in block i) -> transformers' DINOv2 linear, [out, in]
LINEARS = {
    "attn.q": ("attention.q_proj", C, C),
    "attn.k": ("attention.k_proj", C, C),
    "attn.v": ("attention.v_proj", C, C),
    "attn.proj": ("attention.o_proj", C, C),
    "mlp.fc1": ("mlp.fc1", MLP, C),
    "mlp.fc2": ("mlp.fc2", C, MLP),
}


def soma_backbone_table() -> list[tuple[str, tuple, str]]:
    """(SoMA key, shape, model key) of the backbone tensors a released file keeps besides the factors."""
    rows = [
        ("backbone.model.mask_token", (1, C), f"{DINO}.embeddings.mask_token"),
        ("backbone.model.patch_embed.proj.bias", (C,), f"{DINO}.embeddings.patch_embeddings.projection.bias"),
        ("backbone.model.norm.bias", (C,), f"{DINO}.layernorm.bias"),
    ]
    for i in range(BACKBONE_LAYERS):
        block, layer = f"backbone.model.blocks.{i}", f"{DINO}.encoder.layer.{i}"
        rows += [(f"{block}.{norm}.bias", (C,), f"{layer}.{norm}.bias") for norm in ("norm1", "norm2")]
        rows += [(f"{block}.{soma}.bias", (out,), f"{layer}.{hf}.bias") for soma, (hf, out, _) in LINEARS.items()]
    return rows


def soma_factor_table(rank: int = RANK) -> list[tuple[str, tuple, str]]:
    """(SoMA key, shape, model linear) of every LoRA factor."""
    rows = []
    for i in range(START, BACKBONE_LAYERS):
        for soma, (hf, out, inp) in LINEARS.items():
            linear = f"{DINO}.encoder.layer.{i}.{hf}"
            rows += [(f"backbone.model.blocks.{i}.{soma}.lora_A.weight", (rank, inp), linear)]
            rows += [(f"backbone.model.blocks.{i}.{soma}.lora_B.weight", (out, rank), linear)]
    return rows


def soma_state_dict(seed: int = 0, rank: int = RANK) -> dict[str, torch.Tensor]:
    """Seeded SoMA tensors: the head as test_convert_head makes it, factors std 1/sqrt(fan-in), biases O(0.3)."""
    head = {key: value for key, value in synthetic_checkpoint(linked=False, backbone=False, seed=seed).items()}
    state_dict = {key: value for key, value in head.items() if key.startswith("decode_head.")}
    generator = torch.Generator().manual_seed(seed + 1)
    for name, shape, _ in soma_backbone_table() + soma_factor_table(rank):
        values = torch.randn(shape, generator=generator)
        state_dict[name] = values / math.sqrt(shape[1]) if len(shape) == 2 else 0.3 * values
    return state_dict


def mmengine_file(state_dict: dict[str, torch.Tensor]) -> dict:
    """The layout of SoMA's released `.pth`: mmengine's meta, the evaluated weights, the EMA hook's other copy."""
    ema = {f"module.{key}": value + 1 for key, value in state_dict.items()} | {"steps": torch.tensor(40000)}
    return {"meta": {"mmseg_version": "1.2.2", "iter": 40000}, "state_dict": state_dict, "ema_state_dict": ema}


def reference_model(
    state_dict: dict[str, torch.Tensor], residual: bool, base: torch.nn.Module | None = None
) -> torch.nn.Module:
    """A plain copy of the segmenter (`base`, default the tiny one) with the checkpoint's tensors and the effective
    weights written in."""
    model = tiny_mask2former() if base is None else base
    tensors = dict(model.state_dict())
    for name, _, target in official_head_table(linked=False):
        parts = state_dict[name].tensor_split(len(target) if isinstance(target, tuple) else 1)
        for key, part in zip(target if isinstance(target, tuple) else (target,), parts, strict=True):
            tensors[key] = part
    for name, _, target in soma_backbone_table():
        tensors[target] = state_dict[name]
    for name, _, linear in soma_factor_table()[::2]:  # each A, then its B
        weight = tensors[f"{linear}.weight"]
        a, b = state_dict[name], state_dict[name.replace("lora_A", "lora_B")]
        if residual:
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # [out, k], [k], [k, in], k = min(out, in)
            weight = weight - u[:, -RANK:] @ torch.diag(s[-RANK:]) @ vh[-RANK:]
        tensors[f"{linear}.weight"] = weight + (RANK / RANK) * b @ a  # scaling alpha / r with alpha = r
    model.load_state_dict(tensors)
    return model.eval()


def test_every_soma_tensor_is_mapped_or_named_unused(tmp_path):
    state_dict = soma_state_dict() | {"data_preprocessor.mean": torch.zeros(3, 1, 1)}
    torch.save(mmengine_file(state_dict), tmp_path / "soma_dinov2-L_g2cbm_best.pth")
    mapping = map_soma_checkpoint(tmp_path / "soma_dinov2-L_g2cbm_best.pth", tiny_mask2former())
    assert (mapping.rank, mapping.layers) == (RANK, list(range(START, BACKBONE_LAYERS)))
    assert set(mapping.unused) == {"data_preprocessor.mean"}
    assert not mapping.rein_tensors
    # the factors as PEFT names them; the head and the backbone as the table says; nothing twice, nothing left out
    factors = {
        f"base_model.model.{linear}.lora_{name.split('.lora_')[1]}": name for name, _, linear in soma_factor_table()
    }
    assert set(mapping.adapter_tensors) == set(factors)
    assert all(torch.equal(mapping.adapter_tensors[key], state_dict[name]) for key, name in factors.items())
    placed = {}
    for name, _, target in official_head_table(linked=False) + soma_backbone_table():
        targets = target if isinstance(target, tuple) else (target,)
        placed |= dict(zip(targets, state_dict[name].tensor_split(len(targets)), strict=True))
    assert set(mapping.model_tensors) == set(placed)
    assert all(torch.equal(mapping.model_tensors[key], value) for key, value in placed.items())
    tables = official_head_table(linked=False) + soma_backbone_table()
    accounted = {name for name, _, _ in tables} | set(factors.values()) | set(mapping.unused)
    assert accounted == set(state_dict)


@pytest.mark.numerics
@pytest.mark.parametrize("residual", [False, True])
def test_the_converted_segmenter_computes_what_the_checkpoint_says(tmp_path, residual):
    state_dict = soma_state_dict(seed=3)
    torch.save(mmengine_file(state_dict), tmp_path / "soma.pth")
    model = convert_soma_checkpoint(tmp_path / "soma.pth", tiny_mask2former(), residual=residual).eval()
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.layers_to_transform) == (RANK, RANK, [1, 2, 3])
    assert config.bias == "lora_only" and "class_predictor" in config.modules_to_save
    images = pixels(2, seed=4, side=IMAGE)
    reference = reference_model(state_dict, residual)
    with torch.no_grad():
        outputs, expected = model(pixel_values=images), reference(pixel_values=images)
    assert_same_numbers(outputs.class_queries_logits, expected.class_queries_logits)
    assert_same_numbers(outputs.masks_queries_logits, expected.masks_queries_logits)
    # the adapted linears' biases train with the factors, as in SoMA
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert f"base_model.model.{DINO}.encoder.layer.{START}.mlp.fc1.base_layer.bias" in trainable
    assert f"base_model.model.{DINO}.encoder.layer.0.mlp.fc1.bias" not in trainable


@pytest.mark.numerics
def test_the_saved_adapter_loads_into_the_unmodified_segmenter_with_plain_peft(tmp_path):
    # as in a released file, the tensors SoMA leaves frozen hold the pretrained values (the adapted linears' biases and
    # the factors are the trained ones): the adapter then carries all the difference
    pretrained = tiny_mask2former().state_dict()
    trained_biases = {f"{linear}.bias" for _, _, linear in soma_factor_table()}
    frozen = {name: pretrained[target] for name, _, target in soma_backbone_table() if target not in trained_biases}
    state_dict = soma_state_dict(seed=5) | frozen
    converted = convert_soma_checkpoint(state_dict, tiny_mask2former(), output_dir=tmp_path / "adapter").eval()
    reloaded = PeftModel.from_pretrained(tiny_mask2former(), tmp_path / "adapter").eval()
    images = pixels(1, seed=6, side=IMAGE)
    with torch.no_grad():
        assert_same_numbers(
            reloaded(pixel_values=images).masks_queries_logits, converted(pixel_values=images).masks_queries_logits
        )


def _refused(state_dict: dict, match: str) -> None:
    base = tiny_mask2former()
    before = {key: value.clone() for key, value in base.state_dict().items()}
    with pytest.raises(OfficialCheckpointError, match=match):
        convert_soma_checkpoint(state_dict, base)
    after = base.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[key], before[key]) for key in before)
    assert not hasattr(base, "peft_config")


def test_checkpoints_that_do_not_fit_are_refused_naming_the_tensor_and_the_model_stays():
    last = f"backbone.model.blocks.{BACKBONE_LAYERS - 1}"
    state_dict = soma_state_dict()
    _refused(
        {k: v for k, v in state_dict.items() if k != f"{last}.attn.v.lora_B.weight"}, r"attn\.v\.lora_A.*no lora_B"
    )
    _refused(state_dict | {f"{last}.mlp.fc1.lora_A.weight": torch.zeros(RANK + 1, C)}, r"ranks \[4, 5\]")
    _refused(state_dict | {f"{last}.mlp.fc2.lora_A.weight": torch.zeros(RANK, C)}, rf"needs \[{RANK}, {MLP}\]")
    _refused(state_dict | {f"{last}.attn.qkv.lora_A.weight": torch.zeros(RANK, C)}, "no rule maps")
    _refused({k: v for k, v in state_dict.items() if ".lora_" not in k}, "no LoRA factors")
    _refused({k: v for k, v in state_dict.items() if "cls_embed" not in k}, "head tensor.*class_predictor")
    wide = state_dict | {
        "decode_head.cls_embed.weight": torch.zeros(9, C),
        "decode_head.cls_embed.bias": torch.zeros(9),
    }
    _refused(wide, r"num_labels=8")
    skipped = {k: v for k, v in state_dict.items() if not k.startswith(f"backbone.model.blocks.{START}.mlp.fc2.lora")}
    _refused(skipped, "no factor for")


def test_it_is_exported():
    assert rein_peft.convert_soma_checkpoint is convert_soma_checkpoint
    assert rein_peft.official.map_soma_checkpoint is map_soma_checkpoint


def merged_backbone(seed: int) -> dict[str, torch.Tensor]:
    """The DINOv2 weights as `tools/merge_soma_weights.py` adds them: SoMA's converted DINOv2 (q, k, v split) under
    `backbone.model.`; seeded values, the biases left to the SoMA file."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape, _ in official_backbone_table():
        if name.endswith("bias"):
            continue
        name = name.replace("backbone.", "backbone.model.", 1)
        values = torch.randn(shape, generator=generator)
        values = values / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 else 1 + 0.1 * values
        for part, split in zip("qkv", values.tensor_split(3), strict=True) if ".qkv." in name else [(None, values)]:
            tensors[name.replace(".qkv.", f".{part}.") if part else name] = split
    return tensors


@pytest.mark.numerics
def test_a_merged_file_brings_its_dinov2_weights():
    state_dict = soma_state_dict(seed=7) | merged_backbone(seed=8)
    mapping = map_soma_checkpoint(state_dict, tiny_mask2former())
    assert f"{DINO}.encoder.layer.0.attention.k_proj.weight" in mapping.model_tensors
    model = convert_soma_checkpoint(state_dict, tiny_mask2former()).eval()
    reference = tiny_mask2former()
    reference.load_state_dict({**reference.state_dict(), **mapping.model_tensors})
    expected_model = reference_model(state_dict, residual=False, base=reference)
    images = pixels(1, seed=9, side=IMAGE)
    with torch.no_grad():
        outputs, expected = model(pixel_values=images), expected_model(pixel_values=images)
    assert_same_numbers(outputs.masks_queries_logits, expected.masks_queries_logits)


@pytest.mark.numerics
def test_residual_conversion_starts_from_the_soma_segmenters_residual():
    # SoMA's rank, as method="soma" builds it (what build_official_segmenter(..., method="soma") returns)
    converted = convert_soma_checkpoint(soma_state_dict(rank=SOMA_RANK), tiny_mask2former(), residual=True)
    built = apply_method(tiny_mask2former(), "soma")
    converted_weights = {n: p for n, p in converted.named_parameters() if n.endswith("base_layer.weight")}
    built_weights = {n: p for n, p in built.named_parameters() if n.endswith("base_layer.weight")}
    assert set(converted_weights) == set(built_weights) and len(built_weights) == 6 * (BACKBONE_LAYERS - START)
    for name, weight in built_weights.items():
        assert_same_numbers(converted_weights[name], weight)


def test_a_model_with_an_adapter_already_is_refused():
    with pytest.raises(OfficialCheckpointError, match="before any adapter"):
        convert_soma_checkpoint(soma_state_dict(), apply_method(tiny_mask2former(), "soma"))
