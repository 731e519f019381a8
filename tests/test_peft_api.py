"""Rein behaves as a PEFT method: get_peft_model, adapters, status, unload, merge errors, discovery errors."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from conftest import FAMILIES, adapted_dinov2, assert_same_numbers, build, pixels, randomize_adapter, tiny_dinov2
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from reference import ReferenceRein, official_tensors
from torch import nn

import rein_peft
from rein_peft import ReinConfig, ReinLayer, ReinMergeError, ReinModel, ReinUnsupportedModelError
from rein_peft.tuners.rein.layer import ReinHook


def _rein_hooks(model: nn.Module) -> list[ReinHook]:
    return [
        hook for module in model.modules() for hook in module._forward_hooks.values() if isinstance(hook, ReinHook)
    ]


def test_get_peft_model_returns_a_real_peft_model():
    peft_model = get_peft_model(tiny_dinov2(), ReinConfig(token_length=6, modules_to_save=["classifier"]))
    assert isinstance(peft_model, PeftModel)
    assert isinstance(peft_model.base_model, ReinModel)
    trainable, total = peft_model.get_nb_trainable_parameters()
    # tokens 2*6*32 + token2feat and delta_f 2*(32*32+32) + scale 1, plus the classifier 64*3+3
    assert trainable == 384 + 2112 + 1 + 195
    assert total == sum(p.numel() for p in tiny_dinov2().parameters()) + 384 + 2112 + 1 + 195
    status = peft_model.get_model_status()
    assert status.peft_types == {"default": "REIN"}
    assert status.active_adapters == ["default"] and status.enabled and status.num_adapter_layers == 2
    assert peft_model.get_layer_status()[0].module_type == "ReinLayer"


def test_registration_is_idempotent():
    before = (
        PEFT_TYPE_TO_CONFIG_MAPPING.copy(),
        PEFT_TYPE_TO_TUNER_MAPPING.copy(),
        PEFT_TYPE_TO_PREFIX_MAPPING.copy(),
    )
    rein_peft.register()
    rein_peft.register()
    assert (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING) == before
    assert PEFT_TYPE_TO_CONFIG_MAPPING["REIN"] is ReinConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING["REIN"] == "rein_"


def test_print_trainable_parameters(capsys):
    get_peft_model(tiny_dinov2(), ReinConfig(token_length=6)).print_trainable_parameters()
    assert "trainable params: 2,497" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("lora_dim", "expected"),
    [(16, 2_990_081), (None, 5_016_065)],
)
def test_parameter_counts_of_a_dinov2_large_sized_adapter(lora_dim, expected):
    config = tf.Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=16)
    with torch.device("meta"):
        base = tf.Dinov2Model(config)
    rein = ReinConfig(lora_dim=lora_dim, link_token_to_query=True, token_length=100, query_dims=256)
    peft_model = get_peft_model(base, rein)
    assert peft_model.get_nb_trainable_parameters()[0] == expected


def test_adapter_file_of_a_dinov2_large_sized_adapter_is_under_12_5_mb(tmp_path):
    config = tf.Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=16)
    with torch.device("meta"):
        base = tf.Dinov2Model(config)
    peft_model = get_peft_model(base, ReinConfig(lora_dim=16, link_token_to_query=True))
    rein_layer = peft_model.base_model.model.encoder.rein
    rein_layer.to_empty(device="cpu")  # materialise only the adapter; the 300M base parameters stay on meta
    peft_model.save_pretrained(tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert 2_990_081 * 4 <= size < 12.5e6


def test_multiple_adapters_set_delete_and_disable():
    base = tiny_dinov2()
    x = pixels(2)
    with torch.no_grad():
        plain = base(x).logits
    peft_model = get_peft_model(base, ReinConfig(token_length=6))
    peft_model.add_adapter("other", ReinConfig(token_length=4, lora_dim=2))
    randomize_adapter(peft_model, seed=3)
    with torch.no_grad():
        out_default = peft_model(x).logits
        peft_model.set_adapter("other")
        out_other = peft_model(x).logits
        with peft_model.disable_adapter():
            out_disabled = peft_model(x).logits
    assert peft_model.active_adapters == ["other"]
    assert not torch.allclose(out_default, out_other)
    assert not torch.allclose(out_default, plain) and not torch.allclose(out_other, plain)
    assert_same_numbers(out_disabled, plain)
    # only the active adapter trains
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all(".other" in n for n in names)

    peft_model.delete_adapter("other")
    assert peft_model.active_adapters == ["default"]
    with torch.no_grad():
        assert_same_numbers(peft_model(x).logits, out_default)
    assert "other" not in peft_model.base_model.model.dinov2.encoder.rein.rein_settings


def test_unload_returns_the_base_model_unchanged():
    base = tiny_dinov2()
    reference = copy.deepcopy(base)
    x = pixels(2)
    peft_model = get_peft_model(base, ReinConfig(token_length=6, modules_to_save=["classifier"]))
    randomize_adapter(peft_model)
    unloaded = peft_model.unload()
    assert unloaded is base
    assert not _rein_hooks(unloaded)
    assert not any(isinstance(m, ReinLayer) for m in unloaded.modules())
    reference_state = reference.state_dict()
    assert unloaded.state_dict().keys() == reference_state.keys()
    assert all(torch.equal(tensor, reference_state[name]) for name, tensor in unloaded.state_dict().items())
    with torch.no_grad():
        assert_same_numbers(unloaded(x).logits, reference(x).logits)
    # and it can be wrapped again
    assert isinstance(get_peft_model(unloaded, ReinConfig(token_length=6)), PeftModel)


def test_deleting_the_last_adapter_removes_the_hooks():
    base = tiny_dinov2()
    peft_model = get_peft_model(base, ReinConfig(token_length=6))
    peft_model.add_adapter("other", ReinConfig(token_length=6))
    peft_model.delete_adapter("default")
    assert len(_rein_hooks(base)) == 2
    peft_model.delete_adapter("other")
    assert not _rein_hooks(base) and not any(isinstance(m, ReinLayer) for m in base.modules())


def _holds(container: object, adapter_name: str) -> bool:
    """Whether a dict-like `container` holds `adapter_name` as a key or as part of a tuple key."""
    return any(key == adapter_name or (isinstance(key, tuple) and adapter_name in key) for key in container.keys())


def _dict_like_attributes(obj: object) -> list[tuple[str, object]]:
    """The dict-like attributes of `obj` as (`Type.name`, value): public ones found with `dir()` (as PEFT's cleanup
    check does) and private ones."""
    names = {name for name in dir(obj) if not name.startswith("_")} | set(vars(obj))
    found = []
    for name in sorted(names):
        try:
            value = getattr(obj, name)
        except AttributeError:
            continue
        if callable(getattr(value, "keys", None)) and hasattr(value, "__contains__"):
            found.append((f"{type(obj).__name__}.{name}", value))
    return found


def test_weight_and_bias_of_the_rein_layer_raise_attribute_error():
    # BaseTunerLayer's weight / bias read a base layer, which a ReinLayer does not wrap: they used to recurse until
    # RecursionError, crashing anything that inspects a module's attributes
    rein_layer = adapted_dinov2().base_model.model.dinov2.encoder.rein
    assert not hasattr(rein_layer, "weight") and not hasattr(rein_layer, "bias")
    with pytest.raises(AttributeError):
        rein_layer.weight  # noqa: B018
    assert "ReinLayer.rein_tokens" in dict(_dict_like_attributes(rein_layer))  # reads every attribute dir() lists


@pytest.mark.parametrize("deleted", ["gone", "default"])
def test_delete_adapter_leaves_no_dict_like_attribute_holding_its_name(deleted):
    config = ReinConfig(token_length=6, modules_to_save=["classifier"])
    peft_model = get_peft_model(tiny_dinov2(), config)
    peft_model.add_adapter("gone", config)
    for adapter_name in ("gone", "default"):
        peft_model.set_adapter(adapter_name)
        peft_model.train()(pixels(2)).logits.sum().backward()
    peft_model.eval()
    for adapter_name in ("gone", "default"):
        peft_model.set_adapter(adapter_name)
        with torch.no_grad():  # fills the eval-mode projection cache
            peft_model(pixels(2))
    peft_model.set_adapter("default" if deleted == "gone" else "gone")
    containers = [item for obj in [peft_model, *peft_model.modules()] for item in _dict_like_attributes(obj)]
    holding = [(name, value) for name, value in containers if _holds(value, deleted)]
    assert {"ReinLayer.rein_settings", "ReinLayer.projection_cache", "ReinLayer.sequence_lengths"} <= {
        name for name, _ in holding
    }
    peft_model.delete_adapter(deleted)
    assert not [name for name, value in holding if _holds(value, deleted)]
    peft_model.delete_adapter("gone" if deleted == "default" else "default")  # the last one
    assert not [name for name, value in containers if _holds(value, "gone") or _holds(value, "default")]


def test_merging_is_refused_clearly_and_loses_nothing():
    peft_model = adapted_dinov2()
    x = pixels(2)
    with torch.no_grad():
        before = peft_model(x).logits
    with pytest.raises(ReinMergeError, match="cannot be merged.*depends on each input"):
        peft_model.merge_and_unload()
    with pytest.raises(ReinMergeError, match="unload()"):
        peft_model.merge_adapter()
    with torch.no_grad():
        assert_same_numbers(peft_model(x).logits, before)
    assert len(_rein_hooks(peft_model)) == 2


def test_layers_to_transform_adapts_only_those_layers():
    base = tiny_dinov2(num_layers=4)
    reference = copy.deepcopy(base)
    peft_model = get_peft_model(base, ReinConfig(token_length=6, layers_to_transform=[2, 3]))
    randomize_adapter(peft_model)
    rein_layer = base.dinov2.encoder.rein
    assert rein_layer.rein_tokens["default"].shape == (2, 6, 32)
    assert rein_layer.rein_settings["default"].layer_rows == {"dinov2.encoder.layer.2": 0, "dinov2.encoder.layer.3": 1}
    x = pixels(2)
    with torch.no_grad():
        ours = peft_model(x, output_hidden_states=True).hidden_states
        plain = reference(x, output_hidden_states=True).hidden_states
    for index in range(3):  # embeddings and the outputs of layers 0 and 1
        assert_same_numbers(ours[index], plain[index])
    assert not torch.allclose(ours[3], plain[3])


def test_layers_to_transform_out_of_range():
    with pytest.raises(ValueError, match=r"asks for layers \[7\].*has 2 encoder layers"):
        get_peft_model(tiny_dinov2(), ReinConfig(layers_to_transform=[1, 7]))


class SequenceFirstViT(nn.Module):
    """A transformer-style model that is not from transformers: sequence-first torch layers and a CLS token."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 16)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=False) for _ in range(3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, B, 12]
        hidden = torch.cat([self.cls.expand(1, x.shape[1], -1), self.stem(x)], dim=0)
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


def test_any_transformer_with_explicit_targets_and_prefix_tokens():
    torch.manual_seed(0)
    base = SequenceFirstViT().eval()
    reference_model, plain_model = copy.deepcopy(base), copy.deepcopy(base)
    config = ReinConfig(token_length=5, target_modules=r"blocks\.\d+", num_prefix_tokens=1, patch_size=4)
    peft_model = get_peft_model(base, config)
    randomize_adapter(peft_model)
    assert base.rein.rein_settings["default"].batch_first is False  # read off nn.MultiheadAttention
    reference = ReferenceRein(official_tensors(peft_model))
    reference.attach(list(reference_model.blocks), batch_first=False, num_prefix=1)
    x = torch.randn(7, 2, 12)
    with torch.no_grad():
        ours, theirs, plain = peft_model(x), reference_model(x), plain_model(x)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert not torch.allclose(ours, plain)


def test_unsupported_model_error_says_what_to_set():
    model = tf.EfficientNetModel(tf.EfficientNetConfig(image_size=32, width_coefficient=0.1, depth_coefficient=0.1))
    with pytest.raises(ReinUnsupportedModelError, match="EfficientNetModel.*target_modules.*num_prefix_tokens"):
        get_peft_model(model, ReinConfig())
    with pytest.raises(ReinUnsupportedModelError, match="SequenceFirstViT.*target_modules.*num_prefix_tokens"):
        get_peft_model(SequenceFirstViT(), ReinConfig(target_modules=r"blocks\.\d+"))


def test_target_modules_that_match_nothing():
    with pytest.raises(ValueError, match="matched no module of Dinov2ForImageClassification"):
        get_peft_model(tiny_dinov2(), ReinConfig(target_modules=["no_such_layer"]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token_length": 1}, r"'token_length' must be at least 2 \(token 0 takes part in the softmax"),
        ({"lora_dim": 0}, "'lora_dim' must be at least 1"),
        ({"num_prefix_tokens": -1}, "'num_prefix_tokens' must be at least 0"),
        ({"query_dims": 0}, "'query_dims' must be at least 1"),
        ({"layers_pattern": "layer"}, "layers_pattern only has an effect together with layers_to_transform"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReinConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token_length": "abc"}, r"'token_length' must be an int, got 'abc' \(str\)"),
        ({"token_length": 4.0}, r"'token_length' must be an int, got 4.0 \(float\)"),
        ({"use_softmax": "false"}, r"'use_softmax' must be true or false \(a bool, not a string\), got 'false'"),
        ({"lora_dim": True}, r"'lora_dim' must be an int or None, got True \(bool\)"),
        ({"scale_init": float("inf")}, "'scale_init' must be a finite number"),
        ({"batch_first": 1}, "'batch_first' must be true or false .* or None"),
        ({"target_modules": ["a", 3]}, "'target_modules' must be a module name, a regex or a list of names"),
        ({"layers_to_transform": ["1"]}, "'layers_to_transform' must be a layer index or a list of them"),
        ({"modules_to_save": "classifier", "frozen_modules_follow_train": None}, "'frozen_modules_follow_train'"),
    ],
)
def test_config_field_types_are_checked_and_named(kwargs, message):
    with pytest.raises(TypeError, match=f"ReinConfig field {message}"):
        ReinConfig(**kwargs)


def test_vision_tower_of_clip_model_is_found_not_the_text_tower():
    peft_model = get_peft_model(build(FAMILIES["clip"]), ReinConfig(token_length=4))
    layer_rows = peft_model.base_model.model.vision_model.encoder.rein.rein_settings["default"].layer_rows
    assert list(layer_rows) == ["vision_model.encoder.layers.0", "vision_model.encoder.layers.1"]


SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
VISION = {**SIZES, "image_size": 32, "patch_size": 8}
HEADS = {  # head class, its config, prefix tokens
    "deit": (tf.DeiTForImageClassification, tf.DeiTConfig(**VISION, num_labels=3), 2),
    "dinov2_registers": (
        tf.Dinov2WithRegistersForImageClassification,
        tf.Dinov2WithRegistersConfig(**VISION, num_register_tokens=4, num_labels=3),
        5,
    ),
    "data2vec_vision": (tf.Data2VecVisionForImageClassification, tf.Data2VecVisionConfig(**VISION, num_labels=3), 1),
    # the CLIP and SigLIP classifiers take a two-tower config and use the vision tower
    "clip": (tf.CLIPForImageClassification, tf.CLIPConfig(text_config=SIZES, vision_config=VISION, num_labels=3), 1),
    "siglip": (
        tf.SiglipForImageClassification,
        tf.SiglipConfig(text_config=SIZES, vision_config=VISION, num_labels=3),
        0,
    ),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_task_heads_of_each_family_train_with_rein(name):
    head_class, config, num_prefix = HEADS[name]
    torch.manual_seed(0)
    peft_model = get_peft_model(head_class(config), ReinConfig(token_length=4, modules_to_save=["classifier"]))
    rein_layer = next(m for m in peft_model.modules() if isinstance(m, ReinLayer))
    assert rein_layer.rein_settings["default"].num_prefix_tokens == num_prefix
    peft_model.train()
    peft_model(pixel_values=pixels(2), labels=torch.tensor([0, 2])).loss.backward()
    assert rein_layer.rein_tokens["default"].grad.abs().sum() > 0
