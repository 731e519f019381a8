"""rein_peft computes exactly the numbers of REIN.md's math, layer by layer and end to end, on every family."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, build, randomize_adapter
from peft import get_peft_model
from reference import ReferenceRein, official_tensors

from rein_peft import ReinConfig

# compares separately computed numbers: scripts/test.sh runs these tests again under OMP_NUM_THREADS=1
pytestmark = pytest.mark.numerics

TOLERANCE = 1e-5

VARIANTS = {
    "full_rank": {},
    "low_rank": {"lora_dim": 4},
    "no_softmax": {"use_softmax": False},
    "zero_mlp_delta_f": {"zero_mlp_delta_f": True},
    "linked_low_rank": {"lora_dim": 4, "link_token_to_query": True, "query_dims": 8},
}


def _compare(family, variant_kwargs, seed=0):
    base = build(family, seed)
    reference_model = copy.deepcopy(base)
    peft_model = get_peft_model(base, ReinConfig(token_length=6, **variant_kwargs))
    randomize_adapter(peft_model, seed + 1)

    reference = ReferenceRein(official_tensors(peft_model), use_softmax=variant_kwargs.get("use_softmax", True))
    layers = list(reference_model.get_submodule(family.layer_list))
    reference.attach(layers, batch_first=True, num_prefix=family.num_prefix_tokens)

    torch.manual_seed(seed + 2)
    inputs = family.make_inputs(3)
    with torch.no_grad():
        ours = peft_model(**inputs, output_hidden_states=True)
        theirs = reference_model(**inputs, output_hidden_states=True)
        plain = build(family, seed)(**inputs, output_hidden_states=True)
    return ours, theirs, plain, peft_model, reference


def _hidden_states(output):
    # CLIPModel nests the vision tower's outputs
    return output.vision_model_output.hidden_states if hasattr(output, "vision_model_output") else output.hidden_states


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layer_by_layer_and_end_to_end(family, variant):
    ours, theirs, plain, _, _ = _compare(family, VARIANTS[variant])
    ours_hidden, theirs_hidden, plain_hidden = _hidden_states(ours), _hidden_states(theirs), _hidden_states(plain)
    assert len(ours_hidden) == len(theirs_hidden) == len(plain_hidden)
    for layer, (a, b) in enumerate(zip(ours_hidden, theirs_hidden, strict=True)):
        assert (a - b).abs().max().item() <= TOLERANCE, f"layer {layer}"
    # the refinement is really there (and recorded in output_hidden_states)
    assert (ours_hidden[-1] - plain_hidden[-1]).abs().max().item() > 1e-2
    for key in ours.keys():
        a, b = ours[key], theirs[key]
        if isinstance(a, torch.Tensor):
            assert (a - b).abs().max().item() <= TOLERANCE, key


def test_prefix_tokens_pass_through_untouched(family):
    peft_model = get_peft_model(build(family), ReinConfig(token_length=6))
    randomize_adapter(peft_model)
    first_layer = peft_model.base_model.model.get_submodule(family.layer_list)[0]
    layer_outputs = []  # what the first layer itself produced, before Rein's hook refines it

    def record(module, args, output):
        layer_outputs.append((output[0] if isinstance(output, tuple) else output).clone())

    # prepended after Rein's hook, so it runs before it
    first_layer.register_forward_hook(record, prepend=True)
    torch.manual_seed(2)
    with torch.no_grad():
        refined = _hidden_states(peft_model(**family.make_inputs(3), output_hidden_states=True))[1]
    (produced,) = layer_outputs
    prefix = family.num_prefix_tokens
    # the very values the layer produced, copied, whatever the kernels: bit-identical on every machine
    assert torch.equal(refined[:, :prefix], produced[:, :prefix])
    assert not torch.allclose(refined[:, prefix:], produced[:, prefix:])


@pytest.mark.parametrize("lora_dim", [None, 4])
def test_linked_queries_match_reference(lora_dim):
    family = FAMILIES["dinov2"]
    _, _, _, peft_model, reference = _compare(
        family, {"lora_dim": lora_dim, "link_token_to_query": True, "query_dims": 8}
    )
    queries = peft_model.get_queries()
    assert queries.shape == (6, 8)
    assert (queries - reference.queries()).abs().max().item() <= TOLERANCE


def test_queries_need_linking():
    family = FAMILIES["dinov2"]
    peft_model = get_peft_model(build(family), ReinConfig(token_length=6))
    with pytest.raises(ValueError, match="link_token_to_query=True"):
        peft_model.get_queries()
