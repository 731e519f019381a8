"""Every way of adding or loading an adapter that fails leaves the model exactly as it was: the same modules, hooks,
parameters (values and `requires_grad`), attributes and outputs; a second adapter that fails leaves the first one
working."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same_numbers, pixels, randomize_adapter, tiny_dinov2
from peft import PeftModel, get_peft_model
from reference import official_tensors
from torch import nn

from rein_peft import ReinConfig, ReinStateDictError, ReinUnsupportedModelError, convert_official_checkpoint

# compares separately computed numbers: scripts/test.sh runs these tests again under OMP_NUM_THREADS=1
pytestmark = pytest.mark.numerics


def snapshot(model: nn.Module) -> dict[str, Any]:
    """What a failed call must not change, in a form that compares with `==` (tensor values separately)."""
    return {
        "modules": [(name, id(module)) for name, module in model.named_modules()],
        "hooks": [
            (name, list(module._forward_hooks.items()), list(module._forward_pre_hooks.items()))
            for name, module in model.named_modules()
        ],
        "parameters": [(name, id(param), param.requires_grad) for name, param in model.named_parameters()],
        "attributes": {name: sorted(vars(module)) for name, module in model.named_modules()},
        "peft_config": sorted(getattr(model, "peft_config", {})),
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any], values: dict[str, torch.Tensor], logits) -> None:
    assert snapshot(model) == before
    assert all(torch.equal(param, values[name]) for name, param in model.named_parameters())
    with torch.no_grad():
        assert_same_numbers(model(pixels(2)).logits, logits)


def record(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor]:
    with torch.no_grad():
        logits = model(pixels(2)).logits
    return snapshot(model), {name: param.detach().clone() for name, param in model.named_parameters()}, logits


def save_adapter(folder: Path, **model_kwargs) -> Path:
    peft_model = get_peft_model(
        tiny_dinov2(**model_kwargs), ReinConfig(token_length=5, modules_to_save=["classifier"])
    )
    randomize_adapter(peft_model)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture
def wide_adapter(tmp_path: Path) -> Path:
    """An adapter trained on a backbone 48 wide, which the 32-wide test models cannot take."""
    return save_adapter(tmp_path / "wide", hidden=48)


@pytest.fixture
def deep_adapter(tmp_path: Path) -> Path:
    return save_adapter(tmp_path / "deep", num_layers=3)


@pytest.fixture
def inconsistent_adapter(tmp_path: Path) -> Path:
    """An adapter whose adapter_config.json says token_length 9 while its weights have 5 tokens."""
    folder = save_adapter(tmp_path / "inconsistent")
    config_file = folder / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "token_length": 9}))
    return folder


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        (
            "wide_adapter",
            r"different backbone than Dinov2ForImageClassification: 'rein_delta_f.bias' has shape \[48\]",
        ),
        (
            "deep_adapter",
            r"different backbone than Dinov2ForImageClassification: 'rein_tokens' has shape \[3, 5, 32\]",
        ),
        ("inconsistent_adapter", r"config disagrees with its weights: 'rein_tokens' .* config's token_length=9 needs"),
    ],
)
def test_peft_model_from_pretrained(adapter, message, request):
    """The error names the base model's class, and tells a different backbone from a config that disagrees with
    its own weights."""
    folder = request.getfixturevalue(adapter)
    model = tiny_dinov2()
    before = record(model)
    with pytest.raises(ReinStateDictError, match=message) as error:
        PeftModel.from_pretrained(model, folder)
    assert "PeftModel" not in str(error.value)
    assert ("different backbone" in str(error.value)) != (adapter == "inconsistent_adapter")
    assert_unchanged(model, *before)


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("token_length", "abc", TypeError, r"'token_length' must be an int, got 'abc' \(str\)"),
        ("use_softmax", "false", TypeError, r"'use_softmax' must be true or false \(a bool, not a string\)"),
        ("lora_dim", 0, ValueError, "'lora_dim' must be at least 1"),
        ("layers_to_transform", [0, -1], ValueError, r"'layers_to_transform' must be at least 0, got \[0, -1\]"),
        ("scale_init", None, TypeError, "'scale_init' must be a finite number, got None"),
    ],
)
def test_a_bad_field_in_adapter_config_json_is_named_with_its_file(tmp_path, field, value, error, message):
    folder = save_adapter(tmp_path / "adapter")
    config_file = folder / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), field: value}))
    model = tiny_dinov2()
    before = record(model)
    with pytest.raises(error, match=f"{config_file}: ReinConfig field {message}"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, *before)


def test_a_weights_file_that_cannot_be_read_is_reported_as_unreadable(tmp_path):
    """A real unreadable file as root (who reads every mode): a directory where the weights file should be."""
    folder = save_adapter(tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    weights.unlink()
    weights.mkdir()
    model = tiny_dinov2()
    before = record(model)
    with pytest.raises(PermissionError, match=f"'{weights}' exists but cannot be read .*Is a directory"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, *before)


UNREADABLE_AS_ANOTHER_USER = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_dinov2
from peft import PeftModel
import rein_peft
try:
    PeftModel.from_pretrained(tiny_dinov2(), {folder!r})
except Exception as error:
    print(type(error).__name__, error)
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to run as another user"
)
def test_a_weights_file_of_another_user_is_reported_as_unreadable():
    """The case behind it: safetensors writes the file with mode 0600, so another user cannot read it. Saved as root,
    loaded as `nobody` (a real permission denial, in a child process)."""
    folder = Path(tempfile.mkdtemp(prefix="rein-unreadable-"))
    try:
        folder.chmod(0o755)  # others may enter the folder and read adapter_config.json, not the weights
        save_adapter(folder / "adapter")
        (folder / "adapter").chmod(0o755)
        weights = folder / "adapter" / "adapter_model.safetensors"
        assert stat.S_IMODE(weights.stat().st_mode) == 0o600
        script = UNREADABLE_AS_ANOTHER_USER.format(tests=str(Path(__file__).parent), folder=str(folder / "adapter"))
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        environment = {**os.environ, "HOME": str(folder), "HF_HOME": str(folder / "hf")}
        result = subprocess.run(
            [*nobody, sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300
        )
        assert (
            f"PermissionError The adapter weights file '{weights}' exists but cannot be read (Permission denied)"
            in (result.stdout)
        ), result.stdout + result.stderr
    finally:
        shutil.rmtree(folder)


def test_a_second_adapter_that_fails_leaves_the_first_working(tmp_path, wide_adapter):
    peft_model = PeftModel.from_pretrained(tiny_dinov2(), save_adapter(tmp_path / "good"), adapter_name="good")
    before = record(peft_model)
    with pytest.raises(ReinStateDictError, match="different backbone"):
        peft_model.load_adapter(wide_adapter, adapter_name="wide")
    assert_unchanged(peft_model, *before)
    assert list(peft_model.peft_config) == ["good"] and peft_model.active_adapters == ["good"]
    # and the name is free again: the same adapter name takes a good adapter
    peft_model.load_adapter(tmp_path / "good", adapter_name="wide")
    assert sorted(peft_model.peft_config) == ["good", "wide"]


def test_transformers_load_adapter(wide_adapter):
    model = tiny_dinov2()
    before = record(model)
    # transformers loads adapter weights with its own loader, whose report lists each tensor's two shapes
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        model.load_adapter(str(wide_adapter))
    assert_unchanged(model, *before)
    assert not getattr(model, "_hf_peft_config_loaded", False)


def test_transformers_load_adapter_of_a_second_adapter(tmp_path, wide_adapter):
    model = tiny_dinov2()
    model.load_adapter(str(save_adapter(tmp_path / "good")), adapter_name="good")
    before = record(model)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        model.load_adapter(str(wide_adapter), adapter_name="wide")
    assert_unchanged(model, *before)


@pytest.mark.parametrize(
    ("config", "error"),
    [
        (ReinConfig(token_length=5, layers_to_transform=[7]), "asks for layers \\[7\\]"),
        (ReinConfig(token_length=5, modules_to_save=["no_such_head"]), "has no module of these names"),
    ],
)
def test_get_peft_model_and_transformers_add_adapter_with_a_config_that_cannot_fit(config, error):
    model = tiny_dinov2()
    before = record(model)
    with pytest.raises(ValueError, match=error):
        get_peft_model(model, config)
    assert_unchanged(model, *before)
    with pytest.raises(ValueError, match=error):
        model.add_adapter(config)
    assert_unchanged(model, *before)


def test_an_adapter_that_fails_late_in_its_injection_leaves_the_first_working():
    # modules_to_save=["default"] names the first adapter's own modules (`rein_token2feat.default`, ...): PEFT refuses
    # to wrap them, after Rein has placed the second adapter's tensors
    late_failure = ReinConfig(token_length=5, modules_to_save=["default"])
    peft_model = get_peft_model(tiny_dinov2(), ReinConfig(token_length=5))
    randomize_adapter(peft_model)
    before = record(peft_model)
    with pytest.raises(ValueError, match="child of"):
        peft_model.add_adapter("second", late_failure)
    assert_unchanged(peft_model, *before)

    model = tiny_dinov2()
    model.add_adapter(ReinConfig(token_length=5))
    before = record(model)
    with pytest.raises(ValueError, match="child of"):
        model.add_adapter(late_failure, adapter_name="second")
    assert_unchanged(model, *before)


def test_get_peft_model_on_an_unsupported_model():
    model = nn.Sequential(nn.Linear(4, 4))
    before = [(name, id(module)) for name, module in model.named_modules()]
    with pytest.raises(ReinUnsupportedModelError):
        get_peft_model(model, ReinConfig(token_length=5))
    assert [(name, id(module)) for name, module in model.named_modules()] == before
    assert not hasattr(model, "peft_config")


def test_convert_official_checkpoint_for_another_backbone():
    donor = get_peft_model(tiny_dinov2(hidden=48, classifier=False), ReinConfig(token_length=5))
    checkpoint = {f"backbone.reins.{name}": tensor for name, tensor in official_tensors(donor).items()}
    model = tiny_dinov2()
    before = record(model)
    with pytest.raises(ReinStateDictError, match="different backbone"):
        convert_official_checkpoint(checkpoint, model)
    assert_unchanged(model, *before)


def test_a_config_asking_for_other_tensors_than_its_weights_hold_says_so(tmp_path):
    """adapter_config.json says low-rank tokens (lora_dim 4) while the file holds full-rank ones."""
    folder = save_adapter(tmp_path / "adapter")
    config_file = folder / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "lora_dim": 4}))
    model = tiny_dinov2()
    before = record(model)
    with pytest.raises(ReinStateDictError, match=r"holds '.*rein_tokens'.*config \(adapter_config.json\) disagrees"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, *before)
