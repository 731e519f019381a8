"""What Rein costs: inference, training step, training memory and adapter size, side by side in one process, against
the bare frozen model, PEFT LoRA (r=16 on query/value) and full fine-tuning, on ViT-S/16, ViT-B/16 and ViT-L/16-sized
models built from configs (weights do not change speed), and on a ConvNeXt-T-sized one (`--configs CNX-T@224x8`: one
Rein per stage; LoRA r=16 on the blocks' pointwise layers, which ConvNeXt has instead of query/value).

    python benchmarks/overhead.py                       # the CPU run whose results are in benchmarks/results/
    python benchmarks/overhead.py --device cuda --dtype bfloat16 --configs B@224x64 L@512x8

The methods run in turn within each repeat, after warm-up; a time ratio is the median over repeats of the ratio
within a repeat (robust to the drift of a shared machine), throughput the median time. Training memory is
CUDA's max-allocated on a GPU; on CPU it is counted tensor by tensor: parameters, gradients and optimizer state,
plus every activation saved for backward (torch.autograd.graph.saved_tensors_hooks, each storage once). Beside each
measured overhead the script prints the bound of a FLOP model (see `flop_model`). It writes the numbers as JSON and
draws overhead against input size as PNG (matplotlib, from the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from transformers import ConvNextConfig, ConvNextForImageClassification, ViTConfig, ViTForImageClassification

import rein_peft
from rein_peft.utils.extras import require

SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16)}  # hidden size, layers, heads
CONVNEXT_SIZES = {"CNX-T": ([96, 192, 384, 768], [3, 3, 9, 3])}  # ConvNeXt-T: each stage's width and depth
CONVNEXT_PATCH, CONVNEXT_KERNEL = 4, 7  # the stem's stride; the depthwise kernel
METHODS = ("bare", "rein", "rein_lora16", "lora16", "full")
TOKENS, RANK, PATCH, LABELS = 100, 16, 16, 10


@dataclass(frozen=True)
class Setting:
    size: str
    resolution: int
    batch: int

    @classmethod
    def parse(cls, text: str) -> Setting:  # "B@224x16"
        size, rest = text.split("@")
        resolution, batch = rest.split("x")
        return cls(size, int(resolution), int(batch))

    def __str__(self) -> str:
        name = "ConvNeXt-T" if self.size in CONVNEXT_SIZES else f"ViT-{self.size}/16"
        return f"{name} {self.resolution}px batch {self.batch}"


def _base_model(setting: Setting) -> tuple[torch.nn.Module, list[str]]:
    """The model of a setting, and the modules LoRA adapts in it."""
    if setting.size in CONVNEXT_SIZES:
        widths, depths = CONVNEXT_SIZES[setting.size]
        config = ConvNextConfig(hidden_sizes=widths, depths=depths, image_size=setting.resolution, num_labels=LABELS)
        return ConvNextForImageClassification(config), ["pwconv1", "pwconv2"]
    hidden, layers, heads = SIZES[setting.size]
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=setting.resolution,
        patch_size=PATCH,
        num_labels=LABELS,
    )
    return ViTForImageClassification(config), ["q_proj", "v_proj"]


def build(method: str, setting: Setting, dtype: torch.dtype, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model, lora_targets = _base_model(setting)
    model = model.to(device, dtype).eval()
    if method == "bare":
        return model.requires_grad_(False)
    if method == "full":
        return model
    if method == "lora16":
        lora = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=lora_targets, modules_to_save=["classifier"])
        return get_peft_model(model, lora)
    rein = rein_peft.ReinConfig(
        token_length=TOKENS, lora_dim=RANK if method == "rein_lora16" else None, modules_to_save=["classifier"]
    )
    return get_peft_model(model, rein)


def _convnext_flops(setting: Setting) -> tuple[float, float, float, float]:
    """(base, Rein on the input, Rein's input-independent projections per image, LoRA) multiply-adds per image of a
    ConvNeXt: stage s has N_s = (resolution / (4 * 2^s))^2 positions of width C_s; a block costs N (8 C^2 + 49 C)
    (two pointwise layers, a 7x7 depthwise one), the stem N_0 * 48 C_0 and each downsampling N_s * 4 C_(s-1) C_s;
    Rein as for a ViT layer, with each stage's width; LoRA r on both pointwise layers N * 10 r C."""
    widths, depths = CONVNEXT_SIZES[setting.size]
    base = rein_input = rein_static = lora = 0.0
    for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        tokens = (setting.resolution // (CONVNEXT_PATCH * 2**stage)) ** 2
        base += depth * tokens * (8 * width**2 + CONVNEXT_KERNEL**2 * width)
        base += tokens * (3 * CONVNEXT_PATCH**2 * width if stage == 0 else 4 * widths[stage - 1] * width)
        rein_input += depth * tokens * (2 * TOKENS * width + width**2)
        rein_static += depth * (2 * TOKENS - 1) * width**2 / setting.batch
        lora += depth * tokens * 10 * RANK * width
    return base, rein_input, rein_static, lora


def flop_model(setting: Setting) -> dict[str, float]:
    """Multiply-adds per image. A ViT layer: ~12 N C^2 + 2 N^2 C. Rein per layer: N (2 M C + C^2) on the input, plus
    (M - 1) C^2 + M C^2 for the token projections that do not depend on it (cached in eval mode). A training step
    costs the forward, the input gradients (about one forward) for every layer, and weight gradients (about one
    forward more) only where weights train: all of them for full fine-tuning, the adapters for Rein and LoRA.
    ConvNeXt: see `_convnext_flops`."""
    if setting.size in CONVNEXT_SIZES:
        base, rein_input, rein_static, lora = _convnext_flops(setting)
    else:
        hidden, layers, _ = SIZES[setting.size]
        tokens = (setting.resolution // PATCH) ** 2 + 1
        base = layers * (12 * tokens * hidden**2 + 2 * tokens**2 * hidden)
        rein_input = layers * tokens * (2 * TOKENS * hidden + hidden**2)
        rein_static = layers * (2 * TOKENS - 1) * hidden**2 / setting.batch  # per image, computed once per batch
        lora = layers * 2 * tokens * 2 * RANK * hidden
    return {
        "inference_rein_over_bare": 1 + rein_input / base,
        "train_rein_over_full": (2 * base + 3 * rein_input + rein_static) / (3 * base),
        "train_rein_over_lora": (2 * base + 3 * rein_input + rein_static) / (2 * base + 3 * lora),
    }


def _times(functions: dict[str, callable], repeats: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Seconds of each function in every repeat, calling them in turn within a repeat so drift hits all alike."""
    times = {name: [] for name in functions}
    for repeat in range(warmup + repeats):
        for name, function in functions.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            function()
            if device == "cuda":
                torch.cuda.synchronize()
            if repeat >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over repeats of the ratio of two methods timed side by side in the same repeat."""
    return statistics.median(a / b for a, b in zip(times[name], times[reference], strict=True))


def _inference(model, pixels):
    def run():
        with torch.no_grad():
            model(pixel_values=pixels)

    return run


def _train_step(model, pixels, labels, optimizer):
    def run():
        model.train()
        loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def training_memory(model, pixels, labels, optimizer, device: str) -> float:
    """Peak bytes of one training step (see the module docstring for how it is counted on CPU)."""
    _train_step(model, pixels, labels, optimizer)()  # optimizer state exists from here on
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        _train_step(model, pixels, labels, optimizer)()
        return torch.cuda.max_memory_allocated()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(pixel_values=pixels, labels=labels).loss
    loss.backward()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state_bytes = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )
    optimizer.zero_grad(set_to_none=True)
    return param_bytes + grad_bytes + state_bytes + sum(saved.values())


def adapter_megabytes(method: str, model) -> float:
    if method == "bare":
        return 0.0
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return (
            sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
            / 1e6
        )


def benchmark(setting: Setting, args) -> dict:
    dtype, device = getattr(torch, args.dtype), args.device
    models = {method: build(method, setting, dtype, device) for method in METHODS}
    pixels = torch.randn(setting.batch, 3, setting.resolution, setting.resolution, device=device, dtype=dtype)
    labels = torch.randint(0, LABELS, (setting.batch,), device=device)
    optimizers = {
        method: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for method, model in models.items()
        if method != "bare"
    }
    inference = _times(
        {method: _inference(model, pixels) for method, model in models.items()},
        args.inference_repeats,
        args.warmup,
        device,
    )
    train = _times(
        {m: _train_step(models[m], pixels, labels, optimizers[m]) for m in optimizers},
        args.repeats,
        args.warmup,
        device,
    )
    result = {
        "setting": {"size": setting.size, "resolution": setting.resolution, "batch": setting.batch},
        "bound": flop_model(setting),
        "methods": {},
    }
    for method, model in models.items():
        trains = method in optimizers
        result["methods"][method] = {
            "inference_s": statistics.median(inference[method]),
            "images_per_s": setting.batch / statistics.median(inference[method]),
            "inference_over_bare": paired_ratio(inference, method, "bare"),
            "train_step_s": statistics.median(train[method]) if trains else None,
            "train_over_full": paired_ratio(train, method, "full") if trains else None,
            "train_over_lora": paired_ratio(train, method, "lora16") if trains else None,
            "train_memory_mb": (
                training_memory(model, pixels, labels, optimizers[method], device) / 1e6
                if method in optimizers
                else None
            ),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "adapter_mb": adapter_megabytes(method, model),
        }
    return result


def sweep(size: str, args, resolutions: list[int], batches: list[int]) -> list[dict]:
    """Rein's inference overhead over the bare model as input size and batch size grow."""
    dtype, device = getattr(torch, args.dtype), args.device
    middle_batch = batches[len(batches) // 2]
    points = [Setting(size, resolution, middle_batch) for resolution in resolutions]
    points += [Setting(size, resolutions[0], batch) for batch in batches if batch != middle_batch]
    rows = []
    for setting in points:
        models = {method: build(method, setting, dtype, device) for method in ("bare", "rein")}
        pixels = torch.randn(setting.batch, 3, setting.resolution, setting.resolution, device=device, dtype=dtype)
        functions = {m: _inference(model, pixels) for m, model in models.items()}
        times = _times(functions, args.inference_repeats, args.warmup, device)
        rows.append(
            {
                "resolution": setting.resolution,
                "batch": setting.batch,
                "rein_over_bare": paired_ratio(times, "rein", "bare"),
                "bound": flop_model(setting)["inference_rein_over_bare"],
            }
        )
        print(f"  sweep {setting}: Rein/bare {rows[-1]['rein_over_bare']:.3f} (bound {rows[-1]['bound']:.3f})")
    return rows


def print_table(result: dict) -> None:
    methods, bound = result["methods"], result["bound"]
    full = methods["full"]
    print(f"\n{Setting(**result['setting'])} (time ratios: medians of ratios within each repeat)")
    header = f"{'method':<12}{'infer/bare':>11}{'img/s':>9}{'step/full':>10}{'step/LoRA':>10}{'mem/full':>9}"
    print(header + f"{'trainable':>12}{'file MB':>9}")
    for name, row in methods.items():
        memory = row["train_memory_mb"]
        cells = [
            f"{row['inference_over_bare']:>11.3f}",
            f"{row['images_per_s']:>9.1f}",
            f"{row['train_over_full']:>10.3f}" if memory else f"{'-':>10}",
            f"{row['train_over_lora']:>10.3f}" if memory else f"{'-':>10}",
            f"{memory / full['train_memory_mb']:>9.3f}" if memory else f"{'-':>9}",
        ]
        print(f"{name:<12}" + "".join(cells) + f"{row['trainable_params']:>12,}{row['adapter_mb']:>9.2f}")
    print(
        f"FLOP-model bounds for Rein: inference/bare {bound['inference_rein_over_bare']:.3f}, "
        f"step/full {bound['train_rein_over_full']:.3f}, step/LoRA {bound['train_rein_over_lora']:.3f}"
    )


def plot(sweep_rows: list[dict], size: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_resolution, by_batch) = plt.subplots(1, 2, figsize=(10, 4))
    batches = sorted({row["batch"] for row in sweep_rows})
    fixed_batch = batches[len(batches) // 2]
    by_res = sorted((r for r in sweep_rows if r["batch"] == fixed_batch), key=lambda r: r["resolution"])
    by_bat = sorted(
        (r for r in sweep_rows if r["resolution"] == min(x["resolution"] for x in sweep_rows)),
        key=lambda r: r["batch"],
    )
    for axis, rows, key, label in (
        (by_resolution, by_res, "resolution", "input size (px)"),
        (by_batch, by_bat, "batch", "batch size"),
    ):
        axis.plot([r[key] for r in rows], [100 * (r["rein_over_bare"] - 1) for r in rows], "o-", label="measured")
        axis.plot([r[key] for r in rows], [100 * (r["bound"] - 1) for r in rows], "s--", label="FLOP model")
        axis.set_xlabel(label)
        axis.set_ylabel("Rein inference overhead over the bare model (%)")
        axis.grid(alpha=0.3)
        axis.legend()
    by_resolution.set_title(f"ViT-{size}/16, batch {fixed_batch}")
    by_batch.set_title(f"ViT-{size}/16, {by_bat[0]['resolution']} px")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def machine(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rein_peft": rein_peft.__version__,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> None:
    """Parses the command line (`argv`, default `sys.argv`), measures, prints and writes the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["S@224x16", "B@224x16", "L@224x4", "S@512x2", "B@512x2", "L@512x1"],
        help="size@resolution x batch, e.g. B@224x16",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="timed training steps per method")
    parser.add_argument("--inference-repeats", type=int, default=7, help="timed inference batches per method")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sweep-size", default="S")
    parser.add_argument("--sweep-resolutions", type=int, nargs="+", default=[224, 320, 384, 512])
    parser.add_argument("--sweep-batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)

    require("matplotlib", purpose="The overhead chart")  # before hours of measuring
    results = {"machine": machine(args.device), "dtype": args.dtype, "device": args.device, "settings": []}
    print(json.dumps(results["machine"]))
    for text in args.configs:
        results["settings"].append(benchmark(Setting.parse(text), args))
        print_table(results["settings"][-1])
    results["sweep"] = sweep(args.sweep_size, args, args.sweep_resolutions, args.sweep_batches)

    os.makedirs(args.output, exist_ok=True)
    stem = os.path.join(args.output, f"overhead_{args.device}_{args.dtype}")
    with open(stem + ".json", "w") as file:
        json.dump(results, file, indent=1)
    plot(results["sweep"], args.sweep_size, stem + ".png")
    print(f"\nwrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
