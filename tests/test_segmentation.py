"""Rein inside transformers' segmentation models: UperNet, DPT, Mask2Former and EoMT, query linking, bad input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from conftest import (
    HIDDEN,
    IMAGE,
    LABELS,
    PATCH,
    SIZES,
    assert_same_numbers,
    pixels,
    randomize_adapter,
    tiny_mask2former_config,
    tiny_upernet,
)
from peft import PeftModel, get_peft_model
from reference import ReferenceRein, official_tensors
from torch import nn

from rein_peft import ReinConfig, check_label_maps
from rein_peft.tuners.rein.layer import ReinLinkedQueries

# compares separately computed numbers: scripts/test.sh runs these tests again under OMP_NUM_THREADS=1
pytestmark = pytest.mark.numerics

QUERIES, QUERY_WIDTH, REGISTERS, EOMT_BLOCKS = 6, 32, 2, 2  # Mask2Former's GroupNorms need widths of 32k
EOMT_LAYERS = 4
DPT_HEADS = ["neck", "head.head"]


def _dinov2_backbone(num_layers: int = 4, out_features: tuple[str, ...] = ("stage1", "stage2", "stage3", "stage4")):
    return tf.Dinov2Config(
        **{**SIZES, "num_hidden_layers": num_layers},
        out_features=list(out_features),
        reshape_hidden_states=True,
        apply_layernorm=False,
    )


def tiny_dpt() -> nn.Module:
    """DPT for semantic segmentation: transformers builds it on a ViT of its own (it takes no `backbone_config`)."""
    config = tf.DPTConfig(
        **{**SIZES, "num_hidden_layers": 4},
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=8,
        num_labels=LABELS,
    )  # with use_auxiliary_head=False its loss fails in transformers 5.23 (an unbound auxiliary-logits variable)
    return tf.DPTForSemanticSegmentation(config)


def tiny_dpt_depth() -> nn.Module:
    """DPT over a `Dinov2Backbone` (the Depth Anything layout): transformers' DPT that does take a backbone."""
    backbone = tf.Dinov2Config(
        **{**SIZES, "num_hidden_layers": 4},
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = tf.DPTConfig(
        backbone_config=backbone,
        is_hybrid=False,
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=8,
        reassemble_factors=[4, 2, 1, 0.5],
        head_in_index=-1,
    )
    return tf.DPTForDepthEstimation(config)


def tiny_mask2former(num_layers: int = 4, out_features: tuple[str, ...] = ("stage1", "stage2", "stage3", "stage4")):
    config = tiny_mask2former_config(_dinov2_backbone(num_layers, out_features), QUERIES, QUERY_WIDTH)
    return tf.Mask2FormerForUniversalSegmentation(config)


def tiny_eomt() -> nn.Module:
    config = tf.EomtConfig(
        **{**SIZES, "num_hidden_layers": EOMT_LAYERS},
        num_queries=QUERIES,
        num_blocks=EOMT_BLOCKS,
        num_labels=LABELS,
        num_register_tokens=REGISTERS,
        num_upscale_blocks=1,
        train_num_points=64,
    )
    return tf.EomtForUniversalSegmentation(config)


def _semantic_labels(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, LABELS, (batch, IMAGE, IMAGE), generator=torch.Generator().manual_seed(seed))


def _mask_labels(batch: int, seed: int = 0) -> dict:
    """Mask2Former / EoMT targets from random label maps: one binary mask per class present."""
    maps = _semantic_labels(batch, seed)
    classes = [torch.unique(label_map) for label_map in maps]
    masks = [
        (label_map[None] == present[:, None, None]).float() for label_map, present in zip(maps, classes, strict=True)
    ]
    return {"mask_labels": masks, "class_labels": classes}


@dataclass(frozen=True)
class SegmentationModel:
    """A segmentation model from transformers, where Rein must find its encoder, and what trains with Rein."""

    name: str
    build: Callable[[], nn.Module]
    layer_list: str
    num_prefix_tokens: int
    head: list[str]
    make_labels: Callable[[int], dict]
    output: str


SEGMENTATION_MODELS = {
    model.name: model
    for model in [
        SegmentationModel(
            "upernet",
            tiny_upernet,
            "backbone.encoder.layer",
            1,
            ["decode_head"],
            lambda batch: {"labels": _semantic_labels(batch)},
            "logits",
        ),
        SegmentationModel(
            "dpt",
            tiny_dpt,
            "dpt.encoder.layer",
            1,
            # PEFT matches modules_to_save by name suffix: "head" would also match layers inside the heads, while
            # "head.head" matches the layers of both the head and the auxiliary head, side by side
            DPT_HEADS,
            lambda batch: {"labels": _semantic_labels(batch)},
            "logits",
        ),
        SegmentationModel(
            "dpt_depth_dinov2",
            tiny_dpt_depth,
            "backbone.encoder.layer",
            1,
            DPT_HEADS,
            lambda batch: {},
            "predicted_depth",
        ),
        SegmentationModel(
            "mask2former",
            tiny_mask2former,
            "model.pixel_level_module.encoder.encoder.layer",
            1,
            ["model.pixel_level_module.decoder", "model.transformer_module", "class_predictor"],
            _mask_labels,
            "masks_queries_logits",
        ),
        SegmentationModel(
            "eomt",
            tiny_eomt,
            "layers",
            1 + REGISTERS,
            ["upscale_block", "mask_head", "class_predictor", "query"],
            _mask_labels,
            "masks_queries_logits",
        ),
    ]
}


@pytest.fixture(params=sorted(SEGMENTATION_MODELS))
def segmentation_model(request) -> SegmentationModel:
    return SEGMENTATION_MODELS[request.param]


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build().eval()


def _adapted(spec: SegmentationModel, **config_kwargs) -> nn.Module:
    config = ReinConfig(**{"token_length": QUERIES, "modules_to_save": spec.head, **config_kwargs})
    peft_model = get_peft_model(_seeded(spec.build), config)
    randomize_adapter(peft_model)
    return peft_model.eval()


@torch.no_grad()
def _output(model: nn.Module, spec: SegmentationModel, inputs: torch.Tensor) -> torch.Tensor:
    return getattr(model(pixel_values=inputs), spec.output)


def test_each_model_is_found_and_refined(segmentation_model):
    spec = segmentation_model
    peft_model = _adapted(spec)
    rein_layer = next(module for module in peft_model.modules() if type(module).__name__ == "ReinLayer")
    settings = rein_layer.rein_settings["default"]
    layers = len(peft_model.base_model.model.get_submodule(spec.layer_list))
    assert list(settings.layer_rows) == [f"{spec.layer_list}.{index}" for index in range(layers)]
    assert settings.num_prefix_tokens == spec.num_prefix_tokens

    inputs = pixels(2)
    bare = _output(_seeded(spec.build), spec, inputs)
    adapted = _output(peft_model, spec, inputs)
    assert (adapted - bare).abs().max().item() > 1e-2 * bare.abs().max().item()  # DPT's fresh logits are ~1e-8
    with peft_model.disable_adapter():
        assert_same_numbers(_output(peft_model, spec, inputs), bare)


def test_each_model_trains_only_rein_and_its_head_and_reloads(segmentation_model, tmp_path):
    spec = segmentation_model
    peft_model = _adapted(spec)
    peft_model.train()
    outputs = peft_model(pixel_values=pixels(2), **spec.make_labels(2))
    # transformers' DPT depth model has no training loss: a plain one stands in
    loss = outputs.loss if outputs.loss is not None else (outputs.predicted_depth - 1).square().mean()
    assert torch.isfinite(loss)
    loss.backward()

    trained = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    assert trained == {name for name in trained if ".rein_" in name or ".modules_to_save.default." in name}
    assert all(param.grad is None for param in peft_model.parameters() if not param.requires_grad)
    reached = {name for name, param in peft_model.named_parameters() if param.grad is not None and param.grad.any()}
    assert any(".rein_tokens." in name for name in reached)
    assert any(".modules_to_save.default." in name for name in reached)

    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_seeded(spec.build), tmp_path).eval()
    inputs = pixels(2, seed=3)
    assert_same_numbers(_output(reloaded, spec, inputs), _output(peft_model, spec, inputs))


def _reference_model(peft_model: nn.Module, build: Callable[[], nn.Module], layer_list: str) -> nn.Module:
    """The bare model with the independent reference of Rein attached to its encoder layers."""
    bare = _seeded(build)
    reference = ReferenceRein(official_tensors(peft_model))
    reference.attach(list(bare.get_submodule(layer_list)), batch_first=True, num_prefix=1)
    return bare


@pytest.mark.parametrize("out_features", [("stage1", "stage2", "stage3", "stage4"), ("stage2", "stage4")])
def test_backbone_features_come_out_after_rein(out_features):
    """`Dinov2Backbone`'s `out_features` choose the layers whose refined outputs feed the decoder."""

    def build() -> nn.Module:
        return tf.Dinov2Backbone(_dinov2_backbone(4, out_features))

    peft_model = get_peft_model(_seeded(build), ReinConfig(token_length=QUERIES))
    randomize_adapter(peft_model)
    reference = _reference_model(peft_model, build, "encoder.layer")
    inputs = pixels(2)
    with torch.no_grad():
        features = peft_model(pixel_values=inputs).feature_maps
        expected = reference(pixel_values=inputs).feature_maps
        bare = _seeded(build)(pixel_values=inputs).feature_maps
    assert len(features) == len(out_features)
    for feature, reference_feature, bare_feature in zip(features, expected, bare, strict=True):
        assert feature.shape == (2, HIDDEN, IMAGE // PATCH, IMAGE // PATCH)
        assert (feature - reference_feature).abs().max().item() <= 1e-5
        assert (feature - bare_feature).abs().max().item() > 1e-3


def _eomt_reference(peft_model: nn.Module, refine_queries: bool) -> nn.Module:
    """Bare EoMT with the reference Rein attached: after the queries are put in front of the sequence (before the
    last EOMT_BLOCKS layers) they pass through like CLS and registers, or are refined like patches."""
    bare = _seeded(tiny_eomt)
    reference = ReferenceRein(official_tensors(peft_model))
    prefix = 1 + REGISTERS
    for index, layer in enumerate(bare.layers):

        def hook(module, args, output, index=index):
            if index < EOMT_LAYERS - EOMT_BLOCKS:
                return reference.forward(output, index, batch_first=True, num_prefix=prefix)
            queries, kept, patches = torch.tensor_split(output, [QUERIES, QUERIES + prefix], dim=1)
            if refine_queries:
                queries = reference.forward(queries, index, batch_first=True, num_prefix=0)
            patches = reference.forward(patches, index, batch_first=True, num_prefix=0)
            return torch.cat([queries, kept, patches], dim=1)

        layer.register_forward_hook(hook)
    return bare


@pytest.mark.parametrize("refine_queries", [False, True])
def test_eomt_queries_are_not_refined_unless_configured(refine_queries):
    spec = SEGMENTATION_MODELS["eomt"]
    peft_model = _adapted(spec, refine_query_tokens=refine_queries)
    reference = _eomt_reference(peft_model, refine_queries)
    inputs = pixels(2)
    with torch.no_grad():
        for name in ("masks_queries_logits", "class_queries_logits", "last_hidden_state"):
            ours, expected = (
                getattr(peft_model(pixel_values=inputs), name),
                getattr(reference(pixel_values=inputs), name),
            )
            assert (ours - expected).abs().max().item() <= 1e-4, name


# --- query linking ---------------------------------------------------------------------------------------------------

M2F_HEAD = SEGMENTATION_MODELS["mask2former"].head


def _linked_mask2former(**model_kwargs) -> nn.Module:
    config = ReinConfig(
        token_length=QUERIES, link_token_to_query=True, query_dims=QUERY_WIDTH, modules_to_save=M2F_HEAD
    )
    peft_model = get_peft_model(_seeded(lambda: tiny_mask2former(**model_kwargs)), config)
    randomize_adapter(peft_model)
    return peft_model.eval()


def _set_table(table: nn.Embedding, values: torch.Tensor) -> None:
    with torch.no_grad():
        table.weight.copy_(values)


def test_mask2former_queries_are_linked_from_the_tokens():
    """Content queries = a linear map of Rein's queries, positional queries = them (REIN.md), in the trained head."""
    peft_model = _linked_mask2former()
    tensors = official_tensors(peft_model)
    queries = ReferenceRein(tensors).queries()
    query_feat = peft_model.base_model.model.model.pixel_level_module.encoder.encoder.rein.rein_query_feat["default"]
    reference = _reference_model(peft_model, tiny_mask2former, SEGMENTATION_MODELS["mask2former"].layer_list)
    _set_table(reference.model.transformer_module.queries_embedder, queries)
    _set_table(
        reference.model.transformer_module.queries_features, F.linear(queries, query_feat.weight, query_feat.bias)
    )

    inputs = pixels(2)
    with torch.no_grad():
        ours, expected = peft_model(pixel_values=inputs), reference(pixel_values=inputs)
    for name in ("masks_queries_logits", "class_queries_logits"):
        assert (getattr(ours, name) - getattr(expected, name)).abs().max().item() <= 1e-4, name
    tables = [module for module in peft_model.modules() if isinstance(module, ReinLinkedQueries)]
    assert len(tables) == 4  # the original and the trained copy (modules_to_save) of both tables
    assert all(table.linked_weight is None for table in tables)  # taken out after the forward


def _last_layer_token_grad(linked: bool) -> torch.Tensor:
    """Gradient of Mask2Former's loss on the tokens of a layer whose output no decoder feature uses."""
    config = ReinConfig(
        token_length=QUERIES, link_token_to_query=linked, query_dims=QUERY_WIDTH, modules_to_save=M2F_HEAD
    )
    model = _seeded(lambda: tiny_mask2former(num_layers=5))  # out_features stop at layer 4 of 5
    peft_model = get_peft_model(model, config).train()
    peft_model(pixel_values=pixels(2), **_mask_labels(2)).loss.backward()
    tokens = next(param for name, param in peft_model.named_parameters() if ".rein_tokens." in name)
    return tokens.grad[-1]


def test_gradients_reach_the_tokens_through_the_decoder_loss():
    assert _last_layer_token_grad(linked=True).abs().max().item() > 0
    assert _last_layer_token_grad(linked=False).abs().max().item() == 0


def test_unload_restores_the_original_queries():
    base = _seeded(tiny_mask2former)
    original = {
        name: base.model.transformer_module.get_submodule(name).weight.detach().clone()
        for name in ("queries_embedder", "queries_features")
    }
    inputs = pixels(2)
    bare = _output(base, SEGMENTATION_MODELS["mask2former"], inputs)
    peft_model = get_peft_model(
        base, ReinConfig(token_length=QUERIES, link_token_to_query=True, query_dims=QUERY_WIDTH)
    )
    randomize_adapter(peft_model)
    assert isinstance(base.model.transformer_module.queries_features, ReinLinkedQueries)
    unloaded = peft_model.unload()
    for name, weight in original.items():
        table = unloaded.model.transformer_module.get_submodule(name)
        assert type(table) is nn.Embedding and torch.equal(table.weight, weight)
    assert not any(hook for module in unloaded.modules() for hook in module._forward_pre_hooks.values())
    assert_same_numbers(_output(unloaded, SEGMENTATION_MODELS["mask2former"], inputs), bare)


def test_linked_mask2former_saves_loads_and_disables(tmp_path):
    peft_model = _linked_mask2former()
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_seeded(tiny_mask2former), tmp_path).eval()
    spec, inputs = SEGMENTATION_MODELS["mask2former"], pixels(2, seed=5)
    assert_same_numbers(_output(reloaded, spec, inputs), _output(peft_model, spec, inputs))
    with reloaded.disable_adapter():
        assert_same_numbers(_output(reloaded, spec, inputs), _output(_seeded(tiny_mask2former), spec, inputs))


def test_eomt_query_embedding_is_linked():
    spec = SEGMENTATION_MODELS["eomt"]
    head = [name for name in spec.head if name != "query"]
    peft_model = _adapted(spec, link_token_to_query=True, query_dims=HIDDEN, modules_to_save=head)
    reference = _eomt_reference(peft_model, refine_queries=False)
    _set_table(reference.query, ReferenceRein(official_tensors(peft_model)).queries())
    inputs = pixels(2)
    with torch.no_grad():
        ours, expected = peft_model(pixel_values=inputs), reference(pixel_values=inputs)
    assert (ours.masks_queries_logits - expected.masks_queries_logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    ("config_kwargs", "message"),
    [
        ({"token_length": QUERIES + 1, "query_dims": QUERY_WIDTH}, r"has 6 queries and token_length is 7"),
        ({"token_length": QUERIES, "query_dims": QUERY_WIDTH * 2}, r"32 wide, but query_dims is 64"),
    ],
)
def test_linking_into_a_decoder_that_does_not_fit_is_refused(config_kwargs, message):
    base = _seeded(tiny_mask2former)
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, ReinConfig(link_token_to_query=True, **config_kwargs))
    assert type(base.model.transformer_module.queries_features) is nn.Embedding  # nothing was changed


def test_linked_queries_cannot_be_mixed_per_sample():
    peft_model = _linked_mask2former()
    with pytest.raises(ValueError, match="cannot take part in a mixed-adapter batch"):
        peft_model(pixel_values=pixels(2), adapter_names=["default", "__base__"])


# --- bad input -------------------------------------------------------------------------------------------------------


def test_images_smaller_than_one_patch_are_refused():
    peft_model = _adapted(SEGMENTATION_MODELS["upernet"])
    with pytest.raises(ValueError, match=rf"5x5 pixels, smaller than one {PATCH}x{PATCH} patch"):
        peft_model(pixel_values=pixels(1, side=5))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([[0, 1], [LABELS, 255]]), rf"values \[{LABELS}\], but the model has {LABELS} classes"),
        (torch.tensor([[0, -1], [1, 2]]), r"values \[-1\].*ignores 255"),
        (torch.tensor([[0.0, 1.0]]), "integer class ids"),
    ],
)
def test_label_maps_that_disagree_with_the_model_are_refused(labels, message):
    config = tiny_upernet().config
    with pytest.raises(ValueError, match=message):
        check_label_maps(labels, config)


def test_label_maps_with_the_models_ignore_index_pass():
    config = tf.UperNetConfig(backbone_config=_dinov2_backbone(), num_labels=LABELS, loss_ignore_index=0)
    check_label_maps(torch.tensor([[0, 1], [2, LABELS - 1]]), config)
    with pytest.raises(ValueError, match="ignores 0"):
        check_label_maps(torch.tensor([[255]]), config)


def test_resize_transform_reads_the_same_inputs_as_numpy_arrays_for_map():
    from PIL import Image

    from rein_peft.official.protocol import resize_transform

    config, processor = tiny_upernet().config, tf.BitImageProcessorPil()
    rng = np.random.default_rng(0)
    batch = {
        "image": [Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)) for _ in range(2)],
        "label": [Image.fromarray(rng.integers(0, LABELS, (20, 30), dtype=np.uint8)) for _ in range(2)],
    }
    tensors = resize_transform(processor, 16, config)(batch)
    arrays = resize_transform(processor, 16, config, return_tensors="np")(batch)
    assert arrays["pixel_values"].shape == (2, 3, 16, 16) and arrays["pixel_values"].dtype == np.float32
    assert arrays["labels"].shape == (2, 16, 16) and arrays["labels"].dtype == np.int64
    for name, tensor in tensors.items():
        assert isinstance(arrays[name], np.ndarray) and np.array_equal(arrays[name], tensor.numpy())
    with pytest.raises(ValueError, match='return_tensors must be "pt" or "np"'):
        resize_transform(processor, 16, config, return_tensors="tf")


# --- transformers' own adapter API -----------------------------------------------------------------------------------

AUTO_CLASSES = {
    "upernet": (tf.AutoModelForSemanticSegmentation, {}),
    "linked_mask2former": (
        tf.AutoModelForUniversalSegmentation,
        {"link_token_to_query": True, "query_dims": QUERY_WIDTH, "modules_to_save": M2F_HEAD},
    ),
}


@pytest.mark.parametrize("name", sorted(AUTO_CLASSES))
def test_auto_classes_and_load_adapter_give_the_peft_model_outputs(name, tmp_path):
    auto_class, config_kwargs = AUTO_CLASSES[name]
    spec = SEGMENTATION_MODELS[name.removeprefix("linked_")]
    _seeded(spec.build).save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(
        auto_class.from_pretrained(tmp_path / "base"),
        ReinConfig(**{"token_length": QUERIES, "modules_to_save": spec.head, **config_kwargs}),
    )
    randomize_adapter(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    inputs = pixels(2)
    expected = _output(peft_model.eval(), spec, inputs)

    auto = auto_class.from_pretrained(tmp_path / "adapter").eval()
    loaded = auto_class.from_pretrained(tmp_path / "base")
    loaded.load_adapter(tmp_path / "adapter")
    assert_same_numbers(_output(auto, spec, inputs), expected)  # the auto class
    assert_same_numbers(_output(loaded.eval(), spec, inputs), expected)  # load_adapter
