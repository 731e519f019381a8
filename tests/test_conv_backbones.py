"""Rein on convolutional and hierarchical backbones (ConvNeXt, ConvNeXt V2, DINOv3 ConvNeXt, ResNet, Swin, Swin V2):
one Rein per stage, as the official ConvNeXt and ResNet backbones have it.

The ConvNeXt and ResNet models are sized so that channels, height and width are equal at every stage (8 channels on
the 8x8 grid of a 32-pixel image, then 4 on 4x4): a map refined along the wrong axis keeps its shape there, so only
the right numbers pass the parity tests."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from conftest import HEAVY, assert_same_numbers, pixels, randomize_adapter, tiny_mask2former_config
from peft import PeftModel, get_peft_model
from reference import ReferenceRein, official_tensors
from safetensors.torch import load_file
from torch import nn

from rein_peft import ReinConfig, ReinStateDictError
from rein_peft.integrations.export import export_onnx, export_program
from rein_peft.tuners.rein.discovery import CHANNELS_FIRST, CHANNELS_LAST, SEQUENCE, discover
from rein_peft.tuners.rein.layer import ReinLayer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOKENS, RANK, LABELS, QUERIES, QUERY_WIDTH = 5, 2, 3, 5, 32  # Mask2Former's GroupNorms need widths of 32k


@dataclass(frozen=True)
class StagedFamily:
    """A staged backbone from transformers and what Rein must find in it (written out by hand)."""

    name: str
    build: Callable[[], nn.Module]
    stages: str  # the list of stages
    blocks: str  # the list of blocks inside each stage
    layout: str
    widths: list[int]


def _convnext(**kwargs) -> tf.ConvNextConfig:
    return tf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 4], depths=[2, 1], image_size=32, **kwargs)


def _resnet(**kwargs) -> tf.ResNetConfig:
    return tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 4], depths=[2, 1], layer_type="basic", **kwargs)


def _swin(config_class: type, **kwargs) -> tf.PretrainedConfig:
    sizes = {"embed_dim": 8, "depths": [2, 1], "num_heads": [1, 2], "image_size": 32, "patch_size": 4}
    return config_class(**sizes, window_size=2, **kwargs)


BACKBONE_OUT = {"out_features": ["stage1", "stage2"]}
FAMILIES = {
    family.name: family
    for family in [
        StagedFamily(
            "convnext",
            lambda: tf.ConvNextForImageClassification(_convnext(num_labels=LABELS)),
            "convnext.encoder.stages", "layers", CHANNELS_FIRST, [8, 4],
        ),
        StagedFamily(
            "convnext_backbone",
            lambda: tf.ConvNextBackbone(_convnext(**BACKBONE_OUT)),
            "encoder.stages", "layers", CHANNELS_FIRST, [8, 4],
        ),
        StagedFamily(
            "convnextv2",
            lambda: tf.ConvNextV2ForImageClassification(
                tf.ConvNextV2Config(num_stages=2, hidden_sizes=[8, 4], depths=[2, 1], num_labels=LABELS)
            ),
            "convnextv2.encoder.stages", "layers", CHANNELS_FIRST, [8, 4],
        ),
        StagedFamily(
            "dinov3_convnext",
            lambda: tf.DINOv3ConvNextModel(tf.DINOv3ConvNextConfig(hidden_sizes=[8, 4], depths=[2, 1], image_size=32)),
            "model.stages", "layers", CHANNELS_FIRST, [8, 4],
        ),
        StagedFamily(
            "dinov3_convnext_backbone",
            lambda: tf.DINOv3ConvNextBackbone(
                tf.DINOv3ConvNextConfig(hidden_sizes=[8, 4], depths=[2, 1], image_size=32, **BACKBONE_OUT)
            ),
            "model.stages", "layers", CHANNELS_FIRST, [8, 4],
        ),
        StagedFamily(
            "resnet",
            lambda: tf.ResNetForImageClassification(_resnet(num_labels=LABELS)),
            "resnet.encoder.stages", "layers", CHANNELS_FIRST, [8, 4],
        ),
        StagedFamily(
            "resnet_backbone",
            lambda: tf.ResNetBackbone(_resnet(**BACKBONE_OUT)),
            "encoder.stages", "layers", CHANNELS_FIRST, [8, 4],
        ),
        StagedFamily(
            "swin",
            lambda: tf.SwinForImageClassification(_swin(tf.SwinConfig, num_labels=LABELS)),
            "swin.encoder.layers", "blocks", SEQUENCE, [8, 16],
        ),
        StagedFamily(
            "swin_backbone",
            lambda: tf.SwinBackbone(_swin(tf.SwinConfig, **BACKBONE_OUT)),
            "swin.encoder.layers", "blocks", SEQUENCE, [8, 16],
        ),
        StagedFamily(
            "swinv2_backbone",
            lambda: tf.Swinv2Backbone(_swin(tf.Swinv2Config, **BACKBONE_OUT)),
            "encoder.layers", "blocks", SEQUENCE, [8, 16],
        ),
    ]  # fmt: skip
}


def _seeded(family: StagedFamily, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return family.build().eval()


def _stage_names(family: StagedFamily, model: nn.Module) -> list[str]:
    return [f"{family.stages}.{index}" for index in range(len(model.get_submodule(family.stages)))]


def _adapted(family: StagedFamily, **config_kwargs) -> PeftModel:
    config = ReinConfig(**{"token_length": TOKENS, "lora_dim": RANK, **config_kwargs})
    peft_model = get_peft_model(_seeded(family), config)
    randomize_adapter(peft_model)
    return peft_model.eval()


def _outputs(output: object) -> list[torch.Tensor]:
    """Every tensor a forward returns (logits, feature maps, hidden states), flattened."""
    values = output.to_tuple() if hasattr(output, "to_tuple") else (output,)
    tensors = []
    for value in values:
        tensors += list(value) if isinstance(value, (tuple, list)) else [value]
    return [tensor for tensor in tensors if isinstance(tensor, torch.Tensor)]


def _reference_model(family: StagedFamily, peft_model: PeftModel, adapter_name: str = "default") -> nn.Module:
    """The same backbone with the independent reference of each stage's Rein attached to the stage's blocks."""
    reference_model = _seeded(family)
    base = peft_model.get_base_model()
    for stage in _stage_names(family, reference_model):
        reference = ReferenceRein(official_tensors(base, adapter_name, within=stage))
        blocks = list(reference_model.get_submodule(f"{stage}.{family.blocks}"))
        reference.attach(blocks, batch_first=True, num_prefix=0, channels_first=family.layout == CHANNELS_FIRST)
    return reference_model


# --- discovery -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_stages_blocks_widths_and_layouts_are_found(name):
    family = FAMILIES[name]
    model = _seeded(family)
    targets = discover(model, ReinConfig(token_length=TOKENS))
    stages = _stage_names(family, model)
    assert [stage.holder_name for stage in targets.stages] == stages
    for stage, stage_name in zip(targets.stages, stages, strict=True):
        blocks = model.get_submodule(f"{stage_name}.{family.blocks}")
        assert stage.layer_names == [f"{stage_name}.{family.blocks}.{index}" for index in range(len(blocks))]
    assert [stage.hidden_size for stage in targets.stages] == family.widths
    assert {stage.layout for stage in targets.stages} == {family.layout}
    assert (targets.num_prefix_tokens, targets.patch_size) == (0, 4)  # ResNet: its stem's stride


def test_the_layout_probe_reads_the_channel_axis_not_the_sizes():
    """At the configured 32-pixel size, ConvNeXt's 8 channels sit on an 8x8 grid; the probe still finds them."""
    model = tf.ConvNextModel(tf.ConvNextConfig(num_stages=1, hidden_sizes=[8], depths=[1], image_size=32))
    (stage,) = discover(model, ReinConfig(token_length=TOKENS)).stages
    assert (stage.layout, stage.hidden_size) == (CHANNELS_FIRST, 8)


def test_layers_to_transform_picks_stages_and_target_modules_picks_blocks():
    family = FAMILIES["convnext"]
    peft_model = get_peft_model(_seeded(family), ReinConfig(token_length=TOKENS, layers_to_transform=[1]))
    rein_layers = {name: module for name, module in peft_model.named_modules() if isinstance(module, ReinLayer)}
    assert list(rein_layers) == ["base_model.model.convnext.encoder.stages.1.rein"]
    assert rein_layers["base_model.model.convnext.encoder.stages.1.rein"].rein_tokens["default"].shape == (1, 5, 4)

    blocks = r".*stages\.\d+\.layers\.0"
    targets = discover(_seeded(family), ReinConfig(token_length=TOKENS, target_modules=blocks))
    assert [stage.layer_names for stage in targets.stages] == [
        ["convnext.encoder.stages.0.layers.0"],
        ["convnext.encoder.stages.1.layers.0"],
    ]
    with pytest.raises(ValueError, match="asks for stages \\[2\\].*has 2 stages.*layers_to_transform picks stages"):
        get_peft_model(_seeded(family), ReinConfig(token_length=TOKENS, layers_to_transform=[2]))


def test_overrides_that_do_not_fit_a_staged_backbone_are_refused():
    with pytest.raises(ValueError, match="num_prefix_tokens=1.*staged backbone"):
        get_peft_model(_seeded(FAMILIES["convnext"]), ReinConfig(token_length=TOKENS, num_prefix_tokens=1))


# --- the numbers -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_dim", [None, RANK])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_stage_is_refined_as_the_official_code_does(name, lora_dim):
    """Per-stage tables of each stage's width and depth, the maps refined as [B, H*W, C] tokens: the reference
    (tests/reference.py, the official code's form) within float32 rounding, and visibly different from the base."""
    family = FAMILIES[name]
    peft_model = _adapted(family, lora_dim=lora_dim)
    for stage, width, depth in zip(
        _stage_names(family, peft_model.get_base_model()), family.widths, [2, 1], strict=True
    ):
        rein = peft_model.get_base_model().get_submodule(f"{stage}.rein")
        assert rein.get_tokens("default").shape == (depth, TOKENS, width)
        assert rein.rein_delta_f["default"].weight.shape == (width, width)
    reference_model = _reference_model(family, peft_model)
    images = pixels(2)
    with torch.no_grad():
        ours, theirs = _outputs(peft_model(pixel_values=images)), _outputs(reference_model(pixel_values=images))
        with peft_model.disable_adapter():
            plain = _outputs(peft_model(pixel_values=images))
    assert len(ours) == len(theirs) > 0
    for actual, expected, bare in zip(ours, theirs, plain, strict=True):
        assert_same_numbers(actual, expected)
        assert (actual - bare).abs().max() > 1e-3 * bare.abs().max()


class ChannelsLastBlock(nn.Module):
    """A residual MLP block on `[B, H, W, C]` maps."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ChannelsLastStage(nn.Module):
    """A stage whose blocks keep `[B, H, W, C]` maps (as NAT's do): a 2x2 patch merge, then its blocks."""

    def __init__(self, in_width: int, width: int, depth: int, merge: bool) -> None:
        super().__init__()
        self.merge = nn.Linear(4 * in_width, width) if merge else nn.Identity()
        self.blocks = nn.ModuleList(ChannelsLastBlock(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        if isinstance(self.merge, nn.Linear):
            batch, height, width, channels = x.shape
            x = x.view(batch, height // 2, 2, width // 2, 2, channels).permute(0, 1, 3, 2, 4, 5).flatten(3)
            x = self.merge(x)
        for block in self.blocks:
            x = block(x)
        return x


class ChannelsLastBackbone(nn.Module):
    """A staged backbone with channels-last stages: 8 channels on the 8x8 grid of a 32-pixel image, then 4 on 4x4."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embeddings = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.stages = nn.ModuleList([ChannelsLastStage(8, 8, 2, merge=False), ChannelsLastStage(8, 4, 1, merge=True)])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(pixel_values).permute(0, 2, 3, 1)
        for stage in self.stages:
            x = stage(x)
        return x


def test_channels_last_stages_are_refined_as_their_tokens():
    """Stages whose blocks output [B, H, W, C]: found by the probe (channels == height == width), refined per
    position; equal to the reference on the blocks' outputs flattened to [B, H*W, C]."""
    torch.manual_seed(0)
    model = ChannelsLastBackbone().eval()
    reference_model = ChannelsLastBackbone().eval()
    reference_model.load_state_dict(model.state_dict())
    targets = discover(model, ReinConfig(token_length=TOKENS))
    assert [(stage.layout, stage.hidden_size) for stage in targets.stages] == [(CHANNELS_LAST, 8), (CHANNELS_LAST, 4)]
    peft_model = get_peft_model(model, ReinConfig(token_length=TOKENS, lora_dim=RANK))
    randomize_adapter(peft_model)
    for index, stage in enumerate(reference_model.stages):
        reference = ReferenceRein(official_tensors(peft_model.get_base_model(), within=f"stages.{index}"))
        for row, block in enumerate(stage.blocks):

            def hook(module, args, output, reference=reference, row=row):
                tokens = output.flatten(1, 2)  # [B, H*W, C]
                return reference.forward(tokens, row, batch_first=True, num_prefix=0).view(output.shape)

            block.register_forward_hook(hook)
    images = pixels(2)
    with torch.no_grad():
        ours, theirs = peft_model(images), reference_model(images)
        with peft_model.disable_adapter():
            plain = peft_model(images)
    assert_same_numbers(ours, theirs)
    assert (ours - plain).abs().max() > 1e-3 * plain.abs().max()


def test_a_transposed_layout_would_not_pass():
    """The parity sizes catch a map refined along its height instead of its channels."""
    family = FAMILIES["convnext_backbone"]
    peft_model = _adapted(family)
    transposed = _seeded(family)
    base = peft_model.get_base_model()
    for stage in _stage_names(family, transposed):
        reference = ReferenceRein(official_tensors(base, within=stage))
        for index, block in enumerate(transposed.get_submodule(f"{stage}.layers")):

            def hook(module, args, output, reference=reference, index=index):
                refined = reference.forward_map(output.transpose(1, 2), index)  # channels swapped with height
                return refined.transpose(1, 2)

            block.register_forward_hook(hook)
    images = pixels(2)
    with torch.no_grad():
        ours, wrong = peft_model(pixel_values=images).feature_maps, transposed(pixel_values=images).feature_maps
    assert ours[0].shape[1:] == (8, 8, 8)
    assert (ours[-1] - wrong[-1]).abs().max() > 1e-2 * ours[-1].abs().max()


def test_mixed_adapter_batches_refine_each_sample_with_its_adapter():
    family = FAMILIES["convnext"]
    peft_model = _adapted(family)
    peft_model.add_adapter("other", ReinConfig(token_length=TOKENS, lora_dim=RANK))
    randomize_adapter(peft_model, seed=2)
    images = pixels(3)
    with torch.no_grad():
        mixed = peft_model(pixel_values=images, adapter_names=["default", "__base__", "other"]).logits
        singles = []
        for index, adapter_name in enumerate(["default", None, "other"]):
            if adapter_name is None:
                with peft_model.disable_adapter():
                    singles.append(peft_model(pixel_values=images[index : index + 1]).logits)
            else:
                peft_model.set_adapter(adapter_name)
                singles.append(peft_model(pixel_values=images[index : index + 1]).logits)
    assert_same_numbers(mixed, torch.cat(singles))


# --- the adapter's life cycle ----------------------------------------------------------------------------------------


def test_unload_gives_back_the_base_model_bit_for_bit():
    family = FAMILIES["convnext"]
    model = _seeded(family)
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    images = pixels(2)
    with torch.no_grad():
        before = model(pixel_values=images).logits
        peft_model = get_peft_model(model, ReinConfig(token_length=TOKENS))
        randomize_adapter(peft_model)
        unloaded = peft_model.unload()
        after = unloaded(pixel_values=images).logits
    assert not any(isinstance(module, ReinLayer) for module in unloaded.modules())
    assert unloaded.state_dict().keys() == original.keys()
    assert all(torch.equal(unloaded.state_dict()[name], tensor) for name, tensor in original.items())
    # a second forward of the same model: equal within float32 rounding (MKL's results depend on memory alignment)
    assert_same_numbers(after, before)


def test_an_adapter_saved_on_the_bare_backbone_loads_into_its_classifier(tmp_path):
    config = ReinConfig(token_length=TOKENS, lora_dim=RANK)
    torch.manual_seed(0)
    classifier = tf.ConvNextForImageClassification(_convnext(num_labels=LABELS)).eval()
    bare = tf.ConvNextModel(_convnext()).eval()
    bare.load_state_dict(classifier.convnext.state_dict())
    peft_bare = get_peft_model(bare, config)
    randomize_adapter(peft_bare)
    peft_bare.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(classifier, tmp_path).eval()
    images = pixels(2)
    with torch.no_grad():
        expected = peft_bare(pixel_values=images).pooler_output
        actual = loaded.base_model.model.convnext(pixel_values=images).pooler_output
    assert_same_numbers(actual, expected)


def test_an_adapter_refuses_a_backbone_with_other_stage_widths(tmp_path):
    peft_model = _adapted(FAMILIES["convnext"])
    peft_model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    other = tf.ConvNextForImageClassification(
        tf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[2, 1], num_labels=LABELS)
    )
    message = r"'1\.rein_delta_f\.weight' has shape \[4, 4\], but this model needs \[16, 16\]"
    with pytest.raises(ReinStateDictError, match=message):
        PeftModel.from_pretrained(other, tmp_path)


def test_transformers_adapter_api_on_a_staged_backbone(tmp_path):
    family = FAMILIES["resnet"]
    peft_model = _adapted(family)
    peft_model.save_pretrained(tmp_path)
    model = _seeded(family)
    model.load_adapter(str(tmp_path), adapter_name="default")
    images = pixels(2)
    with torch.no_grad():
        expected = peft_model(pixel_values=images).logits
        assert_same_numbers(model(pixel_values=images).logits, expected)
        model.disable_adapters()
        with peft_model.disable_adapter():
            assert_same_numbers(model(pixel_values=images).logits, peft_model(pixel_values=images).logits)


def test_gradient_checkpointing_gives_the_same_gradients():
    """Swin checkpoints its blocks (transformers' ConvNeXt and ResNet do not support checkpointing). Enabled after
    wrapping: PEFT's `enable_input_require_grads` hook on an already-checkpointing model fails on Swin, whose patch
    embedding returns a tuple (a transformers/PEFT limitation, not Rein's)."""
    family = FAMILIES["swin"]
    gradients = []
    for checkpointing in (False, True):
        peft_model = get_peft_model(_seeded(family), ReinConfig(token_length=TOKENS, modules_to_save=["classifier"]))
        if checkpointing:
            peft_model.base_model.model.gradient_checkpointing_enable()
            assert peft_model.base_model.model.swin.encoder.layers[0].blocks[0].gradient_checkpointing
        randomize_adapter(peft_model)
        peft_model.train()
        peft_model(pixel_values=pixels(2), labels=torch.tensor([0, 2])).loss.backward()
        gradients.append({name: p.grad for name, p in peft_model.named_parameters() if ".rein_" in name})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 0
    for name, gradient in gradients[0].items():
        assert_same_numbers(gradients[1][name], gradient)


def test_torch_export_of_a_staged_backbone_equals_eager():
    peft_model = _adapted(FAMILIES["convnext"])
    images = pixels(2)
    program = export_program(peft_model, {"pixel_values": images})
    with torch.no_grad():
        eager = peft_model(pixel_values=images).logits
    assert_same_numbers(program.module()(pixel_values=images).logits, eager)


def test_onnx_export_of_a_staged_backbone_runs_in_onnxruntime(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")  # the `export` extra
    peft_model = _adapted(FAMILIES["resnet"])
    export_onnx(peft_model, tmp_path / "model.onnx", {"pixel_values": pixels(2)})
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    for batch in (1, 3):  # a dynamic batch
        images = pixels(batch, seed=batch)
        (logits,) = session.run(["logits"], {"pixel_values": images.numpy()})
        with torch.no_grad():
            eager = peft_model(pixel_values=images).logits
        # onnxruntime's kernels: float32 rounding over the whole network, on the logits' scale
        assert_same_numbers(torch.from_numpy(logits), eager, rtol=1e-4)


# --- segmentation ----------------------------------------------------------------------------------------------------


def _upernet(backbone_config: tf.PretrainedConfig) -> nn.Module:
    config = tf.UperNetConfig(
        backbone_config=backbone_config, num_labels=LABELS, hidden_size=8, pool_scales=[1, 2], use_auxiliary_head=False
    )
    torch.manual_seed(0)
    return tf.UperNetForSemanticSegmentation(config)


SEGMENTATION_BACKBONES = {
    "convnext": lambda: tf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], **BACKBONE_OUT),
    "dinov3_convnext": lambda: tf.DINOv3ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], **BACKBONE_OUT),
}


def _train(peft_model: nn.Module, batch: dict, steps: int = 4) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(steps):
        loss = peft_model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _frozen_and_trained(peft_model: nn.Module, before: dict[str, torch.Tensor], head: str) -> None:
    """The backbone kept its weights; Rein and the decoder's trained copy moved (but for the query tables that Rein's
    linked queries replace)."""
    after = dict(peft_model.named_parameters())
    backbone = [name for name in before if ".rein_" not in name and "modules_to_save" not in name]
    assert backbone and all(torch.equal(after[name], before[name]) for name in backbone)
    for marker in (".rein_tokens_a.", f"{head}.modules_to_save."):
        moved = [name for name in before if marker in name and ".base_layer." not in name]
        assert moved and all(not torch.equal(after[name], before[name]) for name in moved), marker


@pytest.mark.parametrize("backbone", sorted(SEGMENTATION_BACKBONES))
def test_upernet_over_a_staged_backbone_trains_rein_and_its_decoder(backbone):
    model = _upernet(SEGMENTATION_BACKBONES[backbone]())
    config = ReinConfig(token_length=TOKENS, lora_dim=RANK, modules_to_save=["decode_head"])
    peft_model = get_peft_model(model, config)
    assert len([module for module in peft_model.modules() if isinstance(module, ReinLayer)]) == 2
    before = {name: param.detach().clone() for name, param in peft_model.named_parameters()}
    labels = torch.randint(0, LABELS, (2, 32, 32), generator=torch.Generator().manual_seed(0))
    losses = _train(peft_model, {"pixel_values": pixels(2), "labels": labels})
    assert losses[-1] < losses[0]
    _frozen_and_trained(peft_model, before, "decode_head")


M2F_HEAD = ["model.pixel_level_module.decoder", "model.transformer_module", "class_predictor"]
# Mask2Former's pixel decoder takes four feature levels: four stages
M2F_STAGES = {"hidden_sizes": [8, 8, 16, 16], "depths": [1] * 4, "out_features": [f"stage{i}" for i in range(1, 5)]}
M2F_BACKBONES = {
    "convnext": lambda: tf.ConvNextConfig(num_stages=4, **M2F_STAGES),
    "dinov3_convnext": lambda: tf.DINOv3ConvNextConfig(**M2F_STAGES),
}


def _mask2former(backbone_config: tf.PretrainedConfig) -> nn.Module:
    config = tiny_mask2former_config(backbone_config, QUERIES, QUERY_WIDTH)
    torch.manual_seed(0)
    return tf.Mask2FormerForUniversalSegmentation(config).eval()


def _mask_labels(batch: int) -> dict:
    maps = torch.randint(0, LABELS, (batch, 32, 32), generator=torch.Generator().manual_seed(0))
    classes = [torch.unique(label_map) for label_map in maps]
    masks = [(maps[index][None] == present[:, None, None]).float() for index, present in enumerate(classes)]
    return {"mask_labels": masks, "class_labels": classes}


def _linked(backbone: str) -> PeftModel:
    config = ReinConfig(
        token_length=QUERIES, lora_dim=RANK, link_token_to_query=True, query_dims=QUERY_WIDTH, modules_to_save=M2F_HEAD
    )
    peft_model = get_peft_model(_mask2former(M2F_BACKBONES[backbone]()), config)
    randomize_adapter(peft_model)
    return peft_model.eval()


@pytest.mark.parametrize("backbone", sorted(SEGMENTATION_BACKBONES))
def test_mask2former_gets_the_sum_of_every_stages_linked_queries(backbone):
    """Each stage links its own queries; the decoder's positional queries are their sum and its content queries a
    linear map of the sum (the official head), through the whole forward."""
    peft_model = _linked(backbone)
    encoder = peft_model.base_model.model.model.pixel_level_module.encoder
    stage_list = "encoder.stages" if backbone == "convnext" else "model.stages"
    per_stage = [
        ReferenceRein(official_tensors(encoder, within=f"{stage_list}.{index}")).queries() for index in range(4)
    ]
    queries = per_stage[0] + per_stage[1] + per_stage[2] + per_stage[3]
    assert (per_stage[0] - per_stage[1]).abs().max() > 1e-3  # two different stages' queries
    assert_same_numbers(peft_model.get_queries(), queries)

    query_feat = encoder.get_submodule(f"{stage_list}.0.rein").rein_query_feat["default"]
    later_stages = [encoder.get_submodule(f"{stage_list}.{index}.rein") for index in range(1, 4)]
    assert not any("default" in rein.rein_query_feat for rein in later_stages)  # one map, applied to the sum
    reference = _mask2former(M2F_BACKBONES[backbone]())
    reference.load_state_dict(peft_model.get_base_model().state_dict(), strict=False)
    transformer = reference.model.transformer_module
    with torch.no_grad():
        transformer.queries_embedder.weight.copy_(queries)
        transformer.queries_features.weight.copy_(F.linear(queries, query_feat.weight, query_feat.bias))
    for index in range(4):
        stage = f"{stage_list}.{index}"
        rein = ReferenceRein(official_tensors(encoder, within=stage))
        rein.attach(list(reference.model.pixel_level_module.encoder.get_submodule(f"{stage}.layers")), True, 0, True)
    images = pixels(2)
    with torch.no_grad():
        ours, expected = peft_model(pixel_values=images), reference(pixel_values=images)
    for name in ("masks_queries_logits", "class_queries_logits"):
        assert_same_numbers(getattr(ours, name), getattr(expected, name), rtol=1e-4)


@pytest.mark.parametrize("backbone", sorted(SEGMENTATION_BACKBONES))
def test_mask2former_with_linked_queries_trains_every_stage(backbone):
    peft_model = _linked(backbone)
    before = {name: param.detach().clone() for name, param in peft_model.named_parameters()}
    losses = _train(peft_model, {"pixel_values": pixels(2), **_mask_labels(2)})
    assert losses[-1] < losses[0]
    _frozen_and_trained(peft_model, before, "model.transformer_module")
    merges = [name for name in before if ".rein_merge." in name]
    assert len(merges) == 8  # weight and bias of every stage, trained through the summed queries
    after = dict(peft_model.named_parameters())
    assert all(not torch.equal(after[name], before[name]) for name in merges)


def test_an_int8_backbone_takes_a_staged_adapter_close_to_full_precision():
    """torchao int8 weight-only ConvNeXt (its pointwise linear layers), quantized before Rein: the layout probe runs
    on the int8 backbone, the float32 adapter refines it close to the float32 model's, and trains."""
    pytest.importorskip("torchao")  # the `quantization` extra
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    family = FAMILIES["convnext"]
    full = _adapted(family)
    model = _seeded(family)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, name: isinstance(module, nn.Linear))
    quantized = get_peft_model(model, ReinConfig(token_length=TOKENS, lora_dim=RANK))
    full_parameters = dict(full.named_parameters())
    with torch.no_grad():
        for name, parameter in quantized.named_parameters():
            if ".rein_" in name:
                parameter.copy_(full_parameters[name])
    images = pixels(2)
    with torch.no_grad():
        expected, actual = full(pixel_values=images).logits, quantized.eval()(pixel_values=images).logits
    error = ((actual - expected).norm() / expected.norm()).item()
    assert 0 < error < 0.05  # int8 rounding of the backbone, not a lost adapter
    quantized.train()
    loss = quantized(pixel_values=images, labels=torch.tensor([0, 1])).loss
    loss.backward()
    gradients = [p.grad for name, p in quantized.named_parameters() if ".rein_tokens_a." in name]
    assert len(gradients) == 2 and all(gradient.abs().max() > 0 for gradient in gradients)


@HEAVY
@pytest.mark.parametrize(
    "flags",
    [
        ["--backbone", "convnext", "--decoder", "upernet"],
        ["--backbone", "dinov3_convnext", "--decoder", "mask2former", "--link_token_to_query"],
    ],
)
def test_the_segmentation_example_trains_rein_on_a_staged_backbone(tmp_path, flags):
    """examples/train_semantic_segmentation.py with `--backbone`: a real Trainer run on the embedded task; the adapter
    file holds one Rein per stage and reloads to the same mIoU."""
    sys.path.insert(0, str(EXAMPLES))
    from train_semantic_segmentation import main

    quick = ["--max_train_samples", "32", "--max_eval_samples", "16", "--num_train_epochs", "1", "--skip_baseline"]
    results = main(["--output_dir", str(tmp_path), *quick, *flags])
    assert results["miou_reloaded"] == results["miou_after"]
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    stages = {key.split(".rein.")[0].rsplit(".", 1)[-1] for key in tensors if ".rein." in key}
    assert stages == {"0", "1", "2", "3"}


def test_a_staged_adapter_goes_through_the_hub(tmp_path):
    """push_to_hub and PeftModel.from_pretrained through the real huggingface_hub client and a loopback Hub
    (tests/hub_server.py, as in tests/test_hub.py): one Rein per stage comes back with the same numbers."""
    from hub_server import serve_hub
    from test_hub import run_client

    script = """
        from transformers import ConvNextConfig, ConvNextForImageClassification

        def convnext():
            torch.manual_seed(0)
            config = ConvNextConfig(num_stages=2, hidden_sizes=[8, 4], depths=[2, 1], num_labels=3)
            return ConvNextForImageClassification(config).eval()

        model = get_peft_model(convnext(), rein_peft.ReinConfig(token_length=5, modules_to_save=["classifier"]))
        randomize(model, seed=1)
        model.push_to_hub("tester/rein-convnext")
        loaded = PeftModel.from_pretrained(convnext(), "tester/rein-convnext").eval()
        pushed, pulled = adapter_state(model.eval()), adapter_state(loaded)
        torch.save({"pushed": pushed, "pulled": pulled}, os.path.join(OUT, "states.pt"))
        report(files=sorted(api.list_repo_files("tester/rein-convnext")))
    """
    with serve_hub() as hub:
        result = run_client(hub, tmp_path, script)
    assert "adapter_model.safetensors" in result["files"]
    states = torch.load(tmp_path / "states.pt")
    pushed, pulled = states["pushed"], states["pulled"]
    assert {key.split(".rein.")[0].rsplit(".", 1)[-1] for key in pushed["weights"] if ".rein." in key} == {"0", "1"}
    assert pulled["weights"].keys() == pushed["weights"].keys()
    assert all(torch.equal(pulled["weights"][name], tensor) for name, tensor in pushed["weights"].items())
    assert_same_numbers(pulled["logits"], pushed["logits"])


def test_deleting_an_adapter_removes_it_from_every_stage():
    peft_model = _adapted(FAMILIES["swin_backbone"])
    peft_model.add_adapter("other", ReinConfig(token_length=TOKENS))
    rein_layers = [module for module in peft_model.modules() if isinstance(module, ReinLayer)]
    assert len(rein_layers) == 2 and all("other" in layer.rein_settings for layer in rein_layers)
    peft_model.delete_adapter("other")
    assert all(set(layer.rein_settings) == {"default"} for layer in rein_layers)
    assert not any(".other" in name for name, _ in peft_model.named_parameters())
