"""SoMA (CVPR 2025) with PEFT's own LoRA: `soma_config`, `initialize_soma`, `save_soma_adapter` and the official
segmenter's method "soma". The initialisation is checked against a plain rewrite of its definition, the counts at
full size on the meta device, and a trained adapter against plain `PeftModel.from_pretrained` on the unmodified
model."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import FAMILIES, LABELS, assert_same_numbers, build, pixels, tiny_dinov2, train_steps
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_official_segmenter import (
    BACKBONE,
    SIDE,
    _build,
    _labels,
    rein_parameters,
    trainable,
)
from test_official_segmenter import tiny_checkpoint as tiny_checkpoint  # a fixture

import rein_peft
from rein_peft import ReinConfig, initialize_soma, official_segmenter_config, save_soma_adapter, soma_config
from rein_peft.official.segmenter import HEAD_MODULES, apply_method

LINEARS = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")
SOMA_PACKAGE = Path(rein_peft.__file__).parent / "tuners" / "soma"


def reference_soma(weight: torch.Tensor, rank: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The definition, written out: full SVD in float32, the `rank` smallest singular values (found by sorting, not
    by position), s = alpha / rank, A = diag(sqrt(S_r / s)) Vh_r, B = U_r diag(sqrt(S_r / s)), residual W - s B A."""
    weight = weight.to(torch.float32)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    smallest = torch.argsort(s)[:rank].sort().values  # in the SVD's order
    scaling = alpha / rank
    root = torch.diag(torch.sqrt(s[smallest] / scaling))
    lora_a = root @ vh[smallest, :]
    lora_b = u[:, smallest] @ root
    return lora_a, lora_b, weight - scaling * lora_b @ lora_a


def soma_model(base: torch.nn.Module, **config_kwargs) -> PeftModel:
    model = get_peft_model(base, soma_config(base, **config_kwargs))
    initialize_soma(model)
    return model


@pytest.mark.numerics
def test_factors_and_residual_are_the_definition():
    torch.manual_seed(0)
    base = tiny_dinov2(num_layers=6)
    original = {
        name: module.weight.detach().clone() for name, module in base.named_modules() if name.endswith(LINEARS)
    }
    model = soma_model(base, r=4, lora_alpha=8, modules_to_save=["classifier"])
    layers = {name.removeprefix("base_model.model."): module for name, module in model.named_modules()}
    adapted = sorted(name for name in original if hasattr(layers[name], "lora_A"))
    assert adapted == sorted(f"dinov2.encoder.layer.{index}.{linear}" for index in range(2, 6) for linear in LINEARS)
    for name in adapted:
        module = layers[name]
        lora_a, lora_b, residual = reference_soma(original[name], rank=4, alpha=8)
        got_a, got_b = module.lora_A["default"].weight, module.lora_B["default"].weight
        # singular vectors are defined up to a sign per triplet: align each triplet's sign before comparing
        signs = torch.sign((got_a * lora_a).sum(dim=1))
        assert_same_numbers(got_a, signs[:, None] * lora_a)
        assert_same_numbers(got_b, lora_b * signs[None, :])
        assert_same_numbers(module.get_base_layer().weight, residual)
        assert module.scaling["default"] == 2.0
    for name in set(original) - set(adapted):  # the first third: untouched
        assert torch.equal(layers[name].weight, original[name])


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["dinov2", "vit"])
def test_output_at_initialisation_is_the_base_models(family):
    base = build(FAMILIES[family])
    images = pixels(2, seed=4)
    with torch.no_grad():
        expected = base(pixel_values=images).logits
    model = soma_model(base, modules_to_save=["classifier"]).eval()  # rank 16 of width 32: half the spectrum moves
    with torch.no_grad():
        output = model(pixel_values=images).logits
        with pytest.warns(UserWarning, match="bias configured to be 'lora_only'"), model.disable_adapter():
            residual_only = model(pixel_values=images).logits
    assert_same_numbers(output, expected)
    assert (residual_only - expected).abs().max() > 1e-3  # the adapter holds a visible part of the weights


def test_classification_gets_soma_through_peft(capsys):
    """A ViT classifier, SoMA's recipe read off its structure: the last 2 of 3 blocks, their linears and biases."""
    base = tf.ViTForImageClassification(
        tf.ViTConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            num_labels=LABELS,
        )
    )
    config = soma_config(base, modules_to_save=["classifier"])
    assert isinstance(config, LoraConfig) and type(config) is LoraConfig
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (16, 16, 0.0, "lora_only")
    assert config.layers_to_transform == [1, 2] and set(config.target_modules) == set(LINEARS)
    model = soma_model(base, modules_to_save=["classifier"])
    counts = trainable(model)
    lora = {name: count for name, count in counts.items() if "lora_" in name}
    biases = {name: count for name, count in counts.items() if name.endswith("base_layer.bias")}
    assert all(".layers.1." in name or ".layers.2." in name for name in [*lora, *biases])
    per_block = 4 * 16 * (32 + 32) + 2 * 16 * (32 + 64)  # A and B of q, k, v, o and of fc1, fc2
    assert sum(lora.values()) == 2 * per_block
    assert sum(biases.values()) == 2 * (4 * 32 + 64 + 32)
    classifier = sum(count for name, count in counts.items() if "classifier" in name)
    assert sum(counts.values()) == sum(lora.values()) + sum(biases.values()) + classifier
    losses = train_steps(
        model,
        pixels(4, seed=1),
        torch.tensor([0, 1, 2, 0]),
        torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-2),
        steps=3,
    )
    assert losses[-1] < losses[0]


def test_only_the_vision_tower_of_clip_is_adapted():
    """CLIP's text tower has blocks of the same linears under the same list name: layers_pattern names the vision
    encoder's full path, so they stay untouched."""
    base = build(FAMILIES["clip"])
    config = soma_config(base, num_frozen_layers=1)
    assert config.layers_pattern == r"vision_model\.encoder\.layers" and config.layers_to_transform == [1]
    model = soma_model(base, num_frozen_layers=1)
    adapted = [name for name, _ in model.named_modules() if name.endswith("lora_A")]
    assert adapted and all(".vision_model.encoder.layers.1." in name for name in adapted)
    assert len(adapted) == 6  # q, k, v, out_proj, fc1, fc2 of one block


def test_full_size_trainable_count_is_somas(capsys):
    """DINOv2-L in the official segmenter, on the meta device: rank 16 on 6 linears of blocks 8-23, their biases."""
    config = official_segmenter_config()
    counts = {}
    for method in ("soma", "rein", "frozen"):
        with torch.device("meta"):
            counts[method] = trainable(apply_method(tf.Mask2FormerForUniversalSegmentation(config), method))
    lora = {name: count for name, count in counts["soma"].items() if ".lora_" in name}
    biases = sum(count for name, count in counts["soma"].items() if name.endswith(".base_layer.bias"))
    blocks = {int(name.split(".encoder.layer.")[1].split(".")[0]) for name in lora}
    assert blocks == set(range(8, 24))
    per_block = 4 * 16 * (1024 + 1024) + 2 * 16 * (1024 + 4096)  # q, k, v, o: 1024 -> 1024; fc1, fc2: 1024 <-> 4096
    assert per_block == 294_912 and sum(lora.values()) == 16 * per_block == 4_718_592
    assert biases == 16 * (4 * 1024 + 4096 + 1024) == 147_456
    head = sum(counts["frozen"].values())
    assert sum(counts["soma"].values()) == 4_718_592 + 147_456 + head
    rein = sum(count for name, count in counts["rein"].items() if ".rein.rein_" in name and "query_feat" not in name)
    assert rein == rein_parameters(24, 100, 16, 1024, 256) == 2_990_081
    print(
        f"trainable backbone parameters, DINOv2-L: SoMA {4_718_592 + 147_456:,} (LoRA {4_718_592:,} + biases "
        f"{biases:,}), Rein {rein:,}; the head {head:,} in both"
    )


@pytest.mark.numerics
def test_trained_adapter_loads_into_the_unmodified_model_with_plain_peft(tmp_path):
    torch.manual_seed(0)
    tiny_dinov2(num_layers=3).save_pretrained(tmp_path / "base")
    base = tf.Dinov2ForImageClassification.from_pretrained(tmp_path / "base").eval()
    model = soma_model(base, r=4, lora_alpha=4, modules_to_save=["classifier"])
    initial_a = model.base_model.model.dinov2.encoder.layer[2].mlp.fc1.lora_A["default"].weight.detach().clone()
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-2)
    train_steps(model, pixels(4, seed=1), torch.tensor([0, 1, 2, 0]), optimizer, steps=3)
    model.eval()
    assert (
        model.base_model.model.dinov2.encoder.layer[2].mlp.fc1.lora_A["default"].weight - initial_a
    ).abs().max() > 1e-3
    images = pixels(2, seed=5)
    with torch.no_grad():
        expected = model(pixel_values=images).logits
    save_soma_adapter(model, tmp_path / "soma")

    saved = json.loads((tmp_path / "soma" / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["r"], saved["lora_alpha"], saved["bias"]) == ("LORA", 8, 8, "lora_only")
    assert saved["init_lora_weights"] is True and saved["layers_to_transform"] == [1, 2]
    tensors = load_file(tmp_path / "soma" / "adapter_model.safetensors")
    fc1 = "base_model.model.dinov2.encoder.layer.2.mlp.fc1"
    assert tensors[f"{fc1}.lora_A.weight"].shape == (8, 32) and tensors[f"{fc1}.lora_B.weight"].shape == (128, 8)
    assert torch.equal(tensors[f"{fc1}.lora_A.weight"][4:], initial_a)  # [A; A0]
    factors = sum(tensor.numel() for key, tensor in tensors.items() if ".lora_" in key)
    biases = sum(tensor.numel() for key, tensor in tensors.items() if key.endswith(".base_layer.bias"))
    assert factors == 2 * (4 * 8 * (32 + 32) + 2 * 8 * (32 + 128))  # rank 2r in 2 blocks; DINOv2's MLP is 4 x 32 wide
    assert biases == 2 * (4 * 32 + 128 + 32)
    assert {key for key in tensors if "classifier" in key} == {
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    }
    size = (tmp_path / "soma" / "adapter_model.safetensors").stat().st_size
    print(f"SoMA adapter file, 2 blocks of width 32 at rank 2 x 4 + classifier: {size:,} bytes")

    fresh = tf.Dinov2ForImageClassification.from_pretrained(tmp_path / "base").eval()  # never initialised
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "soma").eval()
    with torch.no_grad():
        output = loaded(pixel_values=images).logits
        with pytest.warns(UserWarning, match="bias configured to be 'lora_only'"), loaded.disable_adapter():
            untrained = loaded(pixel_values=images).logits
    assert_same_numbers(output, expected)
    assert (untrained - expected).abs().max() > 1e-3


@pytest.mark.numerics
def test_an_adapter_saved_as_trained_resumes_in_a_model_initialised_again(tmp_path):
    """`save_pretrained` keeps the rank-r adapter for the residual weights (to resume, as `Trainer` does with
    `load_adapter`); in a model built and initialised again it computes the trained outputs, and `save_soma_adapter`
    from there gives a file for the unmodified model (the initial product B0 A0 is the same)."""
    torch.manual_seed(0)
    tiny_dinov2(num_layers=3).save_pretrained(tmp_path / "base")

    def initialised() -> PeftModel:
        base = tf.Dinov2ForImageClassification.from_pretrained(tmp_path / "base")
        return soma_model(base, r=4, modules_to_save=["classifier"])

    model = initialised()
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-2)
    train_steps(model, pixels(4, seed=1), torch.tensor([0, 1, 2, 0]), optimizer, steps=3)
    model.eval().save_pretrained(tmp_path / "trained")
    images = pixels(2, seed=5)
    with torch.no_grad():
        expected = model(pixel_values=images).logits

    resumed = initialised()
    resumed.load_adapter(tmp_path / "trained", adapter_name="default", is_trainable=True)
    with torch.no_grad():
        assert_same_numbers(resumed.eval()(pixel_values=images).logits, expected)
    save_soma_adapter(resumed, tmp_path / "soma")
    original = tf.Dinov2ForImageClassification.from_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(original, tmp_path / "soma").eval()
    with torch.no_grad():
        assert_same_numbers(loaded(pixel_values=images).logits, expected)


@pytest.mark.numerics
def test_soma_segmenter_builds_trains_saves_and_loads(tiny_checkpoint, tmp_path):
    """The official segmenter with method="soma", scaled down (6 blocks: 2 frozen): at initialisation it computes what
    the unadapted segmenter computes; it trains the adapter, the biases and the head; the saved adapter loads into a
    segmenter built with method="full" (the unmodified model) and gives the trained outputs."""
    model = _build(tiny_checkpoint, "soma")
    unadapted = _build(tiny_checkpoint, "full").eval()
    images = pixels(2, seed=6, side=SIDE)
    with torch.no_grad():
        expected = unadapted(pixel_values=images).masks_queries_logits
        at_init = model.eval()(pixel_values=images).masks_queries_logits
    assert_same_numbers(at_init, expected)

    counts = trainable(model)
    backbone = {name for name in counts if ".encoder.encoder.layer." in name}
    expected_backbone = {
        f"base_model.model.{BACKBONE}.encoder.layer.{index}.{linear}.{part}"
        for index in range(2, 6)
        for linear in LINEARS
        for part in ("lora_A.default.weight", "lora_B.default.weight", "base_layer.bias")
    }
    assert backbone == expected_backbone
    assert all(any(module in name for module in HEAD_MODULES) for name in set(counts) - backbone)
    assert any("class_predictor" in name for name in counts)

    model.train()
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-3)
    for _ in range(2):
        loss = model(pixel_values=pixels(2, seed=3, side=SIDE), **_labels(2)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(pixel_values=images).masks_queries_logits
    save_soma_adapter(model, tmp_path)
    loaded = PeftModel.from_pretrained(unadapted, tmp_path).eval()
    with torch.no_grad():
        output = loaded(pixel_values=images).masks_queries_logits
    assert_same_numbers(output, trained)
    assert (trained - expected).abs().max() > 1e-4


def test_bad_inputs_get_clear_errors(tmp_path):
    base = tiny_dinov2(num_layers=3)
    with pytest.raises(ValueError, match=r"num_frozen_layers \(1.*or layers_to_transform \(\[2\]\), not both"):
        soma_config(base, num_frozen_layers=1, layers_to_transform=[2])
    with pytest.raises(ValueError, match=r"num_frozen_layers=3, .*has 3 blocks in 'dinov2.encoder.layer'"):
        soma_config(base, num_frozen_layers=3)
    with pytest.raises(ValueError, match=r"layers_to_transform=\[1, 5\] asks for blocks \[5\].* \(0 to 2\)"):
        soma_config(base, layers_to_transform=[1, 5])
    with pytest.raises(ValueError, match="positive rank and alpha, got r=0"):
        soma_config(base, r=0)
    with pytest.raises(ValueError, match="found no list of encoder blocks with linear layers in Sequential"):
        soma_config(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)))

    too_wide = get_peft_model(base, soma_config(base, r=64))
    before = copy.deepcopy(too_wide.state_dict())
    with pytest.raises(ValueError, match=r"rank 64 but its weight is \(32, 32\): the rank must be at most 32"):
        initialize_soma(too_wide)
    after = too_wide.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())  # checked before anything changed
    with pytest.raises(ValueError, match=r"already has PEFT adapter layers \('base_model.model.dinov2.encoder.layer"):
        soma_config(too_wide)
    with pytest.raises(ValueError, match=r"no adapter 'other' \(it has \['default'\]\)"):
        initialize_soma(too_wide, "other")

    dora = get_peft_model(tiny_dinov2(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="uses DoRA"):
        initialize_soma(dora)
    convolution = get_peft_model(tiny_dinov2(), LoraConfig(r=2, target_modules=["projection"]))  # patch embedding
    with pytest.raises(ValueError, match=r"'.*patch_embeddings.projection' wraps a Conv2d .* defined for nn.Linear"):
        initialize_soma(convolution)
    rein = get_peft_model(tiny_dinov2(), ReinConfig(token_length=4))
    with pytest.raises(ValueError, match="is a ReinConfig, not a LoraConfig"):
        initialize_soma(rein)
    plain = get_peft_model(tiny_dinov2(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"not initialised with `rein_peft.initialize_soma`.*save_pretrained"):
        save_soma_adapter(plain, tmp_path)
    initialize_soma(plain)
    with pytest.raises(ValueError, match="already initialised by SoMA.*a second SVD would read the residual"):
        initialize_soma(plain)


def test_the_soma_package_imports_nothing_else_of_rein_peft():
    for path in SOMA_PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name} imports from outside tuners/soma: {ast.unparse(node)}"
                assert not (node.module or "").startswith("rein_peft"), f"{path.name}: {ast.unparse(node)}"
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("rein_peft") for alias in node.names), path.name
