"""Export for serving: torch.export and ONNX (run with onnxruntime) of models with a Rein adapter applied, with a
dynamic batch size, equal to eager; after `unload()` the export is the bare model's."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import FAMILIES, assert_same_numbers, build, pixels, randomize_adapter, tiny_dinov2, tiny_upernet
from peft import PeftModel, get_peft_model

from rein_peft import ReinConfig
from rein_peft.integrations.export import export_onnx, export_program

# compares separately computed numbers: scripts/test.sh runs these tests again under OMP_NUM_THREADS=1
pytestmark = pytest.mark.numerics

TOLERANCE = 1e-4


def _peft_vit() -> torch.nn.Module:
    return get_peft_model(build(FAMILIES["vit"]), ReinConfig(token_length=6, modules_to_save=["classifier"]))


def _peft_dinov2() -> torch.nn.Module:
    return get_peft_model(tiny_dinov2(), ReinConfig(token_length=6, lora_dim=3))


def _transformers_api_dinov2() -> torch.nn.Module:
    model = tiny_dinov2()
    model.add_adapter(ReinConfig(token_length=6))
    return model


def _peft_upernet() -> torch.nn.Module:
    return get_peft_model(tiny_upernet(), ReinConfig(token_length=6, modules_to_save=["decode_head"]))


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "vit_classifier": _peft_vit,
    "dinov2_classifier": _peft_dinov2,
    "dinov2_transformers_api": _transformers_api_dinov2,
    "upernet_dinov2_segmentation": _peft_upernet,
}


def _adapted(name: str) -> torch.nn.Module:
    model = MODELS[name]()
    randomize_adapter(model)
    return model.eval()


def _eager(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=inputs).logits


def _tolerance(model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """1e-4, and at most a thousandth of what the adapter changes in the outputs (the tiny UperNet's logits are
    ~1e-2): an export that lost the adapter cannot pass."""
    adapted = _eager(model, inputs)
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            bare = _eager(model, inputs)
    else:
        model.disable_adapters()
        bare = _eager(model, inputs)
        model.enable_adapters()
    return min(TOLERANCE, 1e-3 * (adapted - bare).abs().max().item())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_export_with_a_dynamic_batch_equals_eager(name):
    model = _adapted(name)
    program = export_program(model, {"pixel_values": pixels(2)})
    for batch in (1, 5):
        inputs = pixels(batch, seed=batch)
        with torch.no_grad():
            exported = program.module()(pixel_values=inputs).logits
        assert (exported - _eager(model, inputs)).abs().max().item() <= _tolerance(model, inputs)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnx_export_runs_in_onnxruntime_with_a_dynamic_batch(name, tmp_path):
    model = _adapted(name)
    path = tmp_path / "model.onnx"
    export_onnx(model, path, {"pixel_values": pixels(2)})
    session = onnxruntime.InferenceSession(str(path))
    assert [node.name for node in session.get_inputs()] == ["pixel_values"]
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 5):
        inputs = pixels(batch, seed=batch)
        (logits,) = session.run(["logits"], {"pixel_values": inputs.numpy()})
        assert np.abs(logits - _eager(model, inputs).numpy()).max() <= _tolerance(model, inputs)


def test_export_after_unload_is_the_bare_model():
    bare = tiny_dinov2()
    model = get_peft_model(copy.deepcopy(bare), ReinConfig(token_length=6))
    randomize_adapter(model)
    program = export_program(model.unload(), {"pixel_values": pixels(2)})
    assert not [key for key in program.state_dict if "rein" in key]
    inputs = pixels(3)
    with torch.no_grad():
        assert_same_numbers(program.module()(pixel_values=inputs).logits, bare(pixel_values=inputs).logits)


def test_the_export_refuses_what_it_cannot_do_well(monkeypatch, tmp_path):
    model = _adapted("dinov2_classifier")
    with pytest.raises(ValueError, match="batch of at least 2"):
        export_program(model, {"pixel_values": pixels(1)})
    with pytest.raises(ValueError, match=r"call `model.eval\(\)` first"):
        export_program(model.train(), {"pixel_values": pixels(2)})
    model.eval()
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the `export` extra were not installed
    with pytest.raises(ImportError, match=r"^ONNX export needs 'onnxscript', which is not installed: pip install"):
        export_onnx(model, tmp_path / "model.onnx", {"pixel_values": pixels(2)})
    assert not (tmp_path / "model.onnx").exists()
