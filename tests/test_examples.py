"""The main job, examples/train_image_classification.py: its embedded default, real Trainer runs, DDP, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HEAVY, MULTIPROCESS
from huggingface_hub import ModelCard
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoModelForImageClassification,
    BitImageProcessorPil,
    EfficientNetConfig,
    EfficientNetModel,
    TrainerCallback,
)

import rein_peft  # noqa: F401  (registers Rein with PEFT)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
from train_image_classification import EMBEDDED_DATASET, main  # noqa: E402

QUICK = ["--max_train_samples", "256", "--max_eval_samples", "64", "--max_steps", "6", "--skip_baseline"]


def _launch(launcher: list[str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(EXAMPLES)}
    return subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=600)


@HEAVY
def test_embedded_default_shows_the_adapter_doing_work(tmp_path):
    results = main(["--output_dir", str(tmp_path)])
    assert results["accuracy_after"] >= 0.9  # 4 classes: chance is 0.25
    assert results["frozen_head_accuracy"] <= results["accuracy_after"] - 0.1
    assert results["accuracy_reloaded"] == results["accuracy_after"]
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(".rein." in key or ".classifier." in key for key in tensors)
    assert results["adapter_mb"] < 0.2
    # the adapter's model card: the base model, the four counts, the embedded data, the accuracy reached
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.base_model == str(tmp_path / "base-model")
    assert "- Head: 4 labels: one, two, three, four" in card.text
    assert card.data.datasets == [EMBEDDED_DATASET]
    assert f"| accuracy | {results['accuracy_after']:.4g} |" in card.text


class CountSteps(TrainerCallback):
    def __init__(self) -> None:
        self.first_step, self.steps = None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_checkpoints_are_adapter_only_and_resumable(tmp_path):
    flags = [*QUICK, "--output_dir", str(tmp_path), "--save_strategy", "steps", "--save_steps", "3"]
    main(flags)
    checkpoint = tmp_path / "checkpoint-3"
    files = {path.name for path in checkpoint.iterdir()}
    assert "adapter_model.safetensors" in files and "optimizer.pt" in files
    assert not any(name.startswith("model") for name in files)  # no copy of the frozen backbone
    uninterrupted = load_file(tmp_path / "adapter" / "adapter_model.safetensors")

    counter = CountSteps()
    results = main([*flags, "--resume_from_checkpoint", str(checkpoint)], callbacks=[counter])
    assert (counter.first_step, counter.steps) == (3, 3)  # picked up at step 3, ran only the remaining 3
    resumed = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for key, tensor in uninterrupted.items():  # the same adapter as the run that was never interrupted
        torch.testing.assert_close(resumed[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
    assert results["accuracy_reloaded"] == results["accuracy_after"]


def test_imagefolder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for label, color in (("red", (200, 20, 20)), ("blue", (20, 20, 200))):
        (tmp_path / "data" / label).mkdir(parents=True)
        for index in range(12):
            pixels = np.clip(rng.normal(color, 30, size=(40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{index}.png")
    results = main([*QUICK, "--dataset_name", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")])
    assert 0.0 <= results["accuracy_after"] <= 1.0 and results["accuracy_reloaded"] == results["accuracy_after"]


def _stderr_of_a_refused_run(capsys, *args: str) -> str:
    """Run the script's `main` in this process (a fresh one adds only the imports) on `args`: it must stop with exit
    status 2; what it wrote to stderr."""
    with pytest.raises(SystemExit) as stopped:
        main(list(args))
    assert stopped.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image_column", "img"], "has no column 'img' (columns: ['image', 'label']); pass --image_column."),
        (["--label_column", "target"], "has no column 'target' (columns: ['image', 'label']); pass --label_column."),
        (
            ["--output_dir", "/proc/rein-no-write"],
            "cannot write to --output_dir '/proc/rein-no-write'",
        ),
    ],
)
def test_bad_input_gets_one_clear_line(tmp_path, capsys, args, message):
    stderr = _stderr_of_a_refused_run(capsys, "--output_dir", str(tmp_path), *QUICK, *args)
    assert stderr.strip().splitlines()[-1] == f"error: {message}" or message in stderr.splitlines()[-1]


def test_a_model_rein_cannot_wrap_gets_one_clear_line(tmp_path, capsys):
    EfficientNetModel(EfficientNetConfig(image_size=32, width_coefficient=0.1, depth_coefficient=0.1)).save_pretrained(
        tmp_path / "efficientnet"
    )
    processor = BitImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False)
    processor.save_pretrained(tmp_path / "efficientnet")
    stderr = _stderr_of_a_refused_run(
        capsys, *QUICK, "--model_name_or_path", str(tmp_path / "efficientnet"), "--output_dir", str(tmp_path / "out")
    )
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: Rein found no vision-transformer encoder in EfficientNetForImageClassification")


def _assert_ranks_agree_and_adapter_loads(weights_folder: Path, output_dir: Path) -> None:
    rank0, rank1 = torch.load(weights_folder / "rank0.pt"), torch.load(weights_folder / "rank1.pt")
    assert rank0.keys() == rank1.keys() and any(".rein_tokens" in key for key in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    base = AutoModelForImageClassification.from_pretrained(output_dir / "base-model", num_labels=4)
    loaded = PeftModel.from_pretrained(base, output_dir / "adapter")
    loaded_weights = dict(loaded.named_parameters())
    for name, tensor in rank0.items():
        assert torch.equal(loaded_weights[name], tensor), name


@MULTIPROCESS
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_process_ddp_keeps_ranks_identical(tmp_path, launcher):
    weights_folder = tmp_path / "weights"
    weights_folder.mkdir()
    bin_dir = Path(sys.executable).parent
    launchers = {
        # linked queries are trained but unused by a classifier: DDP must not fail on the unused parameters
        "torchrun": ([str(bin_dir / "torchrun"), "--nproc_per_node", "2"], ["--link_token_to_query"]),
        "accelerate": (
            [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
            + ["--mixed_precision", "no", "--dynamo_backend", "no"],
            [],
        ),
    }
    command, extra = launchers[launcher]
    result = _launch(
        command,
        str(Path(__file__).parent / "ddp_worker.py"),
        str(weights_folder),
        *QUICK,
        *extra,
        "--use_cpu",
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_ranks_agree_and_adapter_loads(weights_folder, tmp_path / "out")
