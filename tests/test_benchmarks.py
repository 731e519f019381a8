"""The overhead benchmark runs end to end (tiny settings, no timing asserted) and its FLOP model matches the bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from overhead import Setting, flop_model  # noqa: E402


@pytest.mark.parametrize(("setting", "overhead"), [("B@224x16", 0.10), ("L@512x1", 0.085)])
def test_flop_model_gives_the_published_bound(setting, overhead):
    assert flop_model(Setting.parse(setting))["inference_rein_over_bare"] == pytest.approx(1 + overhead, abs=0.002)


def test_benchmark_runs_and_writes_json_and_png(tmp_path):
    command = [
        sys.executable,
        str(BENCHMARKS / "overhead.py"),
        "--configs",
        "S@32x2",
        "--repeats",
        "1",
        "--inference-repeats",
        "1",
    ]
    command += ["--warmup", "0", "--sweep-resolutions", "32", "48", "--sweep-batches", "1", "2"]
    result = subprocess.run([*command, "--output", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FLOP-model bounds for Rein" in result.stdout
    results = json.loads((tmp_path / "overhead_cpu_float32.json").read_text())
    methods = results["settings"][0]["methods"]
    assert set(methods) == {"bare", "rein", "rein_lora16", "lora16", "full"}
    assert methods["rein"]["trainable_params"] < methods["full"]["trainable_params"]
    assert methods["rein"]["train_memory_mb"] < methods["full"]["train_memory_mb"]
    assert len(results["sweep"]) == 3 and (tmp_path / "overhead_cpu_float32.png").stat().st_size > 0


def test_mixed_batch_benchmark_runs_and_writes_json(tmp_path):
    command = [sys.executable, str(BENCHMARKS / "mixed_batches.py"), "--config", "S@32x8", "--repeats", "1"]
    command += ["--warmup", "0", "--output", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "a batch mixing 4 Rein adapters costs" in result.stdout
    results = json.loads((tmp_path / "mixed_batches_cpu_float32.json").read_text())
    assert results["num_adapters"] == 4 and set(results["seconds"]) == {"bare", "one", "mixed"}
    assert results["mixed_over_one"] > 0
