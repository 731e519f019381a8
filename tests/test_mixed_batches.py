"""Mixed-adapter batches: `peft_model(pixel_values=x, adapter_names=[...])` runs each sample with its own adapter
(or none) and its own head, as running it alone would."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_numbers, build, pixels, randomize_adapter, tiny_dinov2
from peft import get_peft_model

from rein_peft import ReinConfig

# compares separately computed numbers: scripts/test.sh runs these tests again under OMP_NUM_THREADS=1
pytestmark = pytest.mark.numerics

TOLERANCE = 1e-5


def _three_adapters() -> torch.nn.Module:
    """A tiny DINOv2 classifier with adapters of different token lengths and ranks, each with its own classifier."""
    peft_model = get_peft_model(tiny_dinov2(), ReinConfig(token_length=6, modules_to_save=["classifier"]))
    peft_model.add_adapter("low_rank", ReinConfig(token_length=4, lora_dim=2, modules_to_save=["classifier"]))
    peft_model.add_adapter("no_softmax", ReinConfig(token_length=8, use_softmax=False, modules_to_save=["classifier"]))
    randomize_adapter(peft_model, seed=3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator))
    return peft_model.eval()


def _alone(peft_model: torch.nn.Module, inputs: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
    """Each sample run by itself with its adapter active (or with adapters disabled for "__base__")."""
    rows = []
    with torch.no_grad():
        for sample, name in zip(inputs, adapter_names, strict=True):
            if name == "__base__":
                with peft_model.disable_adapter():
                    rows.append(peft_model(pixel_values=sample[None]).logits)
            else:
                peft_model.set_adapter(name)
                rows.append(peft_model(pixel_values=sample[None]).logits)
    return torch.cat(rows)


def test_each_sample_gets_its_own_adapter_and_head():
    peft_model = _three_adapters()
    adapter_names = ["default", "low_rank", "__base__", "no_softmax", "default", "low_rank"]
    inputs = pixels(len(adapter_names))
    with torch.no_grad():
        mixed = peft_model(pixel_values=inputs, adapter_names=adapter_names).logits
    alone = _alone(peft_model, inputs, adapter_names)
    assert (mixed - alone).abs().max().item() <= TOLERANCE
    with torch.no_grad(), peft_model.disable_adapter():
        base = peft_model(pixel_values=inputs).logits
    adapted = [index for index, name in enumerate(adapter_names) if name != "__base__"]
    assert (mixed[adapted] - base[adapted]).abs().min().item() > 1e-3  # the adapters change every adapted sample
    # the active adapter plays no part, and nothing of the mixed batch stays behind
    peft_model.set_adapter("low_rank")
    with torch.no_grad():
        again = peft_model(pixel_values=inputs, adapter_names=adapter_names).logits
        plain = peft_model(pixel_values=inputs).logits
    assert_same_numbers(again, mixed)
    assert (plain - _alone(peft_model, inputs, ["low_rank"] * len(inputs))).abs().max().item() <= TOLERANCE


def test_every_family_mixes_adapters(family):
    peft_model = get_peft_model(build(family), ReinConfig(token_length=5))
    peft_model.add_adapter("other", ReinConfig(token_length=3, lora_dim=2))
    peft_model.eval()
    randomize_adapter(peft_model)
    inputs = family.make_inputs(3)
    adapter_names = ["other", "__base__", "default"]
    with torch.no_grad():
        mixed = peft_model(**inputs, adapter_names=adapter_names, output_hidden_states=True)
        expected = []
        for index, name in enumerate(adapter_names):
            sample = {key: value[index : index + 1] for key, value in inputs.items()}
            if name == "__base__":
                with peft_model.disable_adapter():
                    expected.append(peft_model(**sample, output_hidden_states=True))
            else:
                peft_model.set_adapter(name)
                expected.append(peft_model(**sample, output_hidden_states=True))

    def last_hidden(output):
        output = output.vision_model_output if hasattr(output, "vision_model_output") else output
        return output.hidden_states[-1]

    alone = torch.cat([last_hidden(output) for output in expected])
    assert (last_hidden(mixed) - alone).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(
    ("adapter_names", "error", "message"),
    [
        (["default", "low_rank"], ValueError, "`adapter_names` has 2 entries, but the batch has 3 samples"),
        (["default", "typo", "__base__"], ValueError, "adapters this model does not have: ['typo']"),
        ("default", TypeError, "must be a list of adapter names, one per sample"),
    ],
)
def test_bad_adapter_names_are_refused_and_leave_nothing_behind(adapter_names, error, message):
    peft_model = _three_adapters()
    with torch.no_grad():
        expected = peft_model(pixel_values=pixels(3)).logits
        with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
            peft_model(pixel_values=pixels(3), adapter_names=adapter_names)
        after = peft_model(pixel_values=pixels(3)).logits
    assert_same_numbers(after, expected)
    assert peft_model.base_model.model.dinov2.encoder.rein.sample_groups is None


def test_mixed_batches_are_refused_in_training_mode():
    peft_model = _three_adapters().train()
    with pytest.raises(ValueError, match=r"is for inference: call `model.eval\(\)` first"):
        peft_model(pixel_values=pixels(2), adapter_names=["default", "low_rank"])
