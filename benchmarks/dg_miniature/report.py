"""The report: the results as Markdown tables (mIoU, feature similarity, per-class IoU, the premise and its gate), a
chart, a picture of the first seed's predictions and one of the styles, and the JSON of every number."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image

from .methods import METHOD_NAMES
from .settings import DEFAULT_SETTING, SETTINGS, Setting
from .world import SOURCE_STYLE, scenes

RESULT_STEM = "domain_generalization"  # the output files' names: this, the foundation, the segmenter, quick or not


def result_stem(args: argparse.Namespace) -> str:
    """The output files' path without extension: in `args.output`, named by the foundation (none for a checkpoint
    named by --backbone), the setting (none for the default), the segmenter and --quick."""
    name = RESULT_STEM + ("" if args.backbone else "_" + args.foundation)
    name += "" if args.setting == DEFAULT_SETTING else "_" + args.setting
    name += ("_official" if args.segmenter == "official" else "") + ("_quick" if args.quick else "")
    return os.path.join(args.output, name)


def write_json(result: dict, args: argparse.Namespace) -> str:
    """The JSON of every number at `result_stem(args)`; returns the stem."""
    os.makedirs(args.output, exist_ok=True)
    stem = result_stem(args)
    with open(stem + ".json", "w") as file:
        json.dump(result, file, indent=2)
    return stem


def write(result: dict, pictures: dict[str, dict[str, dict]], args: argparse.Namespace) -> str:
    """The JSON, the chart and the prediction picture (and, for the miniature, the styles) at `result_stem(args)`;
    returns the stem. A picture of only some of the methods (`--resume` keeps the others' numbers, not their
    predictions) is named by them: `<stem>_predictions_<method>_<method>.png`."""
    stem = write_json(result, args)
    plot(result, stem + ".png")
    # the table's order; none with `--pictures 0`
    pictures = {method: pictures[method] for method in result["summary"] if method in pictures and args.pictures}
    picture = stem + "_predictions"
    picture += "" if len(pictures) == len(result["summary"]) else "_" + "_".join(pictures)
    if pictures:
        prediction_picture(pictures, picture + ".png")
    print(f"\nwrote {stem}.json, {stem}.png" + (f" and {picture}.png" if pictures else ""))
    if args.source is None:
        preview_styles(stem + "_styles.png", SETTINGS[args.setting])
    return stem


def print_table(result: dict) -> None:
    """The results as Markdown tables: mIoU per method, and (for paired styles) the feature similarity."""
    targets, summary = result["target_names"], result["summary"]
    if result["premise"]:
        print_premise(result["premise"], result["premise_gate"], result["premise_other_scenes"])
    if result["room_gate"]:
        print_room_gate(result["room_gate"])
    print(f"\nmIoU (%) trained on {result['source_name']!r}, mean ± std over seeds {result['settings']['seeds']}\n")
    _markdown_row(["method", "trainable (backbone)", "source", *targets, "target mean", "train s", "seeds"])
    _markdown_row(["---"] * (len(targets) + 6))
    for method, row in summary.items():
        cells = [METHOD_NAMES[method], f"{row['trainable_params']:,} ({row['trainable_backbone_params']:,})"]
        cells += [_percent(row["source_miou"]), *(_percent(row["target_miou"][name]) for name in targets)]
        cells += [_percent(row["target_mean_miou"]), f"{row['train_seconds']['mean']:.0f}"]
        _markdown_row([*cells, ", ".join(map(str, row["seeds"]))])
    if any(row["feature_similarity"] for row in summary.values()):
        print("\ncosine similarity of the deepest decoder input, same scenes in source vs target style (mean)\n")
        _markdown_row(["method", *targets])
        _markdown_row(["---"] * (len(targets) + 1))
        for method, row in summary.items():
            similarity = row["feature_similarity"]
            _markdown_row([METHOD_NAMES[method], *(f"{similarity[name]['mean']:.3f}" for name in targets)])
    print("\nIoU (%) per class, mean over the target styles (the source in brackets)\n")
    _markdown_row(["method", *result["class_names"]])
    _markdown_row(["---"] * (len(result["class_names"]) + 1))
    for method, row in summary.items():
        cells = [
            f"{_percent(target)} ({100 * source['mean']:.1f})" if target and source else "-"
            for target, source in zip(row["target_per_class_iou"], row["source_per_class_iou"], strict=True)
        ]
        _markdown_row([METHOD_NAMES[method], *cells])


def print_premise(premise: dict[str, float], gate: dict, other_scenes: float) -> None:
    """The frozen foundation's cosine similarities, and whether they and the frozen source mIoU pass the gate."""
    print("\npremise: the frozen foundation's deepest features, same scenes in source vs target style (cosine)\n")
    _markdown_row([*premise, "other scenes, same style"])
    _markdown_row(["---"] * (len(premise) + 1))
    _markdown_row([*(f"{value:.3f}" for value in premise.values()), f"{other_scenes:.3f}"])
    source, bar = gate["frozen_source_miou"], gate["min_source_miou"]
    frozen = f"frozen backbone + decoder >= {100 * (bar or 0):.0f} mIoU on the source"
    if bar is None:
        frozen = "no bar on the frozen backbone + decoder's source mIoU in this setting"
    elif source is None:
        frozen += " (not measured: the frozen method was not run)"
    else:
        frozen += f" ({'met' if gate['source_miou_met'] else 'NOT met'}, {100 * source:.1f})"
    print(
        f"\ngate: every style >= {gate['min_cosine']} ({'met' if gate['cosine_met'] else 'NOT met'}, lowest "
        f"{min(premise.values()):.3f}); {frozen}",
        flush=True,
    )


def print_room_gate(gate: dict) -> None:
    """Whether the source task leaves room in-domain (`evaluation.room_gate`): full fine-tuning against the frozen
    backbone + decoder on the source (first seed), and the premise."""
    if gate["met"] is None:
        print("\nroom gate: not measured (it needs the frozen and the full fine-tuning runs)", flush=True)
        return
    print(
        f"\nroom gate ({'met' if gate['met'] else 'NOT met'}): full fine-tuning {100 * gate['full_source_miou']:.1f} "
        f"vs frozen backbone + decoder {100 * gate['frozen_source_miou']:.1f} mIoU on the source, a gap of "
        f"{100 * gate['gap']:.1f} (bar {100 * gate['min_gap']:.0f}); every style's premise >= {gate['min_cosine']} "
        f"(lowest {gate['lowest_cosine']:.3f})",
        flush=True,
    )


def _markdown_row(cells: list[str]) -> None:
    print("| " + " | ".join(cells) + " |")


def _percent(figure: dict) -> str:
    return f"{100 * figure['mean']:.1f} ± {100 * figure['std']:.1f}"


# per class: sky, building, road, vegetation, vehicle, then the shapes setting's conifer and van (the colours
# setting's glass building and autumn tree), the colours setting's blue vehicle
LABEL_COLORS = np.array(
    [[70, 130, 240], [150, 140, 120], [80, 80, 80], [40, 160, 40], [220, 30, 30], [20, 90, 60], [240, 150, 30]]
    + [[30, 50, 200]],
    np.uint8,
)


def preview_styles(path: str, setting: Setting, num_scenes: int = 6, side: int = 64) -> None:
    """One row per style of `setting` for the same held-out scenes, and their label maps below."""
    drawn = {name: scenes(style, num_scenes, 100, side, draw=setting.draw) for name, style in setting.styles.items()}
    rows = [np.concatenate([np.asarray(image) for image in split["image"]], 1) for split in drawn.values()]
    rows.append(np.concatenate([LABEL_COLORS[np.asarray(label)] for label in drawn[SOURCE_STYLE]["label"]], 1))
    grid = Image.fromarray(np.concatenate(rows, 0))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(path)


def prediction_picture(pictures: dict[str, dict[str, dict]], path: str, tile: int = 64) -> None:
    """The first seed's predictions: a row per split (the source, then each target), and for each pictured scene
    its image, its label map, then each method's prediction (columns in the order of `pictures`)."""

    def colored(label_map: np.ndarray) -> np.ndarray:  # classes past the palette cycle through it; ignored: black
        label_map = np.asarray(label_map).astype(np.int64)
        pixels = LABEL_COLORS[label_map % len(LABEL_COLORS)]
        pixels[label_map == 255] = 0
        return np.asarray(Image.fromarray(pixels).resize((tile, tile), Image.NEAREST))

    rows = []
    for split, examples in next(iter(pictures.values())).items():
        tiles = []
        for index, (image, label, _) in sorted(examples.items()):
            tiles.append(np.asarray(image.convert("RGB").resize((tile, tile), Image.BILINEAR)))
            tiles += [colored(label), *(colored(pictures[method][split][index][2]) for method in pictures)]
            tiles.append(np.full((tile, tile // 4, 3), 255, np.uint8))  # a gap between scenes
        rows.append(np.concatenate(tiles, 1))
    grid = Image.fromarray(np.concatenate(rows, 0))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(path)


def plot(result: dict, path: str) -> None:
    """The chart: mIoU per method on the source and each target (mean and std over seeds), and, where measured, the
    frozen foundation's premise per style against the gate and its growth during pretraining (matplotlib, from the
    `bench` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["source", *result["target_names"], "target mean"]
    premise, curve = result["premise"], (result["pretraining"] or {}).get("premise_curve", [])
    panels = 1 + bool(premise) + bool(curve)
    figure, axes = plt.subplots(
        1,
        panels,
        figsize=(2 + 1.3 * len(columns) + 4 * (panels - 1), 4.5),
        squeeze=False,
        gridspec_kw={"width_ratios": [3] + [1.2] * (panels - 1)},
    )
    axis = axes[0, 0]
    width = 0.8 / len(result["summary"])
    for index, (method, row) in enumerate(result["summary"].items()):
        figures = [row["source_miou"], *(row["target_miou"][name] for name in result["target_names"])]
        figures.append(row["target_mean_miou"])
        positions = np.arange(len(columns)) + (index - (len(result["summary"]) - 1) / 2) * width
        axis.bar(
            positions,
            [100 * figure["mean"] for figure in figures],
            width,
            yerr=[100 * figure["std"] for figure in figures],
            capsize=2,
            label=f"{METHOD_NAMES[method]} ({row['trainable_backbone_params']:,} backbone params)",
        )
    axis.set_xticks(np.arange(len(columns)), columns)
    axis.set_ylabel("mIoU (%)")
    axis.set_title(f"Trained on '{result['source_name']}', evaluated on unseen styles ({result['backbone']})")
    axis.legend(fontsize=7, loc="lower left")
    if premise:  # the frozen foundation's cosine similarities, and the gate
        axis = axes[0, 1]
        axis.bar(list(premise), list(premise.values()), color="gray")
        axis.axhline(result["premise_gate"]["min_cosine"], color="black", linestyle="--", linewidth=1)
        axis.set_ylim(0, 1)
        axis.set_title("premise: frozen features, source vs style (cosine)", fontsize=9)
        axis.tick_params(axis="x", labelrotation=45)
    if curve:  # how it grew with pretraining
        axis = axes[0, -1]
        for name in curve[0]["premise"]:
            axis.plot(
                [point["step"] for point in curve], [point["premise"][name] for point in curve], "o-", label=name
            )
        axis.axhline(result["premise_gate"]["min_cosine"], color="black", linestyle="--", linewidth=1)
        axis.set_xlabel("pretraining step")
        axis.set_ylim(0, 1)
        axis.set_title("premise during pretraining (other scenes)", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
