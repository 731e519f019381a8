"""Official Rein checkpoints (mmseg `backbone.reins.*` tensors) convert into adapters with the same numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_numbers, tiny_dinov2
from peft import PeftModel
from reference import ReferenceRein

from rein_peft import OfficialCheckpointError, convert_official_checkpoint

# compares separately computed numbers: scripts/test.sh runs these tests again under OMP_NUM_THREADS=1
pytestmark = pytest.mark.numerics

LAYERS, TOKENS, HIDDEN, RANK, QUERY = 2, 6, 32, 4, 8


def official_state_dict(
    low_rank: bool,
    linked: bool,
    with_scale: bool = True,
    seed: int = 0,
    sizes: tuple[int, int, int, int] = (LAYERS, TOKENS, HIDDEN, RANK),
) -> dict:
    """Tensors shaped and named as the official Reins / LoRAReins modules save them, inside an mmseg model; `sizes`:
    layers, tokens, width and rank."""
    layers, tokens, hidden, rank = sizes
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.5

    tensors = {
        "mlp_token2feat.weight": rand(hidden, hidden),
        "mlp_token2feat.bias": rand(hidden),
        "mlp_delta_f.weight": rand(hidden, hidden),
        "mlp_delta_f.bias": rand(hidden),
    }
    if with_scale:
        tensors["scale"] = torch.tensor(0.7)  # 0-dim, as in the official code
    if low_rank:
        tensors["learnable_tokens_a"] = rand(layers, tokens, rank)
        tensors["learnable_tokens_b"] = rand(layers, rank, hidden)
    else:
        tensors["learnable_tokens"] = rand(layers, tokens, hidden)
    if linked:
        tensors.update(
            {
                "transform.weight": rand(QUERY, hidden),
                "transform.bias": rand(QUERY),
                "merge.weight": rand(QUERY, 3 * QUERY),
                "merge.bias": rand(QUERY),
            }
        )
    return tensors


def mmseg_checkpoint(tensors: dict) -> dict:
    """`tensors` as the official Rein module's in a checkpoint file of mmseg's layout."""
    state_dict = {f"backbone.reins.{name}": tensor for name, tensor in tensors.items()}
    state_dict["decode_head.conv_seg.weight"] = torch.zeros(3, 3)  # other parts of the segmentor are ignored
    return {"meta": {}, "state_dict": state_dict}


@pytest.mark.parametrize("low_rank", [False, True])
@pytest.mark.parametrize("linked", [False, True])
def test_converted_adapter_computes_the_official_numbers(tmp_path, low_rank, linked):
    tensors = official_state_dict(low_rank, linked)
    torch.save(mmseg_checkpoint(tensors), tmp_path / "iter_40000.pth")
    torch.manual_seed(0)
    base = tiny_dinov2(classifier=False)
    reference_model = copy.deepcopy(base)

    peft_model = convert_official_checkpoint(tmp_path / "iter_40000.pth", base, output_dir=tmp_path / "adapter")
    config = peft_model.peft_config["default"]
    assert config.token_length == TOKENS and config.link_token_to_query == linked
    assert config.lora_dim == (RANK if low_rank else None)

    reference = ReferenceRein(tensors)
    reference.attach(list(reference_model.encoder.layer), batch_first=True, num_prefix=1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_model(x).last_hidden_state
        assert (peft_model(x).last_hidden_state - expected).abs().max().item() <= 1e-5
        if linked:
            assert (peft_model.get_queries() - reference.queries()).abs().max().item() <= 1e-5
        # the saved adapter loads back to the same numbers
        torch.manual_seed(0)
        reloaded = PeftModel.from_pretrained(tiny_dinov2(classifier=False), tmp_path / "adapter")
        assert_same_numbers(reloaded(x).last_hidden_state, peft_model(x).last_hidden_state)


def test_official_zero_mlp_delta_f_checkpoint_has_no_scale():
    tensors = official_state_dict(low_rank=False, linked=False, with_scale=False)
    torch.manual_seed(0)
    base = tiny_dinov2(classifier=False)
    reference_model = copy.deepcopy(base)
    peft_model = convert_official_checkpoint(tensors, base)
    assert peft_model.peft_config["default"].zero_mlp_delta_f
    reference = ReferenceRein(tensors)
    reference.attach(list(reference_model.encoder.layer), batch_first=True, num_prefix=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (peft_model(x).last_hidden_state - reference_model(x).last_hidden_state).abs().max() <= 1e-5


def test_checkpoint_for_another_depth_is_refused():
    tensors = official_state_dict(low_rank=False, linked=False)
    with pytest.raises(ValueError, match=r"'rein_tokens' has shape \[2, 6, 32\], but this model needs \[3, 6, 32\]"):
        convert_official_checkpoint(tensors, tiny_dinov2(num_layers=3, classifier=False))


def test_checkpoint_without_rein_tensors_is_refused():
    with pytest.raises(ValueError, match="no 'reins.\\*' tensors"):
        convert_official_checkpoint({"backbone.blocks.0.weight": torch.zeros(1)}, tiny_dinov2(classifier=False))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"scale": torch.tensor([0.7, 0.7])},
            r"'backbone\.reins\.scale' has shape \[2\], expected \[\] \(0-dim: the official Reins' one "
            r"learned scale\)",
        ),
        ({"scale": 0.7}, r"'backbone\.reins\.scale': 'float'.*pass torch\.tensor\(value\)"),
        (
            {"learnable_tokens": None},
            r"'backbone\.reins\.learnable_tokens' is missing: the official Reins saves 'learnable_tokens' "
            r"\[layers, tokens, width\]",
        ),
        (
            {"mlp_delta_f.weight": torch.zeros(HIDDEN, HIDDEN + 1)},
            r"'backbone\.reins\.mlp_delta_f\.weight' has shape \[32, 33\], expected \['width', 'width'\] with "
            r"layers=2, tokens=6, width=32",
        ),
        (
            {"merge.weight": torch.zeros(QUERY, 2 * QUERY)},
            r"'backbone\.reins\.merge\.weight' has shape \[8, 16\], expected \['queries', '3 \* queries'\]",
        ),
        ({"merge.bias": None}, r"query linking needs .* the checkpoint has only"),
        ({"learnable_tokens": torch.zeros(LAYERS, TOKENS, HIDDEN, dtype=torch.long)}, r"holds torch\.int64 values"),
    ],
    ids=["scale-shape-2", "scale-float", "no-tokens", "wrong-width", "wrong-merge", "half-linking", "int-tokens"],
)
def test_ill_formed_rein_tensors_are_named_in_the_official_names(change, message):
    tensors = official_state_dict(low_rank=False, linked=True)
    for name, value in change.items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    base = tiny_dinov2(classifier=False)
    before = {key: value.clone() for key, value in base.state_dict().items()}
    with pytest.raises(OfficialCheckpointError, match=message):
        convert_official_checkpoint(mmseg_checkpoint(tensors)["state_dict"], base)
    assert not hasattr(base, "peft_config")
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_low_rank_tokens_must_agree_on_their_rank():
    tensors = official_state_dict(low_rank=True, linked=False)
    tensors["learnable_tokens_b"] = torch.zeros(LAYERS, RANK + 1, HIDDEN)
    with pytest.raises(OfficialCheckpointError, match=r"'learnable_tokens_b' has shape \[2, 5, 32\], .* rank=4"):
        convert_official_checkpoint(tensors, tiny_dinov2(classifier=False))
    del tensors["learnable_tokens_a"]
    with pytest.raises(OfficialCheckpointError, match=r"'learnable_tokens_a' is missing: .*LoRAReins"):
        convert_official_checkpoint(tensors, tiny_dinov2(classifier=False))
