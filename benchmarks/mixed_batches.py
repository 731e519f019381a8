"""What a mixed-adapter batch costs: one batch whose samples use 4 different Rein adapters (each with its own
classifier copy) against the same batch with one adapter, side by side in one process.

    python benchmarks/mixed_batches.py                  # the CPU run whose result is in benchmarks/results/
    python benchmarks/mixed_batches.py --device cuda --dtype bfloat16 --config B@224x64

Each repeat runs the bare model, the one-adapter batch and the mixed batch in turn; the ratio is the median over
repeats of the ratio within a repeat (see overhead.py). Writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from overhead import TOKENS, Setting, _times, build, machine, paired_ratio

import rein_peft


def mixed_batch(setting: Setting, num_adapters: int, args: argparse.Namespace) -> dict:
    dtype, device = getattr(torch, args.dtype), args.device
    bare = build("bare", setting, dtype, device)
    model = build("rein", setting, dtype, device)  # adapter "default"
    for index in range(1, num_adapters):
        config = rein_peft.ReinConfig(token_length=TOKENS, modules_to_save=["classifier"])
        model.add_adapter(f"adapter{index}", config)
    model.to(device, dtype).eval()
    names = ["default", *(f"adapter{index}" for index in range(1, num_adapters))]
    adapter_names = [names[sample % num_adapters] for sample in range(setting.batch)]
    pixels = torch.randn(setting.batch, 3, setting.resolution, setting.resolution, device=device, dtype=dtype)

    def run(target, **kwargs):
        def call():
            with torch.no_grad():
                target(pixel_values=pixels, **kwargs)

        return call

    functions = {"bare": run(bare), "one": run(model), "mixed": run(model, adapter_names=adapter_names)}
    times = _times(functions, args.repeats, args.warmup, device)
    return {
        "setting": {"size": setting.size, "resolution": setting.resolution, "batch": setting.batch},
        "num_adapters": num_adapters,
        "seconds": {name: statistics.median(values) for name, values in times.items()},
        "mixed_over_one": paired_ratio(times, "mixed", "one"),
        "one_over_bare": paired_ratio(times, "one", "bare"),
    }


def main(argv: list[str] | None = None) -> None:
    """Parses the command line (`argv`, default `sys.argv`), measures, prints and writes the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="B@224x16", help="size@resolution x batch, e.g. B@224x16")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)

    setting = Setting.parse(args.config)
    result = {"machine": machine(args.device), "dtype": args.dtype, **mixed_batch(setting, args.adapters, args)}
    print(
        f"{setting}: a batch mixing {args.adapters} Rein adapters costs {result['mixed_over_one']:.3f}x the same "
        f"batch with one adapter (one adapter / bare model: {result['one_over_bare']:.3f}x)"
    )
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, f"mixed_batches_{args.device}_{args.dtype}.json")
    with open(path, "w") as file:
        json.dump(result, file, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
