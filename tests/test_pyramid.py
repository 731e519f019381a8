"""The official segmenter's backbone: the patch-embedding conversion (`resize_patch_embedding`, its command) and the
feature pyramid (`Dinov2PyramidConfig` / `Dinov2PyramidBackbone`), against plain rewrites of the official lines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from conftest import HEADS, HIDDEN, MLP, assert_same_numbers, pixels, randomize_adapter, tiny_mask2former_config
from peft import get_peft_model

import rein_peft
from rein_peft import Dinov2PyramidBackbone, Dinov2PyramidConfig, ReinConfig, resize_patch_embedding
from rein_peft.resize_backbone import main as resize_command

# DINOv2's geometry, scaled down in width and depth only: patch 14 on 518 (a 37x37 grid), converted to 16 on 512
OLD_PATCH, OLD_GRID, NEW_PATCH, NEW_SIZE = 14, 37, 16, 512
DINOV2_SIZES = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": HEADS,
    "intermediate_size": MLP,
    "patch_size": OLD_PATCH,
    "image_size": OLD_PATCH * OLD_GRID,
}
# a pyramid backbone: 4 layers, patch 8 on 32x32 images (4x4 maps), the official scales
PYRAMID_SIZES = {**DINOV2_SIZES, "num_hidden_layers": 4, "patch_size": 8, "image_size": 32}
OUT_FEATURES = ["stage1", "stage2", "stage3", "stage4"]


def official_conversion(state: dict[str, torch.Tensor], prefix: str = "embeddings.") -> dict[str, torch.Tensor]:
    """`convert_dinov2_large_512x512.py` rewritten plainly for any width and grid, on transformers' key names."""
    old_grid, new_grid, width = OLD_GRID, NEW_SIZE // NEW_PATCH, HIDDEN
    state = dict(state)
    pos = state[prefix + "position_embeddings"]
    state[prefix + "position_embeddings"] = torch.cat(
        (
            pos[:, :1, :],
            F.interpolate(
                pos[:, 1:, :].reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2),
                size=(new_grid, new_grid),
                mode="bicubic",
                align_corners=False,
            )
            .permute(0, 2, 3, 1)
            .reshape(1, new_grid * new_grid, width),
        ),
        dim=1,
    )
    kernel = prefix + "patch_embeddings.projection.weight"
    state[kernel] = F.interpolate(
        state[kernel].float(), size=(NEW_PATCH, NEW_PATCH), mode="bicubic", align_corners=False
    )
    return state


DINOV2_CLASSES = {
    "dinov2": lambda: tf.Dinov2Model(tf.Dinov2Config(**DINOV2_SIZES)),
    "dinov2_registers": lambda: tf.Dinov2WithRegistersModel(
        tf.Dinov2WithRegistersConfig(**DINOV2_SIZES, num_register_tokens=4)
    ),
    "dinov2_classifier": lambda: tf.Dinov2ForImageClassification(tf.Dinov2Config(**DINOV2_SIZES, num_labels=3)),
}


def _seeded(build, seed: int = 0):
    torch.manual_seed(seed)
    return build().eval()


@pytest.mark.parametrize("name", sorted(DINOV2_CLASSES))
def test_resize_matches_the_official_conversion(name):
    model = _seeded(DINOV2_CLASSES[name])
    prefix = "dinov2.embeddings." if name == "dinov2_classifier" else "embeddings."
    expected = official_conversion(model.state_dict(), prefix)
    assert model.state_dict()[prefix + "position_embeddings"].shape[1] == 1 + OLD_GRID**2  # 1370 for DINOv2
    resized = resize_patch_embedding(model, patch_size=NEW_PATCH, image_size=NEW_SIZE)
    assert resized is model
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert state[prefix + "position_embeddings"].shape == (1, 1 + 32 * 32, HIDDEN)  # 1025 rows
    assert state[prefix + "patch_embeddings.projection.weight"].shape == (HIDDEN, 3, NEW_PATCH, NEW_PATCH)
    for key, tensor in expected.items():
        torch.testing.assert_close(state[key], tensor, rtol=1e-6, atol=1e-7, msg=key)
    assert (model.config.patch_size, model.config.image_size) == (NEW_PATCH, NEW_SIZE)


def test_resized_model_embeds_512_images_without_interpolating_and_round_trips(tmp_path):
    model = resize_patch_embedding(_seeded(DINOV2_CLASSES["dinov2"]), patch_size=NEW_PATCH, image_size=NEW_SIZE)
    images = pixels(1, seed=3, side=NEW_SIZE)
    embeddings = model.embeddings
    # the plain computation: a stride-16 convolution with the new kernel plus the new 32x32 positions, CLS in front
    projection = embeddings.patch_embeddings.projection
    patches = F.conv2d(images, projection.weight, projection.bias, stride=NEW_PATCH)  # [1, C, 32, 32]
    tokens = torch.cat([embeddings.cls_token, patches.flatten(2).transpose(1, 2)], dim=1)
    torch.testing.assert_close(embeddings(images), tokens + embeddings.position_embeddings, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path)
    reloaded, report = tf.Dinov2Model.from_pretrained(tmp_path, output_loading_info=True)
    assert not report["missing_keys"] and not report["mismatched_keys"]
    with torch.no_grad():
        hidden, reloaded_hidden = model(images).last_hidden_state, reloaded.eval()(images).last_hidden_state
    assert hidden.shape == (1, 1 + 32 * 32, HIDDEN)
    torch.testing.assert_close(reloaded_hidden, hidden, rtol=1e-5, atol=1e-5)


def test_the_new_users_first_line_fails_and_the_conversion_fixes_it(tmp_path):
    """What the README's official-checkpoint section replaces: patch_size=16 on a patch-14 checkpoint cannot load."""
    _seeded(DINOV2_CLASSES["dinov2"]).save_pretrained(tmp_path / "dinov2")
    with pytest.raises(Exception, match="size mismatch|mismatch"):
        tf.Dinov2Model.from_pretrained(tmp_path / "dinov2", patch_size=16)
    converted = resize_patch_embedding(str(tmp_path / "dinov2"))  # a folder: loaded, then resized
    assert converted.embeddings.position_embeddings.shape[1] == 1025


def test_command_writes_the_same_checkpoint(tmp_path, capsys):
    model = _seeded(DINOV2_CLASSES["dinov2"])
    model.save_pretrained(tmp_path / "in")
    tf.BitImageProcessor().save_pretrained(tmp_path / "in")
    resize_command([str(tmp_path / "in"), str(tmp_path / "out"), "--patch-size", "16", "--image-size", "512"])
    assert "patch size 16, 32x32 position grid" in capsys.readouterr().out
    written = tf.Dinov2Model.from_pretrained(tmp_path / "out").state_dict()
    expected = resize_patch_embedding(model).state_dict()
    for key, tensor in expected.items():
        torch.testing.assert_close(written[key], tensor, rtol=0, atol=0, msg=key)
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
    with pytest.raises(SystemExit):
        resize_command([str(tmp_path / "in"), str(tmp_path / "bad"), "--image-size", "500"])
    assert "positive multiple of patch_size" in capsys.readouterr().err


def test_resize_refuses_what_it_cannot_convert():
    with pytest.raises(ValueError, match="resizes DINOv2 models"):
        resize_patch_embedding(tf.ViTModel(tf.ViTConfig(**DINOV2_SIZES)))
    with pytest.raises(ValueError, match="positive multiple of patch_size"):
        resize_patch_embedding(_seeded(DINOV2_CLASSES["dinov2"]), patch_size=16, image_size=500)


# --- the pyramid -----------------------------------------------------------------------------------------------------


def pyramid_config(**kwargs) -> Dinov2PyramidConfig:
    return Dinov2PyramidConfig(**{**PYRAMID_SIZES, "out_features": OUT_FEATURES, "apply_layernorm": False, **kwargs})


def _plain_and_pyramid(adapter: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A `Dinov2Backbone` and a `Dinov2PyramidBackbone` with the same weights (and the same Rein adapter)."""
    plain_config = tf.Dinov2Config(
        **PYRAMID_SIZES, out_features=OUT_FEATURES, apply_layernorm=False, reshape_hidden_states=True
    )
    plain = _seeded(lambda: tf.Dinov2Backbone(plain_config))
    pyramid = Dinov2PyramidBackbone(pyramid_config()).eval()
    pyramid.load_state_dict(plain.state_dict())
    if adapter:
        models = []
        for model in (plain, pyramid):
            peft_model = get_peft_model(model, ReinConfig(token_length=6, lora_dim=4))
            randomize_adapter(peft_model)
            models.append(peft_model.eval())
        plain, pyramid = models
    return plain, pyramid


@pytest.mark.parametrize("adapter", [False, True], ids=["bare", "rein"])
def test_pyramid_resizes_the_plain_backbones_maps(adapter):
    plain, pyramid = _plain_and_pyramid(adapter)
    images = pixels(2, seed=4)
    with torch.no_grad():
        maps, pyramid_maps = plain(pixel_values=images).feature_maps, pyramid(pixel_values=images).feature_maps
    assert [tuple(feature.shape[-2:]) for feature in pyramid_maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    for feature, scale, resized in zip(maps, [4, 2, 1, 0.5], pyramid_maps, strict=True):
        expected = feature if scale == 1 else F.interpolate(feature, scale_factor=scale, mode="bilinear")
        assert_same_numbers(resized, expected)
    if adapter:  # Rein found the same layers, prefix tokens and patch size in both
        plain_rein, pyramid_rein = (model.base_model.model.encoder.rein for model in (plain, pyramid))
        assert plain_rein.rein_settings == pyramid_rein.rein_settings
        with torch.no_grad():
            bare = pyramid.get_base_model()
            with pyramid.disable_adapter():
                unrefined = bare(pixel_values=images).feature_maps[-1]
        assert (unrefined - pyramid_maps[-1]).abs().max() > 1e-3  # the refinement reaches the pyramid


def test_pyramid_returns_tuples_and_hidden_states_like_the_plain_backbone():
    plain, pyramid = _plain_and_pyramid(adapter=False)
    images = pixels(1, seed=5)
    with torch.no_grad():
        plain_output = plain(pixel_values=images, output_hidden_states=True)
        as_tuple = pyramid(pixel_values=images, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple[0]) == 4
    for hidden, expected in zip(as_tuple[1], plain_output.hidden_states, strict=True):
        assert_same_numbers(hidden, expected)


def test_pyramid_loads_a_dinov2_checkpoint_unchanged(tmp_path):
    """transformers 5 renames DINOv2's checkpoint keys by class name on load; the pyramid registers the same renames,
    so every weight, the attention projections included, is the checkpoint's."""
    dinov2 = _seeded(lambda: tf.Dinov2Model(tf.Dinov2Config(**PYRAMID_SIZES)))
    dinov2.save_pretrained(tmp_path)
    config = Dinov2PyramidConfig.from_pretrained(tmp_path, out_features=OUT_FEATURES, apply_layernorm=False)
    pyramid, report = Dinov2PyramidBackbone.from_pretrained(tmp_path, config=config, output_loading_info=True)
    assert not report["missing_keys"] and not report["unexpected_keys"] and not report["mismatched_keys"]
    assert pyramid.state_dict().keys() == dinov2.state_dict().keys()  # the same parameter names
    for key, tensor in dinov2.state_dict().items():
        torch.testing.assert_close(pyramid.state_dict()[key], tensor, rtol=0, atol=0, msg=key)

    class UnregisteredPyramid(Dinov2PyramidBackbone):  # a class of its own without the renames
        pass

    _, report = UnregisteredPyramid.from_pretrained(tmp_path, config=config, output_loading_info=True)
    assert any("attention.q_proj" in key for key in report["missing_keys"])  # what the registration prevents


def test_auto_classes_and_segmentation_configs_build_and_reload_the_pyramid(tmp_path):
    config = pyramid_config()
    assert isinstance(tf.AutoConfig.for_model("dinov2_pyramid"), Dinov2PyramidConfig)
    assert type(tf.AutoBackbone.from_config(config)) is Dinov2PyramidBackbone
    upernet_config = tf.UperNetConfig(
        backbone_config=config, num_labels=3, hidden_size=16, pool_scales=[1, 2], use_auxiliary_head=False
    )
    # the pyramid's strides at patch 8: 2, 4, 8, 16
    mask2former_config = tiny_mask2former_config(config, num_queries=6, feature_strides=[2, 4, 8, 16], common_stride=2)
    images = pixels(1, seed=6)
    for model_class, model_config, backbone in [
        (tf.UperNetForSemanticSegmentation, upernet_config, "backbone"),
        (tf.Mask2FormerForUniversalSegmentation, mask2former_config, "model.pixel_level_module.encoder"),
    ]:
        model = _seeded(lambda: model_class(model_config))  # noqa: B023
        assert type(model.get_submodule(backbone)) is Dinov2PyramidBackbone
        folder = tmp_path / model_class.__name__
        model.save_pretrained(folder)
        reloaded = model_class.from_pretrained(folder).eval()
        assert type(reloaded.config.backbone_config) is Dinov2PyramidConfig
        assert reloaded.config.backbone_config.feature_scales == [4, 2, 1, 0.5]
        for key, tensor in model.state_dict().items():
            torch.testing.assert_close(reloaded.state_dict()[key], tensor, rtol=0, atol=0, msg=key)
        with torch.no_grad():
            output = model(pixel_values=images)
        assert all(torch.isfinite(value).all() for value in output.values() if isinstance(value, torch.Tensor))


def test_pyramid_refuses_a_scale_per_map_mismatch():
    with pytest.raises(ValueError, match="4 out_features .* but 3 feature_scales"):
        Dinov2PyramidBackbone(pyramid_config(feature_scales=[4, 2, 1]))
    with pytest.raises(ValueError, match="reshape_hidden_states=False"):
        Dinov2PyramidBackbone(pyramid_config(reshape_hidden_states=False))
    with pytest.raises(ValueError, match="positive resize factors"):
        pyramid_config(feature_scales=[4, 2, 0, 0.5])
    assert rein_peft.Dinov2PyramidConfig().feature_scales == [4, 2, 1, 0.5]  # the default, for any out_features


# --- the official position interpolation -----------------------------------------------------------------------------


def official_interpolate_pos_encoding(pos_embed: torch.Tensor, x: torch.Tensor, w: int, h: int, patch_size: int):
    """`interpolate_pos_encoding` of the official `rein/models/backbones/dino_v2.py`, rewritten plainly (its names:
    `w` is the image's height, `h` its width, as `B, nc, w, h = x.shape` gives them)."""
    previous_dtype = x.dtype
    npatch, N = x.shape[1] - 1, pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = x.shape[-1]
    w0, h0 = w // patch_size + 0.1, h // patch_size + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(N**0.5), int(N**0.5), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / N**0.5, h0 / N**0.5),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def _pyramid_at_dinov2_grid() -> Dinov2PyramidBackbone:
    """A pyramid backbone with DINOv2's 37x37 position table (patch 14 on 518), random positions."""
    torch.manual_seed(3)
    backbone = Dinov2PyramidBackbone(pyramid_config(**{**DINOV2_SIZES, "num_hidden_layers": 4})).eval()
    with torch.no_grad():
        backbone.embeddings.position_embeddings.normal_()
    return backbone


@pytest.mark.numerics
@pytest.mark.parametrize(("height", "width"), [(224, 336), (518, 280), (140, 700), (364, 364)])
def test_positions_are_interpolated_as_the_official_backbone_does(height, width):
    backbone = _pyramid_at_dinov2_grid()
    embeddings = backbone.embeddings
    grid = (height // OLD_PATCH) * (width // OLD_PATCH)
    tokens = torch.zeros(1, 1 + grid, HIDDEN)
    positions = embeddings.interpolate_pos_encoding(tokens, height, width)
    table = embeddings.position_embeddings
    expected = official_interpolate_pos_encoding(table, tokens, height, width, OLD_PATCH)
    assert positions.shape == (1, 1 + grid, HIDDEN)
    assert_same_numbers(positions, expected)
    transformers_way = tf.models.dinov2.modeling_dinov2.Dinov2Embeddings.interpolate_pos_encoding(
        embeddings, tokens, height, width
    )
    assert (transformers_way - positions).abs().max() > 1e-3  # what the pyramid inherited differs
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the forward adds these positions
        first = backbone(pixel_values=images, output_hidden_states=True).hidden_states[0]
        patches = embeddings.patch_embeddings(images)  # [1, h0 * w0, C]
    tokens = torch.cat([embeddings.cls_token, patches], dim=1)
    assert_same_numbers(first, tokens + expected)


def test_positions_at_the_tables_own_size_are_the_table():
    backbone = _pyramid_at_dinov2_grid()
    tokens = torch.zeros(1, 1 + OLD_GRID * OLD_GRID, HIDDEN)
    side = OLD_PATCH * OLD_GRID
    assert backbone.embeddings.interpolate_pos_encoding(tokens, side, side) is backbone.embeddings.position_embeddings
