"""Domain generalization in miniature: train a segmenter on one visual style, measure it on styles it never saw.

Rein's claim is about unseen domains: trained on synthetic GTAV, a frozen DINOv2 refined by Rein holds up on real
Cityscapes better than the same backbone fine-tuned in full. Neither those weights nor those data sets can be
downloaded here, so this script builds a faithful miniature and runs the same protocol on it:

1. A "foundation" backbone: a small ViT pretrained without labels on street-like scenes drawn in many random visual
   styles, so that its frozen features hold across styles (VICReg across styles, below), saved as a DINOv2
   checkpoint. It is built once and cached under `--cache_dir`, in a folder named by a hash of its recipe, with the
   recipe beside it.
2. A segmentation task (sky, building, road, vegetation, vehicle) whose scenes share layout and classes across
   styles: a flat-shaded "synthetic" source style to train on and six unseen target styles that differ from it the
   way real images differ from synthetic ones: texture, palette, sensor noise, blur, lighting, and all of them
   together ("real"). Each split is a `datasets.Dataset` of images and label maps, drawn from fixed seeds.
3. For each method, with the same decoder (UperNet over a `Dinov2Backbone` fed by 4 layers), steps, batches and
   optimiser (AdamW, poly schedule): the frozen backbone + decoder, PEFT LoRA, full fine-tuning, Rein full-rank,
   Rein with lora_dim=16 and SoMA (`rein_peft.soma_config` + `rein_peft.initialize_soma`: PEFT LoRA r=16 on every
   linear of the blocks after the first third, initialised from the minor singular components). Reports mIoU on
   held-out source images and on each target style,
   the mean over targets, trainable parameters and train time, over 3 seeds (mean and standard deviation), and,
   since every target style redraws the source's held-out scenes, how similar the features the decoder reads are
   for the same scene in the source and in a target style.
   mIoU and per-class IoU come from `rein_peft.evaluate_segmentation` (the protocol's sliding window),
   and the first seed's predictions of a few scenes per split are drawn in a picture.
4. Before any method is compared, Rein's premise is checked and printed: for each unseen style, the cosine
   similarity of the frozen foundation's deepest features for the same scenes in the source and that style (the
   gate: at least 0.8 for every style), and, against collapse, the frozen backbone + decoder's source mIoU (at least
   85). The frozen method runs first; its first seed is that check.
5. Writes a JSON of every number (with `"premise"` and `"premise_gate"`, and the premise during pretraining), a PNG
   chart, a picture of the predictions and one of the styles (matplotlib, from the `bench` extra).

    python benchmarks/domain_generalization.py   # the miniature: 14 min pretraining (cached) + ~1 h on 2 CPU cores
    python benchmarks/domain_generalization.py --quick    # a smoke run of the pipeline (seconds; numbers mean nothing)
    python benchmarks/domain_generalization.py --foundation vicreg   # the same: the foundation with Rein's premise
    python benchmarks/domain_generalization.py --segmenter official   # the official Rein segmenter (Mask2Former)
    python benchmarks/domain_generalization.py --setting shapes   # a candidate source task with room in-domain
    python benchmarks/domain_generalization.py --setting colours  # another (none has passed its gate)
    python benchmarks/domain_generalization.py --resume   # keep the runs already written, make the missing ones
    python benchmarks/domain_generalization.py --backbone facebook/dinov2-small --device cuda \\
        --image_size 224 --source ./gtav --target cityscapes=./cityscapes --target bdd=./bdd100k --num_labels 19

`--backbone` takes any DINOv2 checkpoint (Hub name or folder) instead of the miniature one; `--source` and `--target`
take `datasets` folders written by `save_to_disk` or Hub datasets, with an `image` column and a `label` column of
label maps (ignore index 255); a dataset dict's "train" split is trained on and "validation" split (or the whole
dataset) is evaluated.

`--foundation vicreg` (the only foundation, and the default) pretrains it self-supervised, without labels, so that
its frozen features hold across styles (`dg_miniature.foundations.pretrain_vicreg`: a whole scene and a masked crop
of it in another random style, their patch tokens pulled together, VICReg's variance and covariance terms against
collapse): the miniature in which Rein's premise holds.

`--setting` picks the miniature's source task on that foundation (`dg_miniature.settings`): `street` (the default,
5 classes every method learns to 88-89 mIoU), `shapes` (two more classes told apart from two others by shape
alone, and a narrower decoder), `shapes_deepest` (the same, that decoder on the deepest layer only) or `colours`
(three classes split in two by colour alone, a narrower decoder on the deepest layer only), candidates for a task
on which the frozen backbone leaves room in-domain: their gate (full fine-tuning at least 10 mIoU above the frozen
backbone + decoder on the source, the premise still at least 0.8 on every style) is checked and printed before the
comparison, which stops there if it is not met. `--resume` keeps the runs already in the results JSON that were
made with the same settings and foundation, runs the missing ones, and rewrites the JSON after each run.

The earlier masked-image-modelling foundations (`mae`, `mae+invariance`) were retired (docs/domain-generalization.md).
The parts are the package `benchmarks/dg_miniature/`.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import datasets
import transformers
from dg_miniature import report
from dg_miniature.benchmark import run
from dg_miniature.foundations import FOUNDATIONS
from dg_miniature.methods import METHODS, SEGMENTERS
from dg_miniature.settings import DEFAULT_SETTING, ROOM_SETTINGS, SETTINGS

from rein_peft.utils.extras import require

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --quick: a tiny task and run (the foundation is shrunk too: `dg_miniature.foundations.QUICK_SIZES`), the smallest
# that still runs every part of the pipeline (tests/ run it: each step and each evaluated scene costs suite time)
QUICK = {"train_images": 16, "eval_images": 4, "steps": 2, "batch_size": 4, "seeds": [0], "pictures": 2}


def main(argv: list[str] | None = None) -> dict:
    """Parses the command line, runs the benchmark, prints and writes its report; returns the results (the JSON's)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny backbone and task, to check the pipeline")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="of the decoder and the adapters")
    parser.add_argument("--backbone_lr_multiplier", type=float, default=0.1, help="full fine-tuning's backbone lr")
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--decoder_channels", type=int, default=64, help="UperNet's (miniature: any decoder's) width")
    parser.add_argument(
        "--segmenter", choices=SEGMENTERS, default="upernet", help="UperNet, or the official Rein segmenter"
    )
    parser.add_argument("--train_images", type=int, default=2000, help="miniature source images to train on")
    parser.add_argument("--eval_images", type=int, default=200, help="miniature images per evaluated style")
    parser.add_argument(
        "--foundation",
        choices=FOUNDATIONS,
        default="vicreg",
        help="the miniature backbone's recipe (the MAE ones were retired: docs/domain-generalization.md)",
    )
    parser.add_argument("--backbone", help="a DINOv2 checkpoint (Hub name or folder) instead of the miniature one")
    parser.add_argument("--image_size", type=int, help="side images are resized to (default: the miniature's 64)")
    parser.add_argument("--source", help="dataset to train on (folder from save_to_disk, or Hub name)")
    parser.add_argument("--target", action="append", default=[], help="NAME=DATASET to evaluate on (repeatable)")
    parser.add_argument("--num_labels", type=int, help="classes of --source and --target datasets")
    parser.add_argument("--pictures", type=int, default=3, help="scenes per split in the prediction picture")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "rein_peft"))
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument(
        "--setting",
        choices=SETTINGS,
        default=DEFAULT_SETTING,
        help="the miniature's source task (shapes, colours: candidates with room in-domain; they change the defaults: "
        + "; ".join(
            f"{name}: " + ", ".join(f"--{key} {value}" for key, value in SETTINGS[name].defaults.items())
            for name in ROOM_SETTINGS
        )
        + ")",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs of the results already in --output made with the same settings and foundation",
    )
    chosen, _ = parser.parse_known_args(argv)  # the setting's defaults, then the command line again over them
    parser.set_defaults(**SETTINGS[chosen.setting].defaults)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.target and args.source is None:
        parser.error("--target needs --source: the dataset to train on")
    if args.source is not None and args.setting != DEFAULT_SETTING:
        parser.error("--setting picks the miniature's source task; with --source the task is your datasets: drop it")
    require("matplotlib", purpose="The domain-generalization chart")  # before minutes of training
    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()  # `datasets` cannot hash the transform; it only means no caching
    warnings.filterwarnings("ignore", message="Cannot (locate reference|pickle)")  # dill, while it tries
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing")  # PEFT 0.21 asks transformers 5
    result, pictures = run(args)
    report.print_table(result)
    report.write(result, pictures, args)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
