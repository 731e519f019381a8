"""The fast paths (folded projections, eval-mode cache) equal the reference math, and the cache never goes stale."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build, pixels, randomize_adapter, tiny_dinov2
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from reference import ReferenceRein, official_tensors

from rein_peft import ReinConfig

# compares separately computed numbers: scripts/test.sh runs these tests again under OMP_NUM_THREADS=1
pytestmark = pytest.mark.numerics

TOLERANCE = 1e-5


def _reference_output(base, peft_model, adapter_name="default", use_softmax=True, num_prefix=1):
    reference_model = copy.deepcopy(base)
    reference = ReferenceRein(official_tensors(peft_model, adapter_name), use_softmax=use_softmax)
    reference.attach(list(reference_model.dinov2.encoder.layer), batch_first=True, num_prefix=num_prefix)
    with torch.no_grad():
        return reference_model(pixels(3)).logits


@pytest.mark.parametrize("kwargs", [{}, {"lora_dim": 4}, {"use_softmax": False}, {"zero_mlp_delta_f": True}])
def test_training_path_and_cached_path_equal_the_reference(kwargs):
    base = tiny_dinov2()
    plain = copy.deepcopy(base)
    peft_model = get_peft_model(base, ReinConfig(token_length=6, **kwargs))
    randomize_adapter(peft_model)
    expected = _reference_output(plain, peft_model, use_softmax=kwargs.get("use_softmax", True))
    with_grad = peft_model(pixels(3)).logits  # projections computed in the graph
    with torch.no_grad():
        cached_first = peft_model(pixels(3)).logits  # projections computed and cached
        cached_again = peft_model(pixels(3)).logits  # projections read from the cache
    assert (with_grad.detach() - expected).abs().max().item() <= TOLERANCE
    assert (cached_first - expected).abs().max().item() <= TOLERANCE
    assert torch.equal(cached_again, cached_first)


def test_cache_is_kept_while_weights_are_unchanged():
    peft_model = get_peft_model(tiny_dinov2(), ReinConfig(token_length=6))
    cache = peft_model.base_model.model.dinov2.encoder.rein.projection_cache
    with torch.no_grad():
        peft_model(pixels(3))
        entries = {key: entry[2] for key, entry in cache.items()}
        peft_model(pixels(3))
    # keys and values per layer, and the delta_f weight (residual folded in) that all layers share
    assert set(entries) == {("default", 0), ("default", 1), ("default", "delta_f", True)}
    assert all(cache[key][2] is entries[key] for key in entries)


def _assert_matches_reference(plain, peft_model, adapter_name="default"):
    with torch.no_grad():
        ours = peft_model(pixels(3)).logits
    assert (ours - _reference_output(plain, peft_model, adapter_name)).abs().max().item() <= TOLERANCE


def test_cache_follows_training_steps():
    base = tiny_dinov2()
    plain = copy.deepcopy(base)
    peft_model = get_peft_model(base, ReinConfig(token_length=6, modules_to_save=["classifier"]))
    randomize_adapter(peft_model)
    _assert_matches_reference(plain, peft_model)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model.train()
    peft_model(pixels(3), labels=torch.tensor([0, 1, 2])).loss.backward()
    optimizer.step()
    peft_model.eval()
    # the head trained too, and `plain` keeps the old one: compare the refined features, not the logits
    reference_model = copy.deepcopy(plain)
    reference = ReferenceRein(official_tensors(peft_model))
    reference.attach(list(reference_model.dinov2.encoder.layer), batch_first=True, num_prefix=1)
    with torch.no_grad():
        ours = peft_model(pixels(3), output_hidden_states=True).hidden_states[-1]
        theirs = reference_model(pixels(3), output_hidden_states=True).hidden_states[-1]
    assert (ours - theirs).abs().max().item() <= TOLERANCE


def test_cache_follows_loading_switching_and_deleting():
    base = tiny_dinov2()
    plain = copy.deepcopy(base)
    peft_model = get_peft_model(base, ReinConfig(token_length=6))
    peft_model.add_adapter("other", ReinConfig(token_length=4, lora_dim=2))
    randomize_adapter(peft_model, seed=1)
    _assert_matches_reference(plain, peft_model, "default")

    peft_model.set_adapter("other")  # switching
    _assert_matches_reference(plain, peft_model, "other")

    donor = get_peft_model(tiny_dinov2(), ReinConfig(token_length=4, lora_dim=2))
    randomize_adapter(donor, seed=7)
    set_peft_model_state_dict(peft_model, get_peft_model_state_dict(donor), adapter_name="other")  # loading
    assert torch.equal(
        official_tensors(peft_model, "other")["learnable_tokens_a"], official_tensors(donor)["learnable_tokens_a"]
    )
    _assert_matches_reference(plain, peft_model, "other")

    with torch.no_grad():  # changing a weight in place
        peft_model.base_model.model.dinov2.encoder.rein.rein_delta_f["other"].bias.add_(0.3)
    _assert_matches_reference(plain, peft_model, "other")

    peft_model.to(torch.float64).to(torch.float32)  # replacing the tensors
    _assert_matches_reference(plain, peft_model, "other")

    rein_layer = peft_model.base_model.model.dinov2.encoder.rein
    peft_model.delete_adapter("other")  # deleting
    assert all(key[0] == "default" for key in rein_layer.projection_cache)
    _assert_matches_reference(plain, peft_model, "default")


def test_fast_path_on_every_family_in_both_modes(family):
    base = build(family)
    reference_model = copy.deepcopy(base)
    peft_model = get_peft_model(base, ReinConfig(token_length=6, lora_dim=3))
    randomize_adapter(peft_model)
    reference = ReferenceRein(official_tensors(peft_model))
    reference.attach(list(reference_model.get_submodule(family.layer_list)), True, family.num_prefix_tokens)
    inputs = family.make_inputs(2)
    with torch.no_grad():
        expected = reference_model(**inputs, output_hidden_states=True)
        cached = peft_model(**inputs, output_hidden_states=True)
    graphed = peft_model(**inputs, output_hidden_states=True)
    for ours in (cached, graphed):
        hidden = ours.vision_model_output if hasattr(ours, "vision_model_output") else ours
        theirs = expected.vision_model_output if hasattr(expected, "vision_model_output") else expected
        assert (hidden.hidden_states[-1].detach() - theirs.hidden_states[-1]).abs().max().item() <= TOLERANCE
