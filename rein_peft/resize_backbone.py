"""Command line: resize a DINOv2 checkpoint on disk into the official Rein layout (`resize_patch_embedding`).

    python -m rein_peft.resize_backbone facebook/dinov2-large dinov2-large-p16-512 --patch-size 16 --image-size 512

writes the resized model (and the checkpoint's image processor, if it has one) to the output folder, from which
`rein_peft.build_official_segmenter` and `Dinov2PyramidBackbone.from_pretrained` load it.
"""

from __future__ import annotations

import argparse

from transformers import AutoImageProcessor

from .official.pyramid import resize_patch_embedding

PROG = "python -m rein_peft.resize_backbone"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each option's default."""


def main(argv: list[str] | None = None) -> None:
    """Run the command line on `argv` (default: `sys.argv[1:]`)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("checkpoint", help="a DINOv2 checkpoint: Hub name or folder")
    parser.add_argument("output_dir", help="folder the resized checkpoint is written to")
    parser.add_argument("--patch-size", type=int, default=16, help="new patch size (the official one)")
    parser.add_argument("--image-size", type=int, default=512, help="image side of the new position grid")
    args = parser.parse_args(argv)
    try:
        model = resize_patch_embedding(args.checkpoint, patch_size=args.patch_size, image_size=args.image_size)
    except ValueError as error:
        parser.error(str(error))
    model.save_pretrained(args.output_dir)
    try:
        AutoImageProcessor.from_pretrained(args.checkpoint).save_pretrained(args.output_dir)
    except OSError:  # a checkpoint without an image processor
        pass
    print(
        f"wrote {args.output_dir}: patch size {model.config.patch_size}, "
        f"{model.config.image_size // model.config.patch_size}x{model.config.image_size // model.config.patch_size} "
        "position grid"
    )


if __name__ == "__main__":
    main()
