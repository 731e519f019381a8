"""Official DINOv2 weights into a transformers DINOv2 folder, without the Hub.

The official Rein recipe starts from facebookresearch/dinov2's `dinov2_vitl14_pretrain.pth` (a `DinoVisionTransformer`
state dict: `patch_embed.proj`, `blocks.N.attn.qkv`, `blocks.N.ls1.gamma`, `pos_embed`, `cls_token`, ...) and the
official `tools/convert_models/convert_dinov2_large_512x512.py` resizes it to patch 16 and a 32x32 position grid.
Either file converts:

    python -m rein_peft.convert_dinov2 dinov2_vitl14_pretrain.pth dinov2-large-p16 --patch-size 16 --image-size 512
    python -m rein_peft.convert_dinov2 dinov2_converted.pth dinov2-large-p16

writes `config.json` and `model.safetensors`, from which `rein_peft.build_official_segmenter` (and
`Dinov2Model.from_pretrained`) load it. The sizes come from the tensors; the tensor names follow
`rein_peft.official.convert.BACKBONE_RULES` (docs/official-checkpoints.md lists them).
"""

from __future__ import annotations

import argparse

from .official.convert import OfficialCheckpointError
from .official.convert_backbone import convert_dinov2_checkpoint

PROG = "python -m rein_peft.convert_dinov2"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="official DINOv2 file (.pth, .safetensors): dinov2_vitl14_pretrain.pth")
    parser.add_argument("output_dir", help="folder the transformers model is written to")
    parser.add_argument("--patch-size", type=int, help="resize to this patch size (official Rein: 16); default: keep")
    parser.add_argument("--image-size", type=int, help="image side of the position grid (512 if the patch changes)")
    parser.add_argument("--num-attention-heads", type=int, help="heads per layer (default: width / 64)")
    args = parser.parse_args(argv)
    try:
        model = convert_dinov2_checkpoint(
            args.checkpoint, args.output_dir, args.patch_size, args.image_size, args.num_attention_heads
        )
    except (OfficialCheckpointError, ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    config = model.config
    grid = config.image_size // config.patch_size
    print(
        f"wrote {args.output_dir}: {type(model).__name__}, {config.hidden_size} wide, {config.num_hidden_layers} "
        f"layers, {config.num_attention_heads} heads, patch {config.patch_size}, {grid}x{grid} position grid"
    )


if __name__ == "__main__":
    main()
