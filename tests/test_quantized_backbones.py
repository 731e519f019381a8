"""Quantized frozen backbones (torchao int8 weight-only, on CPU): Rein trains a float32 adapter on them, adapters move
between int8 and float32 backbones, and what cannot be quantized is refused."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import assert_same_numbers, pixels, randomize_adapter, tiny_dinov2, train_steps
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import rein_peft
from rein_peft import ReinConfig

pytest.importorskip("torchao")  # the `quantization` extra
from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: E402


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def _int8_copy(peft_model: torch.nn.Module) -> torch.nn.Module:
    """The same model, adapter included, with its backbone's linear layers in int8."""
    copy = get_peft_model(tiny_dinov2(), ReinConfig(token_length=6, modules_to_save=["classifier"]))
    copy.load_state_dict(peft_model.state_dict())
    quantize_(copy, Int8WeightOnlyConfig(), filter_fn=rein_peft.is_backbone_linear)
    return copy


def test_int8_backbone_trains_a_float32_adapter_close_to_full_precision():
    full = get_peft_model(tiny_dinov2(), ReinConfig(token_length=6, modules_to_save=["classifier"]))
    randomize_adapter(full)
    model = _int8_copy(full)
    fc1 = model.base_model.model.dinov2.encoder.layer[0].mlp.fc1
    assert type(fc1.weight).__name__ == "Int8Tensor" and not fc1.weight.requires_grad
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in trainable.values())
    assert all(".rein_" in name or ".modules_to_save." in name for name in trainable)

    x = pixels(4)
    with torch.no_grad():
        assert _relative_error(model.eval()(x).logits, full.eval()(x).logits) < 0.05  # int8 vs float32 backbone

    labels = torch.tensor([0, 1, 2, 0])
    losses = train_steps(model, x, labels, rein_peft.create_rein_optimizer(model, lr=1e-2), steps=10)
    assert losses[-1] < 0.8 * losses[0]
    assert all(param.dtype == torch.float32 for param in trainable.values())


def test_adapters_move_between_int8_and_full_precision_backbones(tmp_path):
    base_folder, adapter_folder = tmp_path / "base", tmp_path / "adapter"
    base = tiny_dinov2()
    base.save_pretrained(base_folder)
    full = get_peft_model(base, ReinConfig(token_length=6, modules_to_save=["classifier"]))
    randomize_adapter(full)
    full.save_pretrained(adapter_folder)
    x = pixels(3)
    with torch.no_grad():
        expected = full.eval()(x).logits

    # full precision -> int8, quantized by transformers while loading (the head stays in full precision)
    quantization = tf.TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=["classifier"])
    int8_base = tf.Dinov2ForImageClassification.from_pretrained(base_folder, quantization_config=quantization)
    assert type(int8_base.dinov2.encoder.layer[0].attention.q_proj.weight).__name__ == "Int8Tensor"
    int8_model = PeftModel.from_pretrained(int8_base, adapter_folder).eval()
    with torch.no_grad():
        assert _relative_error(int8_model(x).logits, expected) < 0.05

    # int8 -> full precision: an adapter saved from the int8 model loads into the float32 one
    int8_model.save_pretrained(tmp_path / "from_int8")
    saved = load_file(tmp_path / "from_int8" / "adapter_model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in saved.values())
    full_base = tf.Dinov2ForImageClassification.from_pretrained(base_folder)
    reloaded = PeftModel.from_pretrained(full_base, tmp_path / "from_int8").eval()
    with torch.no_grad():
        assert_same_numbers(reloaded(x).logits, expected)


def test_int8_backbone_takes_further_adapters():
    model = get_peft_model(tiny_dinov2(), ReinConfig(token_length=6, modules_to_save=["classifier"]))
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=rein_peft.is_backbone_linear)
    assert type(model.base_model.model.classifier.original_module.weight) is torch.nn.Parameter  # copies come from it
    model.add_adapter("second", ReinConfig(token_length=4, lora_dim=2, modules_to_save=["classifier"]))
    model.set_adapter("second")
    assert model(pixels(2)).logits.shape == (2, 3)


def test_quantizing_rein_tensors_is_refused():
    model = get_peft_model(tiny_dinov2(), ReinConfig(token_length=6))
    quantize_(model, Int8WeightOnlyConfig())  # every nn.Linear, Rein's own included
    with pytest.raises(ValueError, match=r"rein_token2feat.weight.*quantized.*is_backbone_linear"):
        model(pixels(2))


def test_a_quantized_module_to_save_is_refused(tmp_path):
    tiny_dinov2().save_pretrained(tmp_path)
    quantized = tf.Dinov2ForImageClassification.from_pretrained(
        tmp_path, quantization_config=tf.TorchAoConfig(Int8WeightOnlyConfig())
    )
    with pytest.raises(ValueError, match=r"'classifier'.*quantized.*can do neither.*modules_to_not_convert"):
        get_peft_model(quantized, ReinConfig(token_length=6, modules_to_save=["classifier"]))
