"""The overhead benchmark runs end to end (tiny settings, no timing asserted) and its FLOP model matches the bound."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
from conftest import HEAVY

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from overhead import Setting, flop_model  # noqa: E402


@pytest.mark.parametrize(("setting", "overhead"), [("B@224x16", 0.10), ("L@512x1", 0.085), ("CNX-T@224x8", 0.213)])
def test_flop_model_gives_the_published_bound(setting, overhead):
    assert flop_model(Setting.parse(setting))["inference_rein_over_bare"] == pytest.approx(1 + overhead, abs=0.002)


def test_convnext_flop_model_counts_convnext_t():
    """ConvNeXt-T is 4.5 GMACs at 224 px (its paper's 4.5 GFLOPs); Rein's per-stage refinement adds 0.95 G."""
    from overhead import _convnext_flops

    base, rein_input, _, _ = _convnext_flops(Setting.parse("CNX-T@224x1"))
    assert base == pytest.approx(4.45e9, rel=0.01) and rein_input == pytest.approx(0.949e9, rel=0.01)


# the command lines of the benchmarks below run in this process (`main(argv)`): a fresh Python would only add seconds
# of imports (each script's `__main__` only calls `main`; tests/test_command_lines.py runs them as `__main__`)


@HEAVY
def test_benchmark_runs_and_writes_json_and_png(tmp_path, capsys):
    import overhead

    argv = ["--configs", "S@32x2", "CNX-T@32x2", "--repeats", "1", "--inference-repeats", "1", "--warmup", "0"]
    overhead.main([*argv, "--sweep-resolutions", "32", "48", "--sweep-batches", "1", "2", "--output", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert "FLOP-model bounds for Rein" in stdout
    results = json.loads((tmp_path / "overhead_cpu_float32.json").read_text())
    assert [setting["setting"]["size"] for setting in results["settings"]] == ["S", "CNX-T"]
    assert "ConvNeXt-T 32px batch 2" in stdout
    for setting in results["settings"]:
        methods = setting["methods"]
        assert set(methods) == {"bare", "rein", "rein_lora16", "lora16", "full"}
        assert methods["rein"]["trainable_params"] < methods["full"]["trainable_params"]
        assert methods["rein"]["train_memory_mb"] < methods["full"]["train_memory_mb"]
    assert len(results["sweep"]) == 3 and (tmp_path / "overhead_cpu_float32.png").stat().st_size > 0


def test_mixed_batch_benchmark_runs_and_writes_json(tmp_path, capsys):
    import mixed_batches

    mixed_batches.main(["--config", "S@32x8", "--repeats", "1", "--warmup", "0", "--output", str(tmp_path)])
    assert "a batch mixing 4 Rein adapters costs" in capsys.readouterr().out
    results = json.loads((tmp_path / "mixed_batches_cpu_float32.json").read_text())
    assert results["num_adapters"] == 4 and set(results["seconds"]) == {"bare", "one", "mixed"}
    assert results["mixed_over_one"] > 0


@HEAVY
def test_memory_benchmark_measures_in_fresh_processes_and_labels_every_figure(tmp_path, capsys):
    # one backbone, the plain and the int8 method (each measured in a fresh process of its own, which the command
    # line, run here, starts); 128 px instead of the default 512. The computed figures of every row are checked
    # in-process below
    import memory

    argv = ["--quick", "--steps", "1", "--resolution", "128", "--backbones", "mini-DINOv2"]
    memory.main([*argv, "--methods", "rein", "rein+int8", "--output", str(tmp_path)])
    stdout = capsys.readouterr().out
    results = json.loads((tmp_path / "memory_cpu_float32_quick.json").read_text())
    assert [(row["backbone"], row["method"]) for row in results["rows"]] == [
        ("mini-DINOv2", "rein"),
        ("mini-DINOv2", "rein+int8"),
    ]
    assert (tmp_path / "memory_cpu_float32_quick.png").stat().st_size > 0
    for row in results["rows"]:
        assert row["measured_peak_gib"] > 0 and row["measured_step_s"] > 0 and row["computed_step_s"] > 0
        assert f"{row['measured_peak_gib']:9.2f}  measured" in stdout


def test_memory_benchmark_refuses_an_unknown_backbone(capsys):
    import memory

    with pytest.raises(SystemExit) as error:
        memory.main(["--quick", "--backbones", "ViT-L/16"])
    assert error.value.code == 2
    assert (
        "--backbones: no backbone ViT-L/16 with --quick; choose from mini-ViT, mini-DINOv2" in capsys.readouterr().err
    )


@pytest.mark.parametrize("backbone", ["mini-ViT", "mini-DINOv2"])
def test_computed_memory_of_every_method_orders_as_designed(backbone):
    import memory

    args = argparse.Namespace(device="cpu", dtype="float32", resolution=128, batch=2)
    computed = {
        method: memory.computed(memory.QUICK_BACKBONES[backbone], method, args)["bytes"] for method in memory.METHODS
    }
    assert computed["rein"]["gradients"] < computed["full"]["gradients"] / 5
    assert computed["rein+ckpt"]["activations"] < computed["rein"]["activations"]
    assert computed["rein+int8"]["weights"] < 0.7 * computed["rein"]["weights"]  # int8 linears; embeddings, Rein fp32


def test_computed_memory_extrapolates_a_deeper_model_exactly():
    """The computed figures come from a 1-layer and a 2-layer model; counted directly at 3 layers they agree."""
    import memory

    backbone = memory.QUICK_BACKBONES["mini-DINOv2"]
    args = argparse.Namespace(device="cpu", dtype="float32", resolution=64, batch=2)
    deeper = memory.Backbone(**{**backbone.__dict__, "layers": 3})
    for method in ("full", "rein", "rein+int8"):
        counted = memory.tensor_bytes(backbone, method, args, 3)
        assert memory.computed(deeper, method, args)["bytes"] == counted, method
