"""The benchmark: the foundation (built or named), the task, Rein's premise checked on the frozen foundation before
any method is compared, then each method trained from each seed and evaluated on the source and every target."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from dataclasses import asdict

import torch
from torch import nn
from transformers import AutoImageProcessor, Mask2FormerConfig, UperNetConfig

from rein_peft.official.segmenter import HEAD_MODULES

from . import report
from .evaluation import ROOM_METHODS, Evaluation, premise_gate, room_gate, style_similarities, summarize
from .foundations import build_backbone, foundation_recipe, pretraining_record
from .methods import DECODER, METHOD_NAMES, backbone_of, prepare, segmenter, segmenter_config, train
from .settings import DEFAULT_SETTING, SETTINGS
from .task import Task, miniature_task, pixel_batches, user_task
from .world import SOURCE_STYLE

REAL_IMAGE_SIZE = 224  # for a checkpoint named by --backbone, unless --image_size says otherwise
# --resume keeps earlier runs whatever these were: they do not change what a run measures
RESUME_FREE_SETTINGS = ("methods", "seeds", "pictures", "device", "resume", "output", "cache_dir")


def run_one(
    method: str,
    seed: int,
    config: UperNetConfig | Mask2FormerConfig,
    backbone_path: str,
    task: Task,
    data: dict,
    evaluation: Evaluation,
    args: argparse.Namespace,
) -> dict:
    """Trains `method` from `seed` and evaluates it; the first `args.pictures` predictions of every split are under
    `"predictions"` (images, label maps and predicted maps, for the pictures; not written to the JSON)."""
    model = prepare(segmenter(config, backbone_path, seed), method, seed).to(args.device)
    trainable = {name: param.numel() for name, param in model.named_parameters() if param.requires_grad}
    decoder = HEAD_MODULES if isinstance(config, Mask2FormerConfig) else [DECODER]
    seconds = train(model, method, data["train"], args, seed)
    scores = {"source": evaluation(model, task.source, args.pictures)}
    scores.update({name: evaluation(model, split, args.pictures) for name, split in task.targets.items()})
    targets = {name: scores[name]["mean_iou"] for name in task.targets}
    similarity = {}
    if task.paired:
        similarity = style_similarities(backbone_of(model), data["pixels"]["source"], data["pixels"]["targets"])
    return {
        "method": method,
        "seed": seed,
        "trainable_params": sum(trainable.values()),
        "trainable_backbone_params": sum(
            count for name, count in trainable.items() if not any(module in name for module in decoder)
        ),
        "train_seconds": seconds,
        "source_miou": scores["source"]["mean_iou"],
        "target_miou": targets,
        "target_mean_miou": statistics.fmean(targets.values()) if targets else float("nan"),
        # per class, in `class_names` order; None: a class neither in the labels nor in the predictions
        "per_class_iou": {name: score["per_category_iou"] for name, score in scores.items()},
        "feature_similarity": similarity,
        "predictions": {name: score["predictions"] for name, score in scores.items()},
    }


def frozen_premise(
    foundation: nn.Module, source: torch.Tensor, targets: dict[str, torch.Tensor]
) -> tuple[dict, float]:
    """Rein's premise on the frozen foundation (`foundation`, a segmenter before training): the similarity of its
    features for the same scenes in the source (`[N, 3, H, W]` pixels) and each target style; and, for scale, the
    similarity between different scenes in the same style (each source scene against the next). A similarity of
    the same scene across styles far above the latter is about the scene, not about being a street."""
    backbone = backbone_of(foundation)
    premise = style_similarities(backbone, source, targets)
    other_scenes = style_similarities(backbone, source, {"other": source.roll(-1, dims=0)})["other"]
    return premise, other_scenes


def run_order(methods: list[str], seeds: list[int], room_first: bool) -> list[tuple[str, int]]:
    """The (method, seed) pairs in the order they run: seed by seed, methods in the given order, except that with
    `room_first` the first seed's `ROOM_METHODS` run first, so that the room gate is known before the comparison."""
    first = [method for method in ROOM_METHODS if method in methods] if room_first else []
    order = [(method, seeds[0]) for method in first]
    order += [(method, seed) for seed in seeds for method in methods if (method, seed) not in order]
    return order


def kept_runs(path: str, args: argparse.Namespace, foundation: dict) -> dict[tuple[str, int], dict]:
    """`--resume`: the runs in the results JSON at `path` (none if it is missing) of the requested methods and seeds,
    if it was made with the same settings (all but the methods, seeds, pictures and device) and the same foundation
    (`foundation`: its recipe and pretraining record, whose premise curve stands for its weights)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as file:
        previous = json.load(file)
    # results written before --setting existed are the default setting's
    settings = {"setting": DEFAULT_SETTING, **previous["settings"]}
    differing = [
        f"--{key} {settings.get(key)!r} there, {value!r} now"
        for key, value in vars(args).items()
        if key not in RESUME_FREE_SETTINGS and settings.get(key) != value
    ]
    previous_foundation = {
        "backbone_recipe": previous["backbone_recipe"],
        "premise_curve": (previous["pretraining"] or {}).get("premise_curve"),
    }
    if previous_foundation != foundation:
        differing.append("the foundation (its recipe or its pretraining's premise curve)")
    if differing:
        raise SystemExit(
            f"--resume: {path} was made with other settings ({'; '.join(differing)}); drop --resume to start over, "
            "or give --output another folder."
        )
    requested = {(method, seed) for method in args.methods for seed in args.seeds}
    return {(run["method"], run["seed"]): run for run in previous["runs"] if (run["method"], run["seed"]) in requested}


def first_seed_source(runs: dict[tuple[str, int], dict], method: str, seed: int) -> float | None:
    """The source mIoU of `method`'s run from `seed`, `None` if it is not made (yet)."""
    return runs[(method, seed)]["source_miou"] if (method, seed) in runs else None


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    """The benchmark: the results (the JSON's), and the first seed's predictions per method and split (pictures;
    with `--resume`, of the methods run now)."""
    setting = SETTINGS[args.setting]
    recipe = foundation_recipe(args.foundation, args.quick, official=args.segmenter == "official")
    if args.backbone is None:
        backbone_path = build_backbone(recipe, args.cache_dir)
        backbone_name = f"{args.foundation}-pretrained miniature ViT ({recipe.layers} layers, width {recipe.hidden})"
    else:
        backbone_path = backbone_name = args.backbone
    side = args.image_size or (recipe.side if args.backbone is None else REAL_IMAGE_SIZE)
    if args.source is None:
        task, source_name = miniature_task(args.train_images, args.eval_images, side, setting), SOURCE_STYLE
    else:
        task, source_name = user_task(args), args.source
    processor = AutoImageProcessor.from_pretrained(backbone_path)
    config = segmenter_config(
        backbone_path,
        task,
        args.decoder_channels,
        args.segmenter == "official",
        miniature=args.backbone is None,
        deepest_layer_only=setting.deepest_layer_only and args.source is None,
    )
    data = {
        "train": pixel_batches(task.train, processor, side, config),
        "source": pixel_batches(task.source, processor, side, config),
        "targets": {name: pixel_batches(split, processor, side, config) for name, split in task.targets.items()},
    }
    evaluation = Evaluation(processor, side, resize=args.source is not None, device=args.device)
    premise, other_scenes = {}, None
    if task.paired:  # the same scenes in every style: their pixels, and the frozen foundation's premise (every seed's)
        data["pixels"] = {
            "source": data["source"][:]["pixel_values"],  # [N, 3, side, side]
            "targets": {name: split[:]["pixel_values"] for name, split in data["targets"].items()},
        }
        foundation = segmenter(config, backbone_path, args.seeds[0]).to(args.device)
        premise, other_scenes = frozen_premise(foundation, data["pixels"]["source"], data["pixels"]["targets"])
    pretraining = pretraining_record(backbone_path) if args.backbone is None else None
    recipe_record = asdict(recipe) if args.backbone is None else None
    kept = {}
    if args.resume:
        foundation_record = {
            "backbone_recipe": recipe_record,
            "premise_curve": (pretraining or {}).get("premise_curve"),
        }
        kept = kept_runs(report.result_stem(args) + ".json", args, foundation_record)
    first = args.seeds[0]
    gate = premise_gate(premise, min_source_miou=setting.min_frozen_source_miou)
    room = room_gate(premise, None, None) if setting.room_gate else None
    if premise and "frozen" not in args.methods:  # no frozen run to complete the gate: the similarities alone, first
        report.print_premise(premise, gate, other_scenes)
    if room is not None and not set(ROOM_METHODS) <= set(args.methods):
        report.print_room_gate(room)

    def assemble(made: dict[tuple[str, int], dict]) -> dict:
        """The results (the JSON's) of the runs `made`, in seed then method order; the summary of each method with
        a run."""
        ordered = [made[(method, seed)] for seed in args.seeds for method in args.methods if (method, seed) in made]
        methods = [method for method in args.methods if any(run["method"] == method for run in ordered)]
        return {
            "backbone": backbone_name,
            "backbone_recipe": recipe_record,
            "pretraining": pretraining,
            "setting": args.setting,
            "premise": premise,
            "premise_gate": gate,
            "premise_other_scenes": other_scenes,
            "room_gate": room,
            "class_names": task.class_names,
            "source_name": source_name,
            "target_names": list(task.targets),
            "settings": {key: value for key, value in vars(args).items() if key not in ("output", "cache_dir")},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
            "runs": ordered,
            "summary": summarize(ordered, methods, list(task.targets)),
        }

    runs, pictures = {}, {}
    for method, seed in run_order(args.methods, args.seeds, setting.room_gate):
        if (method, seed) in kept:
            runs[(method, seed)] = kept[(method, seed)]
            print(f"{METHOD_NAMES[method]}, seed {seed}: kept from the earlier results (--resume)", flush=True)
        else:
            print(f"{METHOD_NAMES[method]}, seed {seed}", flush=True)
            runs[(method, seed)] = run_one(method, seed, config, backbone_path, task, data, evaluation, args)
            predictions = runs[(method, seed)].pop("predictions")
            if seed == first:
                pictures[method] = predictions
        made = runs[(method, seed)]
        print(
            f"  source {100 * made['source_miou']:.1f}, unseen styles {100 * made['target_mean_miou']:.1f}"
            f" ({made['train_seconds']:.0f} s)",
            flush=True,
        )
        if premise and method == "frozen" and seed == first:  # the gate's second half, then the rest
            gate = premise_gate(premise, made["source_miou"], setting.min_frozen_source_miou)
            report.print_premise(premise, gate, other_scenes)
        if room is not None and method in ROOM_METHODS and seed == first and room["met"] is None:
            room = room_gate(premise, *(first_seed_source(runs, name, first) for name in ROOM_METHODS))
            if room["met"] is not None:  # both runs made: before the comparison
                report.print_room_gate(room)
        if room is not None and room["met"] is False:  # not a setting with room: no comparison in it
            print("The setting leaves no room in-domain: the comparison stops here.", flush=True)
            runs = {**kept, **runs}  # --resume: the JSON keeps the runs not reached
            break
        if args.resume:  # every run made is kept at once, with those not reached yet: an interruption loses one run
            report.write_json(assemble({**kept, **runs}), args)
    return assemble(runs), pictures
