"""Training semantics: what trains, train/eval modes, gradient checkpointing, dtypes, copies."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import FAMILIES, adapted_dinov2, assert_same_numbers, build, pixels, tiny_dinov2, train_steps
from peft import PeftModel, get_peft_model

import rein_peft
from rein_peft import ReinConfig
from rein_peft.tuners.rein.model import find_rein_layers

DROPOUT = {"hidden_dropout_prob": 0.5, "attention_probs_dropout_prob": 0.5, "drop_path_rate": 0.5}


def test_only_adapter_and_saved_modules_train_and_every_token_gets_gradient():
    peft_model = get_peft_model(tiny_dinov2(), ReinConfig(token_length=6, modules_to_save=["classifier"]))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".rein_" in n or "classifier.modules_to_save" in n for n in trainable)
    peft_model.train()
    loss = peft_model(pixels(4), labels=torch.tensor([0, 1, 2, 0])).loss
    loss.backward()
    for name, param in peft_model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    tokens_grad = peft_model.base_model.model.dinov2.encoder.rein.rein_tokens["default"].grad
    assert (tokens_grad.flatten(1).abs().sum(1) > 0).all()  # every layer's tokens, the first layer's included


def test_on_a_cls_only_vit_classifier_the_last_layers_tokens_get_no_gradient():
    # A property of Rein, not a bug (docs/peft-compatibility.md): Rein passes CLS through untouched and
    # ViTForImageClassification reads only CLS, so the last layer's refinement never reaches the loss, and the first
    # layer's reaches it only through the next layer's attention. DINOv2's classifier also averages the patch tokens:
    # there every layer's tokens get a gradient (see test_only_adapter_and_saved_modules_train_and_every_token_...)
    peft_model = get_peft_model(build(FAMILIES["vit"]), ReinConfig(token_length=6))
    peft_model.train()
    peft_model(pixels(4), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    (rein_layer,) = find_rein_layers(peft_model)
    row_gradients = rein_layer.rein_tokens["default"].grad.flatten(1).abs().sum(1)
    assert row_gradients[0] > 0 and row_gradients[1] == 0  # [L] = [2]


def test_frozen_backbone_stays_in_eval_mode_while_training():
    peft_model = get_peft_model(
        tiny_dinov2(**DROPOUT), ReinConfig(token_length=6, modules_to_save=["classifier"], zero_mlp_delta_f=True)
    )
    x = pixels(4)
    peft_model.eval()
    with torch.no_grad():
        eval_features = peft_model(x, output_hidden_states=True).hidden_states[-1]
    peft_model.train()
    with torch.no_grad():
        first = peft_model(x, output_hidden_states=True).hidden_states[-1]
        second = peft_model(x, output_hidden_states=True).hidden_states[-1]
    # no dropout: train mode computes what eval mode computes
    assert_same_numbers(first, second)
    assert_same_numbers(first, eval_features)
    inner = peft_model.base_model.model
    assert peft_model.training and not inner.dinov2.training and not inner.dinov2.encoder.layer[0].training
    assert inner.dinov2.encoder.rein.training and inner.classifier.training
    peft_model.eval()
    assert not inner.dinov2.encoder.rein.training


def test_frozen_modules_can_follow_train_mode():
    peft_model = get_peft_model(
        tiny_dinov2(**DROPOUT), ReinConfig(token_length=6, frozen_modules_follow_train=True)
    ).train()
    x = pixels(4)
    with torch.no_grad():
        first = peft_model(x, output_hidden_states=True).hidden_states[-1]
        second = peft_model(x, output_hidden_states=True).hidden_states[-1]
    assert not torch.equal(first, second)


def _gradients(peft_model, x, labels):
    peft_model.zero_grad()
    peft_model(x, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    torch.manual_seed(0)
    peft_model = adapted_dinov2(modules_to_save=["classifier"])
    x, labels = pixels(4), torch.tensor([0, 1, 2, 0])
    peft_model.train()
    plain = _gradients(peft_model, x, labels)

    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    peft_model.train()
    # layer 1: its input depends on layer 0's adapter tokens, so backward must recompute it (layer 0's input is
    # frozen, so autograd never needs its activations)
    layer = peft_model.base_model.model.dinov2.encoder.layer[1]
    assert layer.gradient_checkpointing and layer.training  # transformers checkpoints only training layers
    attention_calls = []
    handle = layer.attention.register_forward_pre_hook(lambda *args: attention_calls.append(1))
    checkpointed = _gradients(peft_model, x, labels)
    handle.remove()
    assert len(attention_calls) == 2  # the forward, and its recomputation in backward
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert_same_numbers(checkpointed[name], plain[name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_a_float32_adapter(dtype):
    base = tiny_dinov2()
    reference = copy.deepcopy(base)
    config = ReinConfig(token_length=6, lora_dim=4)
    peft_model = get_peft_model(base.to(dtype), config)
    adapter_dtypes = {p.dtype for n, p in peft_model.named_parameters() if ".rein_" in n}
    assert adapter_dtypes == {torch.float32}
    reference_peft = get_peft_model(reference, config)
    reference_peft.load_state_dict(peft_model.state_dict(), strict=False)
    x = pixels(4)
    with torch.no_grad():
        half = peft_model(x.to(dtype)).logits
        full = reference_peft(x).logits
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05)
    peft_model.train()
    peft_model(x.to(dtype), labels=torch.tensor([0, 1, 2, 0])).loss.backward()


def _rein_dtypes(peft_model: torch.nn.Module) -> set[torch.dtype]:
    return {param.dtype for name, param in peft_model.named_parameters() if ".rein_" in name}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_false_keeps_the_base_dtype(dtype, tmp_path):
    # PEFT's contract: autocast_adapter_dtype=False (of get_peft_model, add_adapter, from_pretrained, load_adapter)
    # leaves the adapter in the base model's dtype, a memory-saving choice; the default upcasts it to float32
    config = ReinConfig(token_length=6, lora_dim=4, modules_to_save=["classifier"])

    def base() -> torch.nn.Module:  # seeded: the same base model each time
        return build(FAMILIES["dinov2"]).to(dtype)

    peft_model = get_peft_model(base(), config, autocast_adapter_dtype=False)
    peft_model.add_adapter("other", config, autocast_adapter_dtype=False)
    assert _rein_dtypes(peft_model) == {dtype}
    peft_model.save_pretrained(tmp_path)
    kept = PeftModel.from_pretrained(base(), tmp_path, autocast_adapter_dtype=False)
    kept.load_adapter(tmp_path / "other", "other", autocast_adapter_dtype=False)
    assert _rein_dtypes(kept) == {dtype}
    upcast = PeftModel.from_pretrained(base(), tmp_path)
    upcast.load_adapter(tmp_path / "other", "other")
    assert _rein_dtypes(upcast) == {torch.float32}
    saved = peft_model.state_dict()
    for name, param in upcast.state_dict().items():
        if ".rein_" in name:
            assert torch.equal(param, saved[name].float()), name  # float32 holds every half-precision value exactly
    x = pixels(4).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(kept(x).logits, peft_model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_adapter_refines_within_two_ulps_of_float64(dtype):
    # An adapter in the base model's half precision (autocast_adapter_dtype=False, or `.to(dtype)`) computes the
    # refinement in that precision; measured, each refined value is within 1.25 ulps (float16) and 1 ulp (bfloat16)
    # of the float64 computation, so a bound of 2 ulps
    peft_model = get_peft_model(build(FAMILIES["dinov2"]), ReinConfig(token_length=6))  # default init: scale 1e-3
    reference = copy.deepcopy(peft_model).double()
    peft_model.to(dtype)
    hidden = torch.randn(8, 17, 32, generator=torch.Generator().manual_seed(0)).to(dtype)  # [B, 1 + 16 patches, C]
    with torch.no_grad():
        refined = peft_model.base_model.model.dinov2.encoder.rein.refine(hidden, "default", 0)
        expected = reference.base_model.model.dinov2.encoder.rein.refine(hidden.double(), "default", 0)
    rounded = expected.to(dtype)
    ulp = (torch.nextafter(rounded, torch.full_like(rounded, float("inf"))) - rounded).double()
    assert refined.dtype == dtype
    assert ((refined.double() - expected).abs() <= 2 * ulp).all()


def test_to_dtype_moves_the_adapter_too():
    peft_model = get_peft_model(tiny_dinov2(), ReinConfig(token_length=6)).to("cpu", torch.float64)
    assert {p.dtype for p in peft_model.parameters()} == {torch.float64}
    assert peft_model(pixels(4).double()).logits.dtype == torch.float64


def test_deepcopy_gets_its_own_adapter():
    peft_model = adapted_dinov2()
    x = pixels(4)
    with torch.no_grad():
        before = peft_model(x).logits
        duplicate = copy.deepcopy(peft_model)
        assert_same_numbers(duplicate(x).logits, before)
        duplicate.base_model.model.dinov2.encoder.rein.rein_delta_f["default"].bias.add_(1.0)
        assert_same_numbers(peft_model(x).logits, before)
        assert not torch.equal(duplicate(x).logits, before)


def test_pickle_round_trip():
    peft_model = adapted_dinov2(lora_dim=4)
    x = pixels(4)
    with torch.no_grad():
        before = peft_model(x).logits
        restored = pickle.loads(pickle.dumps(peft_model))
        assert_same_numbers(restored(x).logits, before)


def test_a_few_steps_of_adamw_lower_the_loss():
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_dinov2(), ReinConfig(token_length=8, modules_to_save=["classifier"]))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    x, labels = pixels(8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    losses = train_steps(peft_model, x, labels, optimizer, steps=30)
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_autocast_matches_float32():
    peft_model = adapted_dinov2(modules_to_save=["classifier"])
    x, labels = pixels(4), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        full = peft_model(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = peft_model(x).logits
    torch.testing.assert_close(mixed.float(), full, rtol=0.05, atol=0.05)
    peft_model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = peft_model(x, labels=labels).loss
    loss.backward()
    tokens = peft_model.base_model.model.dinov2.encoder.rein.rein_tokens["default"]
    assert tokens.dtype == torch.float32 and torch.isfinite(tokens.grad).all() and tokens.grad.abs().sum() > 0


def test_torch_compile_matches_eager():
    peft_model = adapted_dinov2(lora_dim=4)
    x = pixels(4)
    with torch.no_grad():
        eager = peft_model(x).logits
        compiled = torch.compile(peft_model)(x).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_rein_optimizer_recipe_has_no_decay_on_tokens_scale_biases_and_norms():
    peft_model = get_peft_model(tiny_dinov2(), ReinConfig(token_length=6, lora_dim=4, modules_to_save=["classifier"]))
    optimizer = rein_peft.create_rein_optimizer(peft_model, lr=1e-4, weight_decay=0.05)
    names = {id(p): n for n, p in peft_model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in group["params"]} for group in optimizer.param_groups)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.0]
    # the weight matrices of token2feat, delta_f and the head
    assert len(decay) == 3 and all(name.endswith(".weight") for name in decay)
    assert any("rein_tokens_a" in n for n in no_decay) and any("rein_scale" in n for n in no_decay)
    assert all(name.endswith((".bias", ".default")) for name in no_decay)
    assert decay | no_decay == {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert optimizer.defaults["betas"] == (0.9, 0.999) and isinstance(optimizer, torch.optim.AdamW)
