"""Released checkpoints as mmengine writes them load safely: numpy scalars and mmengine objects in `meta` and
`message_hub` become inert data, nothing the file names is imported or called, and a file that would run code when
unpickled is refused."""

from __future__ import annotations

import builtins
import os
import sys
import types

import numpy as np
import pytest
import torch
from conftest import tiny_dinov2
from peft import get_peft_model_state_dict
from test_convert import mmseg_checkpoint, official_state_dict

from rein_peft import OfficialCheckpointError, convert_official_checkpoint
from rein_peft.official.convert import read_checkpoint
from rein_peft.official.safe_load import InertGlobal, UnsafeCheckpointError, load_checkpoint

HISTORY_BUFFER_MODULE = "mmengine.logging.history_buffer"


class HistoryBuffer:
    """Stands in for mmengine's `HistoryBuffer` (numpy histories, saved with pickle's NEWOBJ + BUILD)."""

    def __init__(self, values: list[float]) -> None:
        self._log_history = np.asarray(values, dtype=np.float64)
        self._count_history = np.ones(len(values), dtype=np.int64)
        self.max_length = 1000

    def __setstate__(self, state):  # pragma: no cover - must never run while rein_peft reads the file
        raise AssertionError("the checkpoint's class was imported and run")


def _save_mmengine_checkpoint(path, state_dict: dict, monkeypatch) -> None:
    """Save `state_dict` inside everything else mmengine's `Runner.save_checkpoint` writes, with the stand-in
    `HistoryBuffer` importable under mmengine's module name only while saving."""
    with monkeypatch.context() as patch:
        for name in ("mmengine", "mmengine.logging"):
            patch.setitem(sys.modules, name, types.ModuleType(name))
        module = types.ModuleType(HISTORY_BUFFER_MODULE)
        module.HistoryBuffer = HistoryBuffer
        patch.setitem(sys.modules, HISTORY_BUFFER_MODULE, module)
        patch.setattr(HistoryBuffer, "__module__", HISTORY_BUFFER_MODULE)
        parameter = torch.nn.Parameter(torch.randn(4))
        optimizer = torch.optim.AdamW([parameter], lr=1e-4)
        parameter.sum().backward()
        optimizer.step()
        torch.save(
            {
                "meta": {
                    "seed": np.int64(3),
                    "epoch": 0,
                    "iter": np.int64(40000),
                    "time": "20240101_000000",
                    "mmengine_version": "0.10.3",
                    "lr": np.float64(1e-4),
                    "loss_scale": np.float32(512.0),
                    "dataset_meta": {"classes": ("road", "sidewalk"), "palette": np.array([[128, 64, 128]])},
                },
                "state_dict": state_dict,
                "message_hub": {
                    "log_scalars": {"train/loss": HistoryBuffer([1.5, 1.2]), "train/lr": HistoryBuffer([1e-4])},
                    "runtime_info": {"iter": np.int64(40000), "max_iters": 40000},
                    "resumed_keys": {"iter": True},
                },
                "optimizer": optimizer.state_dict(),
                "param_schedulers": [{"eta_min": 0.0, "power": np.float64(0.9), "last_step": np.int64(40000)}],
            },
            path,
        )


def test_an_mmengine_checkpoint_loads_as_inert_data_without_importing_anything(tmp_path, monkeypatch):
    tensors = official_state_dict(low_rank=True, linked=True)
    _save_mmengine_checkpoint(tmp_path / "iter_40000.pth", mmseg_checkpoint(tensors)["state_dict"], monkeypatch)
    # numpy's reconstructors must not be called either: only the checkpoint's tensors are used
    for name in ("scalar", "_reconstruct"):
        monkeypatch.setattr(np._core.multiarray, name, lambda *args: pytest.fail("numpy was called"))
    assert "mmengine" not in sys.modules
    allowed_before = torch.serialization.get_safe_globals()

    loaded = load_checkpoint(tmp_path / "iter_40000.pth")

    # the placeholders were allowed for this load only
    assert set(torch.serialization.get_safe_globals()) == set(allowed_before)

    assert "mmengine" not in sys.modules  # nothing the file names was imported
    buffer = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, InertGlobal) and buffer.global_name == f"{HISTORY_BUFFER_MODULE}.HistoryBuffer"
    assert set(buffer.state) == {"_log_history", "_count_history", "max_length"} and buffer.state["max_length"] == 1000
    seed = loaded["meta"]["seed"]
    assert isinstance(seed, InertGlobal) and seed.global_name == "numpy._core.multiarray.scalar"
    assert loaded["meta"]["time"] == "20240101_000000" and loaded["meta"]["epoch"] == 0
    assert torch.is_tensor(loaded["optimizer"]["state"][0]["exp_avg"])
    for name, tensor in tensors.items():  # the weights are copied, not computed
        assert torch.equal(loaded["state_dict"][f"backbone.reins.{name}"], tensor)
    assert set(read_checkpoint(tmp_path / "iter_40000.pth")) == set(mmseg_checkpoint(tensors)["state_dict"])


def test_an_mmengine_checkpoint_converts(tmp_path, monkeypatch):
    tensors = official_state_dict(low_rank=False, linked=False)
    _save_mmengine_checkpoint(tmp_path / "iter_40000.pth", mmseg_checkpoint(tensors)["state_dict"], monkeypatch)
    from_file = convert_official_checkpoint(tmp_path / "iter_40000.pth", tiny_dinov2(classifier=False))
    from_tensors = convert_official_checkpoint(tensors, tiny_dinov2(classifier=False))
    converted, expected = get_peft_model_state_dict(from_file), get_peft_model_state_dict(from_tensors)
    assert converted.keys() == expected.keys() and any(key.endswith("rein_tokens") for key in converted)
    for key, tensor in expected.items():  # loaded tensors, copied: bit-equal
        assert torch.equal(converted[key], tensor), key


class RunsShellCommand:
    """A hostile object: unpickling it would run a shell command that writes a marker file."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsPython:
    """A hostile object through a module PyTorch does not block: unpickling it would call `exec`."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("hostile", [RunsShellCommand, RunsPython])
@pytest.mark.parametrize("where", ["meta", "state_dict"])
def test_a_file_that_would_run_code_is_refused(tmp_path, hostile, where):
    marker = tmp_path / "marker"
    state_dict = mmseg_checkpoint(official_state_dict(low_rank=False, linked=False))["state_dict"]
    checkpoint = {"meta": {"seed": np.int64(3)}, "state_dict": state_dict}
    if where == "meta":
        checkpoint["meta"]["hook"] = hostile(marker)
    else:
        state_dict["backbone.reins.scale"] = hostile(marker)
    torch.save(checkpoint, tmp_path / "hostile.pth")
    allowed_before = set(torch.serialization.get_safe_globals())
    called = "posix.system" if hostile is RunsShellCommand else "builtins.exec"

    with pytest.raises(UnsafeCheckpointError, match=called.replace(".", r"\.")):
        load_checkpoint(tmp_path / "hostile.pth")
    with pytest.raises(OfficialCheckpointError, match=r"'.*hostile\.pth' was not loaded: .*never runs code") as error:
        convert_official_checkpoint(tmp_path / "hostile.pth", tiny_dinov2(classifier=False))
    assert called in str(error.value)
    assert not marker.exists()
    assert set(torch.serialization.get_safe_globals()) == allowed_before


def test_a_legacy_format_file_loads_with_pytorchs_allow_list(tmp_path):
    state_dict = mmseg_checkpoint(official_state_dict(low_rank=False, linked=False))["state_dict"]
    torch.save({"state_dict": state_dict}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert read_checkpoint(tmp_path / "legacy.pth").keys() == state_dict.keys()
    torch.save({"meta": {"seed": np.int64(3)}}, tmp_path / "legacy_numpy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match=r"numpy\._core\.multiarray\.scalar"):
        load_checkpoint(tmp_path / "legacy_numpy.pth")


def test_an_unknown_object_in_the_state_dict_is_not_taken_for_a_tensor(tmp_path, monkeypatch):
    state_dict = mmseg_checkpoint(official_state_dict(low_rank=False, linked=False))["state_dict"]
    state_dict["backbone.reins.scale"] = HistoryBuffer([1.0])  # an object where a tensor belongs
    _save_mmengine_checkpoint(tmp_path / "odd.pth", state_dict, monkeypatch)
    with pytest.raises(OfficialCheckpointError, match=r"'backbone\.reins\.scale': 'HistoryBuffer'.*torch\.tensor"):
        convert_official_checkpoint(tmp_path / "odd.pth", tiny_dinov2(classifier=False))
