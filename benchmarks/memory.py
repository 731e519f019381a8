"""Peak training memory and step time of Rein on large backbones: full fine-tuning, LoRA r=16, Rein, Rein + gradient
checkpointing, Rein + int8 backbone (torchao weight-only) and Rein + int8 + checkpointing, on ViT-B/16, ViT-L/16
and a DINOv2-g-sized backbone (hidden 1536, 40 layers, SwiGLU: 1.1B parameters), at 512 px, batch 2.

    python benchmarks/memory.py                              # the CPU run whose results are in benchmarks/results/
    python benchmarks/memory.py --device cuda --dtype bfloat16   # on a GPU: CUDA max-allocated, bf16 backbone
    python benchmarks/memory.py --quick                      # a one-minute smoke run on miniature widths
    python benchmarks/memory.py --backbones ViT-L/16 --methods rein rein+int8   # only these rows

Every figure is labelled "measured" or "computed":

- computed: tensor bytes, from a 1-layer and a 2-layer model of the same width at the same input size, built and
  stepped here: weights (int8 data and scales as stored), gradients and AdamW state of what trains, and the
  activations saved for backward (counted with `torch.autograd.graph.saved_tensors_hooks`), extrapolated to the
  full depth (each layer adds the same). With checkpointing a layer keeps only its input, and backward recomputes
  one layer at a time. The step time is computed from the FLOPs of the configuration and the seconds per FLOP of
  the same method on the largest measured backbone.
- measured: a fresh process per configuration runs `--steps` training steps (AdamW); on CPU its peak resident
  memory during the steps minus its resident memory before the model was built (Python and the libraries), with
  glibc's mmap threshold fixed so that freed tensors leave the resident set; on CUDA `max_memory_allocated`.
  Configurations whose computed peak exceeds `--max_measure_gib` are only computed.

Writes JSON and a PNG chart (matplotlib, from the `bench` extra).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig, get_peft_model
from transformers import Dinov2Config, Dinov2ForImageClassification, ViTConfig, ViTForImageClassification

import rein_peft
from rein_peft.utils.extras import require

METHODS = ("full", "lora16", "rein", "rein+ckpt", "rein+int8", "rein+int8+ckpt")
LABELS, TOKENS, RANK = 10, 100, 16
GIB = 2**30


@dataclass(frozen=True)
class Backbone:
    name: str
    family: str  # "vit" or "dinov2"
    hidden: int
    layers: int
    heads: int
    patch: int

    def config(self, resolution: int, layers: int | None = None):
        sizes = {
            "hidden_size": self.hidden,
            "num_hidden_layers": layers or self.layers,
            "num_attention_heads": self.heads,
            "image_size": resolution,
            "patch_size": self.patch,
            "num_labels": LABELS,
        }
        if self.family == "vit":
            return ViTConfig(**sizes, intermediate_size=4 * self.hidden)
        return Dinov2Config(**sizes, mlp_ratio=4, use_swiglu_ffn=True)

    def tokens(self, resolution: int) -> int:
        return (resolution // self.patch) ** 2 + 1


BACKBONES = {
    "ViT-B/16": Backbone("ViT-B/16", "vit", 768, 12, 12, 16),
    "ViT-L/16": Backbone("ViT-L/16", "vit", 1024, 24, 16, 16),
    "DINOv2-g-sized": Backbone("DINOv2-g-sized", "dinov2", 1536, 40, 24, 14),
}
QUICK_BACKBONES = {
    "mini-ViT": Backbone("mini-ViT", "vit", 64, 4, 2, 16),
    "mini-DINOv2": Backbone("mini-DINOv2", "dinov2", 96, 6, 4, 14),
}


def build(backbone: Backbone, method: str, resolution: int, dtype: torch.dtype, device: str, layers=None):
    """The model of one configuration, ready to train."""
    torch.manual_seed(0)
    model_class = ViTForImageClassification if backbone.family == "vit" else Dinov2ForImageClassification
    model = model_class(backbone.config(resolution, layers)).to(device, dtype)
    if "ckpt" in method:
        model.gradient_checkpointing_enable()
    if method == "full":
        return model.train()
    if method == "lora16":
        config = LoraConfig(
            r=RANK, lora_alpha=RANK, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]
        )
        return get_peft_model(model, config).train()
    model = get_peft_model(model, rein_peft.ReinConfig(token_length=TOKENS, modules_to_save=["classifier"]))
    if "int8" in method:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=rein_peft.is_backbone_linear)
    return model.train()


def _stored_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold a tensor's data: itself, or the inner tensors of a tensor subclass (torchao's int8
    data and scales)."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [inner for name in names for inner in _stored_tensors(getattr(tensor, name))]


def _inputs(backbone: Backbone, resolution: int, batch: int, dtype: torch.dtype, device: str):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, resolution, resolution, generator=generator).to(device, dtype)
    return pixels, torch.randint(0, LABELS, (batch,), generator=generator).to(device)


def tensor_bytes(backbone: Backbone, method: str, args, layers: int) -> dict[str, int]:
    """Weights, gradients, AdamW state and saved activations of one training step of a `layers`-deep model."""
    dtype = getattr(torch, args.dtype)
    model = build(backbone, method.replace("+ckpt", ""), args.resolution, dtype, args.device, layers)
    pixels, labels = _inputs(backbone, args.resolution, args.batch, dtype, args.device)
    stored = [inner for parameter in model.parameters() for inner in _stored_tensors(parameter)]
    parameters = {tensor.untyped_storage().data_ptr() for tensor in stored}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if type(tensor) is torch.Tensor and tensor.untyped_storage().data_ptr() not in parameters:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(pixel_values=pixels, labels=labels).loss.backward()
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {
        "weights": sum(tensor.numel() * tensor.element_size() for tensor in stored),
        "gradients": trainable,
        "optimizer": 2 * trainable,  # AdamW's two moments, in the parameters' dtype
        "activations": sum(saved.values()),
    }


def computed(backbone: Backbone, method: str, args) -> dict:
    """Tensor bytes at full depth, extrapolated from a 1-layer and a 2-layer model (see the module docstring)."""
    one, two = tensor_bytes(backbone, method, args, 1), tensor_bytes(backbone, method, args, 2)
    per_layer = {key: two[key] - one[key] for key in one}
    outside_layers = {key: one[key] - per_layer[key] for key in one}
    full = {key: outside_layers[key] + backbone.layers * per_layer[key] for key in one}
    if "ckpt" in method:  # each layer keeps its input; backward recomputes one layer's activations at a time
        element_size = torch.finfo(getattr(torch, args.dtype)).bits // 8
        layer_input = args.batch * backbone.tokens(args.resolution) * backbone.hidden * element_size
        full["activations"] = outside_layers["activations"] + backbone.layers * layer_input + per_layer["activations"]
    return {"bytes": full, "peak_gib": sum(full.values()) / GIB}


def flops(backbone: Backbone, method: str, args) -> float:
    """Multiply-adds of one training step: forward, input gradients, weight gradients where weights train, and a
    second forward of every layer with checkpointing (Rein's and LoRA's own FLOPs are a few percent; left out)."""
    tokens, hidden = backbone.tokens(args.resolution), backbone.hidden
    # attention 4 C^2; MLP 8 C^2, both ViT's (two C x 4C matrices) and DINOv2's SwiGLU (three C x 8C/3)
    forward = args.batch * backbone.layers * (tokens * 12 * hidden**2 + 2 * tokens**2 * hidden)
    passes = 3 if method == "full" else 2
    return forward * (passes + (1 if "ckpt" in method else 0))


def _rss(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(backbone: Backbone, method: str, args) -> dict:
    """Run in a fresh process (see `main`): peak memory and step times of `args.steps` AdamW steps."""
    dtype = getattr(torch, args.dtype)
    if "int8" in method:
        import torchao.quantization  # noqa: F401  (imported before the baseline: libraries are not training memory)
    baseline = _rss("VmRSS:")
    model = build(backbone, method, args.resolution, dtype, args.device)
    pixels, labels = _inputs(backbone, args.resolution, args.batch, dtype, args.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    gc.collect()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # restart the peak (VmHWM) here: building an int8 model passes through float32
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model(pixel_values=pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else _rss("VmHWM:") - baseline
    return {"peak_gib": peak / GIB, "step_s": min(times[1:] or times), "step_times_s": times}


def _measure_in_subprocess(backbone_name: str, method: str, args) -> dict:
    command = [sys.executable, __file__, "--measure_one", backbone_name, method, *_shared_flags(args)]
    # glibc raises its mmap threshold after the first large free and then keeps freed tensors in its heap: the float32
    # weights that quantization frees would stay resident. A fixed threshold returns every freed tensor to the system
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{backbone_name} {method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _shared_flags(args) -> list[str]:
    flags = ["--device", args.device, "--dtype", args.dtype, "--resolution", str(args.resolution)]
    flags += ["--batch", str(args.batch), "--steps", str(args.steps)]
    return flags + (["--quick"] if args.quick else [])


def run(args) -> dict:
    backbones = {name: (QUICK_BACKBONES if args.quick else BACKBONES)[name] for name in args.backbones}
    rows = []
    for backbone in backbones.values():
        for method in args.methods:
            estimate = computed(backbone, method, args)
            row = {
                "backbone": backbone.name,
                "method": method,
                "computed_peak_gib": estimate["peak_gib"],
                "computed_bytes": estimate["bytes"],
                "flops": flops(backbone, method, args),
            }
            if estimate["peak_gib"] <= args.max_measure_gib:
                row.update(
                    {f"measured_{k}": v for k, v in _measure_in_subprocess(backbone.name, method, args).items()}
                )
            rows.append(row)
            print(_format_row(row), flush=True)
    _fill_computed_step_times(rows, backbones)
    return {
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("measure_one", "output")}},
        "backbones": {name: asdict(backbone) for name, backbone in backbones.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "rows": rows,
    }


def _fill_computed_step_times(rows: list[dict], backbones: dict) -> None:
    """Seconds per FLOP of each method on the largest backbone where it was measured, times the FLOPs."""
    order = list(backbones)
    for row in rows:
        measured = [r for r in rows if r["method"] == row["method"] and "measured_step_s" in r]
        if measured:
            largest = max(measured, key=lambda r: order.index(r["backbone"]))
            row["computed_step_s"] = row["flops"] * largest["measured_step_s"] / largest["flops"]


def _format_row(row: dict) -> str:
    measured = row.get("measured_peak_gib")
    peak = f"{measured:7.2f} GiB measured" if measured is not None else f"{row['computed_peak_gib']:7.2f} GiB computed"
    step = f"{row['measured_step_s']:8.1f} s measured" if "measured_step_s" in row else ""
    return f"{row['backbone']:>16} {row['method']:>16}  {peak}  (computed {row['computed_peak_gib']:.2f} GiB) {step}"


def print_table(result: dict) -> None:
    print(f"\n{'backbone':>16} {'method':>16} {'peak GiB':>9} {'':>9} {'step s':>8} {'':>9}")
    for row in result["rows"]:
        if "measured_peak_gib" in row:
            peak, peak_kind = row["measured_peak_gib"], "measured"
        else:
            peak, peak_kind = row["computed_peak_gib"], "computed"
        if "measured_step_s" in row:
            step, step_kind = f"{row['measured_step_s']:8.1f}", "measured"
        elif "computed_step_s" in row:
            step, step_kind = f"{row['computed_step_s']:8.1f}", "computed"
        else:
            step, step_kind = f"{'-':>8}", ""
        print(f"{row['backbone']:>16} {row['method']:>16} {peak:9.2f} {peak_kind:>9} {step} {step_kind:>9}")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = list(result["backbones"])
    figure, axes = plt.subplots(1, len(backbones), figsize=(5 * len(backbones), 4), squeeze=False)
    for axis, backbone in zip(axes[0], backbones, strict=True):
        rows = [row for row in result["rows"] if row["backbone"] == backbone]
        for index, row in enumerate(rows):
            is_measured = "measured_peak_gib" in row
            value = row["measured_peak_gib"] if is_measured else row["computed_peak_gib"]
            axis.bar(
                index,
                value,
                color="tab:blue" if is_measured else "none",
                edgecolor="tab:blue",
                hatch=None if is_measured else "//",
            )
            axis.text(index, value, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
        axis.set_xticks(range(len(rows)), [row["method"] for row in rows], rotation=45, ha="right")
        axis.set_title(f"{backbone}, {result['settings']['resolution']} px, batch {result['settings']['batch']}")
        axis.set_ylabel("peak training memory (GiB)")
    figure.suptitle("filled: measured, hatched: computed")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="training steps per measured configuration")
    parser.add_argument("--max_measure_gib", type=float, default=20.0, help="of a 24 GiB machine")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per measured configuration")
    parser.add_argument("--quick", action="store_true", help="miniature backbones, for a smoke run")
    parser.add_argument(
        "--backbones",
        nargs="+",
        help=f"only these backbones (default: all; {', '.join(BACKBONES)}; with --quick {', '.join(QUICK_BACKBONES)})",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="only these methods")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--measure_one", nargs=2, metavar=("BACKBONE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    known = QUICK_BACKBONES if args.quick else BACKBONES
    args.backbones = args.backbones or list(known)
    unknown = [name for name in args.backbones if name not in known]
    if unknown:
        parser.error(
            f"--backbones: no backbone {', '.join(unknown)}{' with --quick' if args.quick else ''}; "
            f"choose from {', '.join(known)}"
        )
    if args.measure_one:
        backbones = QUICK_BACKBONES if args.quick else BACKBONES
        print(json.dumps(measure(backbones[args.measure_one[0]], args.measure_one[1], args)))
        return None
    require("matplotlib", purpose="The memory chart")  # before hours of measuring
    result = run(args)
    print_table(result)
    os.makedirs(args.output, exist_ok=True)
    stem = os.path.join(args.output, f"memory_{args.device}_{args.dtype}{'_quick' if args.quick else ''}")
    with open(f"{stem}.json", "w") as file:
        json.dump(result, file, indent=2)
    plot(result, f"{stem}.png")
    print(f"wrote {stem}.json and {stem}.png")
    return result


if __name__ == "__main__":
    main()
