"""The domain-generalization benchmark: its pipeline end to end (`--quick`, not its numbers), the user path (a DINOv2
checkpoint folder and `datasets` folders, as real checkpoints and data sets take), and the parts its claims rest on."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import HEAVY, assert_same_numbers
from PIL import Image
from safetensors.torch import load_file
from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import domain_generalization as dg  # noqa: E402
from dg_miniature.benchmark import kept_runs, run_order  # noqa: E402
from dg_miniature.evaluation import (  # noqa: E402
    PREMISE_MIN_COSINE,
    PREMISE_MIN_SOURCE_MIOU,
    ROOM_MIN_GAP,
    feature_similarity,
    room_gate,
)
from dg_miniature.foundations import (  # noqa: E402
    FOLDER_PREFIX,
    BackboneRecipe,
    build_backbone,
    foundation_recipe,
    pretrain_vicreg,
    variance_covariance,
)
from dg_miniature.methods import METHODS, backbone_of, segmenter, segmenter_config  # noqa: E402
from dg_miniature.settings import SETTINGS  # noqa: E402
from dg_miniature.task import miniature_task, pixel_batches  # noqa: E402
from dg_miniature.world import (  # noqa: E402
    CLASS_NAMES,
    COLOUR_CLASS_NAMES,
    COLOUR_STYLES,
    RECOLOURED,
    SHAPE_STYLES,
    STYLES,
    draw_colours_layout,
    draw_layout,
    draw_shapes_layout,
    scenes,
)

QUICK = dg.QUICK
TARGET_STYLES = ["texture", "palette", "noise", "blur", "lighting", "real"]


# the tests that read the one quick run (`quick_run`): one worker runs them all, so the module's fixture runs once
QUICK_RUN = pytest.mark.xdist_group("domain_generalization_quick_run")


@dataclass(frozen=True)
class QuickRun:
    folder: Path  # holding the cache ("cache"), the first run's output ("out") and the second's ("again")
    first: str  # stdout of `--quick`, into an empty cache
    second: str  # stdout of `--quick --setting colours --methods full frozen rein --resume`, into the same cache


def _run_quick(cache: Path, output: Path, *flags: str) -> str:
    """The command line `domain_generalization.py --quick`, in this process (a subprocess would only add seconds of
    imports: the script's `__main__` only calls `main`, run as `__main__` by tests/test_command_lines.py); its
    stdout."""
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        dg.main(["--quick", *flags, "--cache_dir", str(cache), "--output", str(output)])
    return stdout.getvalue()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """The quick benchmark, every method, into an empty cache; then the second setting (two methods) into the same
    cache."""
    folder = tmp_path_factory.mktemp("domain_generalization_quick")
    first = _run_quick(folder / "cache", folder / "out")
    flags = ["--setting", "colours", "--methods", "full", "frozen", "rein", "--resume"]
    return QuickRun(folder, first, _run_quick(folder / "cache", folder / "again", *flags))


@HEAVY
@QUICK_RUN
def test_quick_run_checks_the_premise_first_reports_every_method_and_style_and_caches_the_backbone(quick_run):
    first, tmp_path = quick_run.first, quick_run.folder
    assert "building the foundation backbone" in first
    results = json.loads((tmp_path / "out" / "domain_generalization_vicreg_quick.json").read_text())
    assert (tmp_path / "out" / "domain_generalization_vicreg_quick.png").stat().st_size > 0
    assert results["target_names"] == TARGET_STYLES and results["source_name"] == "synthetic"
    assert [run["method"] for run in results["runs"]] == list(METHODS)
    for run in results["runs"]:
        figures = [run["source_miou"], *run["target_miou"].values()]
        assert all(0 <= figure <= 1 for figure in figures) and run["train_seconds"] > 0
        assert run["target_mean_miou"] == pytest.approx(np.mean(list(run["target_miou"].values())))
        assert list(run["feature_similarity"]) == TARGET_STYLES  # paired styles: the diagnostic is measured
        assert all(-1 <= value <= 1 for value in run["feature_similarity"].values())
        assert list(run["per_class_iou"]) == ["source", *TARGET_STYLES]  # per-class IoU of every split
        source = [value for value in run["per_class_iou"]["source"] if value is not None]
        assert len(run["per_class_iou"]["source"]) == len(CLASS_NAMES)
        assert run["source_miou"] == pytest.approx(np.mean(source))  # their mean, the split's mIoU
    backbone = {method: row["trainable_backbone_params"] for method, row in results["summary"].items()}
    assert backbone["frozen"] == 0 < backbone["rein_lora16"] < backbone["rein"] < backbone["full"]
    assert 0 < backbone["lora"] < backbone["full"] and 0 < backbone["soma"] < backbone["full"]
    decoder = {row["trainable_params"] - row["trainable_backbone_params"] for row in results["summary"].values()}
    assert len(decoder) == 1  # the same decoder for every method

    # the premise is the frozen foundation's: what the frozen method, whose backbone never moves, also measures
    frozen = next(run for run in results["runs"] if run["method"] == "frozen")
    assert list(results["premise"]) == TARGET_STYLES
    for style, value in results["premise"].items():
        assert value == pytest.approx(frozen["feature_similarity"][style], abs=1e-5)
    assert -1 <= results["premise_other_scenes"] <= 1
    gate = results["premise_gate"]
    assert gate["frozen_source_miou"] == frozen["source_miou"]
    assert gate["cosine_met"] == (min(results["premise"].values()) >= PREMISE_MIN_COSINE)
    assert gate["source_miou_met"] == (frozen["source_miou"] >= PREMISE_MIN_SOURCE_MIOU)
    assert first.index("gate: every style") < first.index("PEFT LoRA (r=16, q/v), seed 0")
    recipe = foundation_recipe("vicreg", quick=True)
    (point,) = results["pretraining"]["premise_curve"]  # the quick recipe's 4 steps: one point, at the end
    assert point["step"] == recipe.steps and list(point["premise"]) == TARGET_STYLES
    rows, scenes = 1 + len(TARGET_STYLES), QUICK["pictures"]
    picture = Image.open(tmp_path / "out" / "domain_generalization_vicreg_quick_predictions.png")
    tile = 2 * 64  # image, label map and each method's prediction per scene, then a quarter-tile gap
    assert picture.size == (scenes * (tile * (2 + len(METHODS)) + tile // 4), rows * tile)

    (folder,) = (tmp_path / "cache").iterdir()  # named by the recipe's hash, the recipe written beside the weights
    assert folder.name == FOLDER_PREFIX + recipe.fingerprint()
    assert json.loads((folder / "recipe.json").read_text())["steps"] == recipe.steps
    assert json.loads((folder / "config.json").read_text())["model_type"] == "dinov2"
    # a setting with a room gate, on the same foundation (not rebuilt): the gate once the first seed's frozen and full
    # fine-tuning runs are made (they run first, whatever the order of --methods: `run_order`), the comparison only
    # if it is met; --resume writes the JSON after every run (nothing to keep in a new folder)
    out = quick_run.second
    assert "building the foundation backbone" not in out
    assert (
        out.index("frozen backbone + decoder, seed 0") < out.index("full fine-tuning, seed 0") < out.index("room gate")
    )
    colours = json.loads((tmp_path / "again" / "domain_generalization_vicreg_colours_quick.json").read_text())
    assert colours["setting"] == "colours" and colours["class_names"] == list(COLOUR_CLASS_NAMES)
    assert colours["settings"]["decoder_channels"] == SETTINGS["colours"].defaults["decoder_channels"]
    assert colours["summary"]["full"]["seeds"] == [0]
    source = {run["method"]: run["source_miou"] for run in colours["runs"]}
    room = colours["room_gate"]
    assert room["gap"] == pytest.approx(source["full"] - source["frozen"]) and room["min_gap"] == ROOM_MIN_GAP
    assert room["lowest_cosine"] == pytest.approx(min(colours["premise"].values()))
    assert room["met"] == (room["gap"] >= ROOM_MIN_GAP and room["lowest_cosine"] >= PREMISE_MIN_COSINE)
    compared = ["full", "frozen", "rein"] if room["met"] else ["full", "frozen"]  # a gate not met stops the rest
    assert list(colours["summary"]) == compared
    assert ("the comparison stops here" in out) == (not room["met"])
    # the street setting's bar against collapse (the frozen backbone's source mIoU at least 85) is not this one's
    assert colours["premise_gate"]["min_source_miou"] is None and colours["premise_gate"]["source_miou_met"] is None
    assert (tmp_path / "again" / "domain_generalization_vicreg_colours_quick_predictions.png").stat().st_size > 0
    assert results["setting"] == "street" and results["room_gate"] is None


@HEAVY  # as the other test of the quick run, so that they stay together and the module's fixture runs once
@QUICK_RUN
def test_a_rebuilt_foundation_has_the_same_weights(quick_run, tmp_path):
    """Built twice from scratch (the quick recipe) into two caches, the quick run's and a new one: the same tensors,
    bit for bit. Same process (the module's fixture ran in this one), same kernels, same thread count: a rebuild that
    differs at all draws or trains differently, and its cache name lies."""
    recipe = foundation_recipe("vicreg", quick=True)
    folders = [quick_run.folder / "cache" / (FOLDER_PREFIX + recipe.fingerprint())]
    folders.append(build_backbone(recipe, str(tmp_path / "second")))
    first, second = (load_file(Path(folder) / "model.safetensors") for folder in folders)
    assert list(first) == list(second) and len(first) > 10
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name  # determinism is the claim: no tolerance
    curves = [json.loads((Path(folder) / "recipe.json").read_text())["premise_curve"] for folder in folders]
    assert curves[0] == curves[1]


def test_retired_foundations_are_refused_and_the_help_says_so(capsys):
    with pytest.raises(SystemExit):
        dg.main(["--foundation", "mae"])
    assert "invalid choice: 'mae'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        dg.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help to the terminal's width
    assert exit_info.value.code == 0 and "the MAE ones were retired" in help_text


def test_a_checkpoint_folder_and_dataset_folders_run_the_same_protocol(tmp_path, capsys):
    """The path of `--backbone facebook/dinov2-small --source ./gtav --target cityscapes=./cityscapes`."""
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=8)
    Dinov2Model(config).save_pretrained(tmp_path / "backbone")
    BitImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(tmp_path / "backbone")
    source = datasets.DatasetDict({"train": scenes(STYLES["synthetic"], 24, 1, 48)})
    source["validation"] = scenes(STYLES["synthetic"], 6, 2, 48)
    source.save_to_disk(tmp_path / "gtav")
    scenes(STYLES["real"], 6, 2, 48).save_to_disk(tmp_path / "cityscapes")
    flags = ["--backbone", str(tmp_path / "backbone"), "--image_size", "32", "--num_labels", "5"]
    flags += ["--source", str(tmp_path / "gtav"), "--methods", "frozen", "rein", "--seeds", "0", "1"]
    flags += ["--steps", "2", "--batch_size", "4", "--output", str(tmp_path / "out")]
    results = dg.main([*flags, "--target", f"cityscapes={tmp_path / 'cityscapes'}"])
    assert results["backbone"] == str(tmp_path / "backbone") and results["target_names"] == ["cityscapes"]
    assert results["backbone_recipe"] is None and len(results["runs"]) == 4
    rein = results["summary"]["rein"]
    assert set(rein["target_miou"]) == {"cityscapes"} and rein["source_miou"]["std"] >= 0
    assert rein["feature_similarity"] == {}  # unpaired datasets: no scene-by-scene comparison
    assert results["premise"] == {} and results["premise_other_scenes"] is None and results["pretraining"] is None
    assert (tmp_path / "out" / "domain_generalization.png").stat().st_size > 0

    with pytest.raises(SystemExit, match="NAME=DATASET"):
        dg.main([*flags, "--target", str(tmp_path / "cityscapes")])
    with pytest.raises(SystemExit):  # the settings are the miniature's tasks, not a user's
        dg.main([*flags, "--setting", "shapes"])
    assert "--setting picks the miniature's source task" in capsys.readouterr().err


def test_feature_similarity_is_one_for_the_same_images_and_lower_across_styles(tmp_path):
    Dinov2Model(
        Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
    ).save_pretrained(tmp_path)
    BitImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(tmp_path)
    task = miniature_task(train_images=4, eval_images=6, side=32)
    config = segmenter_config(str(tmp_path), task, decoder_channels=16)
    deepest = segmenter_config(str(tmp_path), task, decoder_channels=16, deepest_layer_only=True)
    assert config.backbone_config.out_features == ["stage1", "stage2"]  # 4 evenly spaced layers of 2: both
    assert deepest.backbone_config.out_features == ["stage2"]
    processor = BitImageProcessorPil.from_pretrained(tmp_path)
    source, palette = (
        pixel_batches(split, processor, 32, config)[:]["pixel_values"]
        for split in (task.source, task.targets["palette"])
    )
    backbone = backbone_of(segmenter(config, str(tmp_path), seed=0))
    assert feature_similarity(backbone, source, source) == pytest.approx(1.0, abs=1e-5)
    assert feature_similarity(backbone, source, palette) < 0.99
    # batches only split the work: 6 scenes in batches of 4 and 2 give the mean over all of them
    assert feature_similarity(backbone, source, palette, batch_size=4) == pytest.approx(
        feature_similarity(backbone, source, palette), abs=1e-6
    )


def test_styles_share_the_layouts_and_differ_in_pixels():
    synthetic, real = scenes(STYLES["synthetic"], 8, 5, 32), scenes(STYLES["real"], 8, 5, 32)
    labels = np.stack([np.asarray(label) for label in synthetic["label"]])
    assert np.array_equal(labels, np.stack([np.asarray(label) for label in real["label"]]))
    assert set(np.unique(labels)) == set(range(len(CLASS_NAMES)))
    pixels = [np.stack([np.asarray(image, float) for image in split["image"]]) for split in (synthetic, real)]
    assert np.abs(pixels[0] - pixels[1]).mean(axis=(1, 2, 3)).min() > 10  # of 255


def test_the_room_gate_needs_both_runs_the_gap_and_the_premise():
    premise = {"palette": 0.9, "real": 0.85}
    assert room_gate(premise, 0.5, None)["met"] is None and room_gate(premise, None, 0.7)["gap"] is None
    gate = room_gate(premise, 0.5, 0.5 + ROOM_MIN_GAP + 0.01)
    assert gate["met"] and gate["gap"] == pytest.approx(ROOM_MIN_GAP + 0.01) and gate["lowest_cosine"] == 0.85
    assert not room_gate(premise, 0.5, 0.5 + ROOM_MIN_GAP - 0.01)["met"]  # too little room
    assert not room_gate({**premise, "real": PREMISE_MIN_COSINE - 0.01}, 0.5, 0.9)["met"]  # the premise fails


def test_the_room_gates_runs_come_first_and_resume_keeps_only_matching_runs(tmp_path):
    order = [("frozen", 0), ("full", 0), ("soma", 0), ("soma", 1), ("full", 1), ("frozen", 1)]
    assert run_order(["soma", "full", "frozen"], [0, 1], room_first=True) == order
    assert run_order(["soma", "frozen"], [3], room_first=False) == [("soma", 3), ("frozen", 3)]
    args = argparse.Namespace(methods=["soma"], seeds=[0], steps=100, setting="street", output=str(tmp_path))
    foundation = {"backbone_recipe": {"layers": 6}, "premise_curve": [{"step": 1000, "premise": {"real": 0.92}}]}
    runs = [{"method": method, "seed": seed} for method in ("frozen", "soma") for seed in (0, 1)]
    earlier = {  # written before --setting existed: the street setting's
        "settings": {"methods": ["frozen", "soma"], "seeds": [0, 1], "steps": 100},
        "backbone_recipe": foundation["backbone_recipe"],
        "pretraining": {"seconds": 800.0, "premise_curve": foundation["premise_curve"]},
        "runs": runs,
    }
    path = tmp_path / "results.json"
    assert kept_runs(str(path), args, foundation) == {}  # nothing written yet: nothing kept
    path.write_text(json.dumps(earlier))
    assert kept_runs(str(path), args, foundation) == {("soma", 0): runs[2]}  # only what is asked for
    with pytest.raises(SystemExit, match=r"--steps 100 there, 200 now.*drop --resume"):
        kept_runs(str(path), argparse.Namespace(**{**vars(args), "steps": 200}), foundation)
    with pytest.raises(SystemExit, match=r"--setting 'street' there, 'shapes' now"):
        kept_runs(str(path), argparse.Namespace(**{**vars(args), "setting": "shapes"}), foundation)
    rebuilt = {**foundation, "premise_curve": [{"step": 1000, "premise": {"real": 0.91}}]}
    with pytest.raises(SystemExit, match="the foundation"):
        kept_runs(str(path), args, rebuilt)


def test_the_shapes_setting_adds_look_alike_classes_to_the_same_streets():
    """Conifers and vans drawn over `draw_layout`'s streets, in the colors of trees and cars in every style."""
    street = scenes(STYLES["synthetic"], 1, 4, 64)
    shapes = scenes(SHAPE_STYLES["synthetic"], 6, 4, 64, draw=draw_shapes_layout)
    labels = np.stack([np.asarray(label) for label in shapes["label"]])
    assert set(np.unique(labels)) <= set(range(len(CLASS_NAMES) + 2)) and (labels >= len(CLASS_NAMES)).any()
    # the first scene is the same street (later ones differ: the new shapes draw from the same generator), and where
    # no new shape covers it, its labels are the street's
    first, kept = labels[0], labels[0] < len(CLASS_NAMES)
    assert np.array_equal(first[kept], np.asarray(street["label"][0])[kept]) and not kept.all()
    for style in SHAPE_STYLES.values():
        assert style.colors[-2:] == (style.colors[3], style.colors[4]) and len(style.textures) == len(style.colors)


def test_the_colours_setting_splits_classes_by_colour_alone():
    """Buildings, trees and vehicles turned into their twin classes, the same layouts, each twin in a color of its own
    in every style and in its look-alike's texture."""
    street, colours = draw_layout(np.random.default_rng(3), 64), draw_colours_layout(np.random.default_rng(3), 64)
    assert np.array_equal(colours.instances, street.instances)
    twins = {like: len(CLASS_NAMES) + index for index, like in enumerate(RECOLOURED)}
    for base, recoloured in zip(street.instance_classes, colours.instance_classes, strict=True):
        assert recoloured in (base, twins.get(base, base))
    labels = np.stack(
        [np.asarray(label) for label in scenes(COLOUR_STYLES["real"], 6, 4, 64, draw=draw_colours_layout)["label"]]
    )
    assert set(np.unique(labels)) == set(range(len(COLOUR_CLASS_NAMES)))
    for style in COLOUR_STYLES.values():
        assert None not in style.colors and len(set(style.colors)) == len(COLOUR_CLASS_NAMES)
        assert style.textures[len(CLASS_NAMES) :] == tuple(style.textures[like] for like in RECOLOURED)


def test_the_cache_is_named_by_the_recipe():
    recipe = BackboneRecipe()
    assert recipe.fingerprint() == BackboneRecipe().fingerprint()
    assert recipe.fingerprint() != BackboneRecipe(steps=recipe.steps + 1).fingerprint()


@pytest.mark.numerics
def test_the_pretraining_premise_is_the_reported_premise(tmp_path):
    """The premise logged during pretraining (on the bare `Dinov2Model`) is what the benchmark reports on the frozen
    segmenter built from the saved checkpoint (its `Dinov2Backbone`, which feeds the decoder)."""
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32)
    bare = Dinov2Model(config).eval()
    bare.save_pretrained(tmp_path)
    processor = BitImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False)
    processor.save_pretrained(tmp_path)
    task = miniature_task(train_images=4, eval_images=6, side=32)
    model_config = segmenter_config(str(tmp_path), task, decoder_channels=16)
    source, real = (
        pixel_batches(split, processor, 32, model_config)[:]["pixel_values"]
        for split in (task.source, task.targets["real"])
    )
    segmenter_backbone = backbone_of(segmenter(model_config, str(tmp_path), seed=0))
    expected = torch.tensor(feature_similarity(segmenter_backbone, source, real))
    assert_same_numbers(torch.tensor(feature_similarity(bare, source, real)), expected)


def test_variance_covariance_penalise_collapse_and_redundancy():
    generator = torch.Generator().manual_seed(0)
    collapsed = torch.ones(500, 8)
    independent = torch.randn(20000, 8, generator=generator)
    redundant = torch.randn(20000, 1, generator=generator).expand(20000, 8)
    variance, covariance = variance_covariance(collapsed)
    assert variance.item() == pytest.approx(0.99) and covariance.item() == 0  # std 0: the whole hinge
    variance, covariance = variance_covariance(independent)
    assert variance.item() < 0.02 and covariance.item() < 0.01
    variance, covariance = variance_covariance(redundant)
    assert variance.item() < 0.02 and covariance.item() == pytest.approx(7, rel=0.05)  # 8 * 7 covariances of 1, / 8


def test_vicreg_pretraining_learns_a_dinov2_backbone_and_logs_the_premise():
    recipe = replace(foundation_recipe("vicreg", quick=True), images=16, steps=2, batch=4)
    processor = BitImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False)
    backbone, curve = pretrain_vicreg(recipe, processor, log_every=1)
    assert isinstance(backbone, Dinov2Model) and backbone.config.num_hidden_layers == recipe.layers
    assert [point["step"] for point in curve] == [1, 2] and all(np.isfinite(point["loss"]) for point in curve)
    assert curve[0]["premise"] != curve[1]["premise"]  # the backbone learned between the two
    assert list(curve[0]["premise"]) == TARGET_STYLES
