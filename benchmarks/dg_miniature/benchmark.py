"""The benchmark: the foundation (built or named), the task, Rein's premise checked on the frozen foundation before
any method is compared, then each method trained from each seed and evaluated on the source and every target."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from dataclasses import asdict

import torch
from torch import nn
from transformers import AutoImageProcessor, Mask2FormerConfig, UperNetConfig

from rein_peft.official.segmenter import HEAD_MODULES

from . import report
from .evaluation import Evaluation, premise_gate, style_similarities, summarize
from .foundations import build_backbone, foundation_recipe, pretraining_record
from .methods import DECODER, METHOD_NAMES, backbone_of, prepare, segmenter, segmenter_config, train
from .task import Task, miniature_task, pixel_batches, user_task
from .world import SOURCE_STYLE

REAL_IMAGE_SIZE = 224  # for a checkpoint named by --backbone, unless --image_size says otherwise


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


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    """The benchmark: the results (the JSON's), and the first seed's predictions per method and split (pictures)."""
    recipe = foundation_recipe(args.foundation, args.quick, official=args.segmenter == "official")
    if args.backbone is None:
        backbone_path = build_backbone(recipe, args.cache_dir)
        backbone_name = f"{args.foundation}-pretrained miniature ViT ({recipe.layers} layers, width {recipe.hidden})"
    else:
        backbone_path = backbone_name = args.backbone
    side = args.image_size or (recipe.side if args.backbone is None else REAL_IMAGE_SIZE)
    if args.source is None:
        task, source_name = miniature_task(args.train_images, args.eval_images, side), SOURCE_STYLE
    else:
        task, source_name = user_task(args), args.source
    processor = AutoImageProcessor.from_pretrained(backbone_path)
    config = segmenter_config(
        backbone_path, task, args.decoder_channels, args.segmenter == "official", miniature=args.backbone is None
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
    gate = premise_gate(premise)
    if premise and "frozen" not in args.methods:  # no frozen run to complete the gate: the similarities alone, first
        report.print_premise(premise, gate, other_scenes)
    runs, pictures = [], {}
    for seed in args.seeds:
        for method in args.methods:
            print(f"{METHOD_NAMES[method]}, seed {seed}", flush=True)
            runs.append(run_one(method, seed, config, backbone_path, task, data, evaluation, args))
            predictions = runs[-1].pop("predictions")
            if seed == args.seeds[0]:
                pictures[method] = predictions
            print(
                f"  source {100 * runs[-1]['source_miou']:.1f}, unseen styles {100 * runs[-1]['target_mean_miou']:.1f}"
                f" ({runs[-1]['train_seconds']:.0f} s)",
                flush=True,
            )
            if premise and method == "frozen" and seed == args.seeds[0]:  # the gate's second half, then the rest
                gate = premise_gate(premise, runs[-1]["source_miou"])
                report.print_premise(premise, gate, other_scenes)
    result = {
        "backbone": backbone_name,
        "backbone_recipe": asdict(recipe) if args.backbone is None else None,
        "pretraining": pretraining_record(backbone_path) if args.backbone is None else None,
        "premise": premise,
        "premise_gate": gate,
        "premise_other_scenes": other_scenes,
        "class_names": task.class_names,
        "source_name": source_name,
        "target_names": list(task.targets),
        "settings": {key: value for key, value in vars(args).items() if key not in ("output", "cache_dir")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "runs": runs,
        "summary": summarize(runs, args.methods, list(task.targets)),
    }
    return result, pictures
