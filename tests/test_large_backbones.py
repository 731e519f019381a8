"""Large backbones on modest hardware: FSDP2 sharding (2 CPU processes) and accelerate offload (int8 backbones:
test_quantized_backbones.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsdp_worker
import pytest
import torch
import torch.distributed as dist
import transformers as tf
from conftest import MULTIPROCESS, assert_same_numbers, on_threads, pixels, randomize_adapter, tiny_dinov2
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

import rein_peft
from rein_peft import ReinConfig

# compares separately computed numbers: scripts/test.sh runs these tests again under OMP_NUM_THREADS=1
pytestmark = pytest.mark.numerics

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FSDP_CONFIG = ROOT / "examples" / "accelerate_configs" / "fsdp2.yaml"


# --- FSDP2 ---------------------------------------------------------------------------------------------------------


def _launch(launcher: str, out: Path, *extra: str) -> None:
    bin_dir = Path(sys.executable).parent
    command = {
        "plain": [str(bin_dir / "torchrun"), "--nproc_per_node", "2"],
        # accelerate runs on CPU processes only when told to (ACCELERATE_USE_CPU below)
        "accelerate": [str(bin_dir / "accelerate"), "launch", "--config_file", str(FSDP_CONFIG)],
    }[launcher]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(TESTS)}
    result = subprocess.run(
        [*command, str(TESTS / "fsdp_worker.py"), launcher, str(out), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def _one_process_reference() -> torch.nn.Module:
    """The model one process trains, on two threads: the sharded ranks compute on one, and the comparison must hold
    across thread counts (MKL's float32 results depend on them) whatever thread count pytest runs on."""
    model, optimizer = fsdp_worker.build()
    with on_threads(2):
        fsdp_worker.train(model, optimizer, range(fsdp_worker.STEPS))
    return model


def _assert_adapter_matches_reference(out: Path) -> None:
    info = json.loads((out / "run_info.json").read_text())
    assert info == {"world_size": 2, "tokens_sharded": True}  # really sharded over two processes
    reference = _one_process_reference()
    expected = get_peft_model_state_dict(reference)
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.allclose(saved[key], tensor, atol=1e-5, rtol=0), key
    # the complete adapter loads into a fresh base model and computes what the one-process model computes
    loaded = PeftModel.from_pretrained(fsdp_worker.base_model(), out / "adapter").eval()
    x = pixels(3)
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, reference.eval()(x).logits, atol=1e-5)


@MULTIPROCESS
@pytest.mark.parametrize("launcher", ["plain", "accelerate"])
def test_fsdp2_training_resumes_from_a_sharded_checkpoint_and_matches_one_process(tmp_path, launcher):
    """Sharded training interrupted after 3 steps and resumed from its checkpoint ends with the adapter one process
    computes in 6 uninterrupted steps, and saves it complete (one launch pair per launcher covers both: an
    uninterrupted sharded run is the resumed run's first half)."""
    _launch(launcher, tmp_path, "--stop_after", "3")
    shards = sorted(path.name for path in (tmp_path / "checkpoint").rglob("*.distcp"))
    assert shards and all(name.startswith(("__0_", "__1_")) for name in shards)  # written by both ranks
    assert not (tmp_path / "adapter").exists()
    _launch(launcher, tmp_path, "--resume")  # steps 3..5, momentum buffers included, must end where 0..5 ends
    _assert_adapter_matches_reference(tmp_path)


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sharding_the_rein_layer_on_its_own_is_refused(one_process_group):
    from torch.distributed.fsdp import fully_shard

    model = get_peft_model(tiny_dinov2(), ReinConfig(token_length=6))
    fully_shard(model.base_model.model.dinov2.encoder.rein)  # gathered only around its own forward, which never runs
    with pytest.raises(ValueError, match=r"still sharded \(a DTensor\).*fully_shard\(model\)"):
        model(pixels(2))


def test_gather_adapter_state_dict_without_sharding_is_the_adapter():
    model = get_peft_model(tiny_dinov2(), ReinConfig(token_length=6, modules_to_save=["classifier"]))
    gathered = rein_peft.gather_adapter_state_dict(model)
    assert get_peft_model_state_dict(model, state_dict=gathered).keys() == get_peft_model_state_dict(model).keys()
    state = model.state_dict()
    assert all(torch.equal(tensor, state[key]) for key, tensor in gathered.items())
    assert all(".rein_" in key or ".modules_to_save." in key for key in gathered)


# --- offloading (accelerate) ---------------------------------------------------------------------------------------


def _save_base_and_adapter(folder: Path, num_layers: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Save a tiny DINOv2 to folder/base and a Rein adapter of it to folder/adapter; the model in memory, an input and
    the model's logits for it."""
    base = tiny_dinov2(num_hidden_layers=num_layers)
    base.save_pretrained(folder / "base")
    in_memory = get_peft_model(base, ReinConfig(token_length=6, modules_to_save=["classifier"]))
    randomize_adapter(in_memory)
    in_memory.save_pretrained(folder / "adapter")
    x = pixels(3)
    with torch.no_grad():
        return in_memory, x, in_memory.eval()(x).logits


def test_rein_on_an_offloaded_backbone_gives_the_outputs_of_the_model_in_memory(tmp_path):
    _, x, expected = _save_base_and_adapter(tmp_path, num_layers=4)

    # a CPU budget too small for the model: accelerate keeps what fits and offloads the rest to disk
    offloaded = tf.Dinov2ForImageClassification.from_pretrained(
        tmp_path / "base", device_map="auto", max_memory={"cpu": "150KB"}, offload_folder=tmp_path / "offload"
    )
    assert {"cpu", "disk"} <= set(offloaded.hf_device_map.values())
    assert offloaded.hf_device_map["dinov2.encoder.layer.3"] == "disk"
    offloaded.load_adapter(str(tmp_path / "adapter"))
    rein_layer = offloaded.dinov2.encoder.rein
    assert rein_layer.rein_tokens["default"].device.type == "cpu"  # not left on the meta device
    with torch.no_grad():
        assert_same_numbers(offloaded.eval()(x).logits, expected)


def test_an_encoder_offloaded_to_disk_as_one_block_keeps_rein_in_memory(tmp_path):
    in_memory, x, expected = _save_base_and_adapter(tmp_path, num_layers=2)

    def offloaded() -> torch.nn.Module:  # a budget below one layer: the encoder goes to disk as one block
        model = tf.Dinov2ForImageClassification.from_pretrained(
            tmp_path / "base", device_map="auto", max_memory={"cpu": "80KB"}, offload_folder=tmp_path / "offload"
        )
        assert model.hf_device_map["dinov2.encoder"] == "disk"
        return model

    # transformers' loader follows the device_map: without an entry of its own, the ReinLayer inside the offloaded
    # encoder would get its weights sent to the offload files, and keep its random initial values
    loaded = offloaded()
    loaded.load_adapter(str(tmp_path / "adapter"))
    assert loaded.hf_device_map["dinov2.encoder.rein"] == "cpu"
    with torch.no_grad():
        assert_same_numbers(loaded.eval()(x).logits, expected)

    fresh = get_peft_model(offloaded(), ReinConfig(token_length=6, modules_to_save=["classifier"]))
    fresh.load_state_dict(in_memory.state_dict(), strict=False)
    with torch.no_grad():
        assert_same_numbers(fresh.eval()(x).logits, expected)
    assert "dinov2.encoder.rein" not in fresh.unload().hf_device_map


def test_shape_tracing_with_fake_tensors_is_not_mistaken_for_quantization():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    model = get_peft_model(tiny_dinov2(), ReinConfig(token_length=6)).eval()
    with FakeTensorMode() as mode:  # shapes without data, as memory estimators run models
        tensors = {name: mode.from_tensor(tensor) for name, tensor in model.state_dict(keep_vars=True).items()}
        logits = functional_call(model, tensors, (torch.randn(2, 3, 32, 32),)).logits
    assert logits.shape == (2, 3)
