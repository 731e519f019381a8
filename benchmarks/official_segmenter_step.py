"""Time one training step of the official Rein segmenter at full size (DINOv2-L at patch 16 + Rein + Mask2Former).

Random weights (the step's cost does not depend on them), 512x512 images, AdamW over the trainable parameters:

    python benchmarks/official_segmenter_step.py                       # Rein, batch 1, on the CPU
    python benchmarks/official_segmenter_step.py --method full --device cuda --batch_size 4

Prints the trainable parameters and, for each step, the wall-clock seconds and the CPU seconds of this process (on a
shared machine the wall clock includes waiting for a core); the first step (allocations) is a warm-up, not counted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import rein_peft
from rein_peft.official.segmenter import METHODS


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=METHODS, default="rein")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="steps run, the first one a warm-up")
    parser.add_argument("--num_labels", type=int, default=19)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = rein_peft.build_official_segmenter(num_labels=args.num_labels, method=args.method).to(args.device)
    trainable = [param for param in model.parameters() if param.requires_grad]
    print(f"trainable parameters: {sum(param.numel() for param in trainable):,}", flush=True)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05)
    side, generator = args.image_size, torch.Generator().manual_seed(0)
    pixel_values = torch.randn(args.batch_size, 3, side, side, generator=generator).to(args.device)
    # a label map of 4 classes in quadrants: 4 masks per image, as a street scene has several
    half = side // 2
    label_map = torch.zeros(side, side, dtype=torch.long)
    label_map[:half, half:], label_map[half:, :half], label_map[half:, half:] = 1, 2, 3
    classes = label_map.unique()
    masks = [(label_map[None] == classes[:, None, None]).float().to(args.device)] * args.batch_size
    class_labels = [classes.to(args.device)] * args.batch_size
    model.train()
    seconds, cpu_seconds = [], []
    for step in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = model(pixel_values=pixel_values, mask_labels=masks, class_labels=class_labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
        print(f"step {step + 1}: {seconds[-1]:.1f} s, {cpu_seconds[-1]:.1f} CPU s, loss {loss.item():.2f}", flush=True)
    measured, cpu_measured = seconds[1:] or seconds, cpu_seconds[1:] or cpu_seconds
    print(
        f"one training step ({args.method}, batch {args.batch_size}, {side}x{side}, {args.device}, "
        f"{torch.get_num_threads()} threads): {statistics.fmean(measured):.1f} s, "
        f"{statistics.fmean(cpu_measured):.1f} CPU s"
    )
    return {"seconds": measured, "cpu_seconds": cpu_measured}


if __name__ == "__main__":
    main()
