"""Saving and loading adapters: adapter-only files, fresh processes, bare <-> head, and every bad file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_same_numbers, pixels, randomize_adapter, tiny_dinov2
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from rein_peft import ReinConfig, ReinLayer, ReinStateDictError

# compares separately computed numbers: scripts/test.sh runs these tests again under OMP_NUM_THREADS=1
pytestmark = pytest.mark.numerics


def _seeded(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return tiny_dinov2(**kwargs)


@pytest.fixture
def saved_adapter(tmp_path):
    peft_model = get_peft_model(_seeded(), ReinConfig(token_length=6, lora_dim=4, modules_to_save=["classifier"]))
    randomize_adapter(peft_model)
    with torch.no_grad():
        peft_model.base_model.model.classifier.modules_to_save["default"].bias.add_(0.5)
        logits = peft_model(pixels(2)).logits
    peft_model.save_pretrained(tmp_path)
    return tmp_path, peft_model, logits


def test_save_writes_only_adapter_tensors(saved_adapter):
    folder, peft_model, _ = saved_adapter
    assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    tensors = load_file(folder / "adapter_model.safetensors")
    prefix = "base_model.model.dinov2.encoder.rein."
    assert set(tensors) == {
        prefix + name
        for name in [
            "rein_tokens_a",
            "rein_tokens_b",
            "rein_scale",
            "rein_token2feat.weight",
            "rein_token2feat.bias",
            "rein_delta_f.weight",
            "rein_delta_f.bias",
        ]
    } | {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert tensors[prefix + "rein_scale"].shape == (1,)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "REIN" and config["lora_dim"] == 4 and config["target_modules"] is None
    assert isinstance(PeftConfig.from_pretrained(folder), ReinConfig)


def test_load_in_a_fresh_process_gives_identical_outputs(saved_adapter, tmp_path_factory):
    folder, _, logits = saved_adapter
    out = tmp_path_factory.mktemp("fresh") / "logits.pt"
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        import rein_peft
        from peft import PeftModel
        from conftest import tiny_dinov2
        torch.manual_seed(0)
        base = tiny_dinov2()
        model = PeftModel.from_pretrained(base, {str(folder)!r})
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.save(model(pixels).logits, {str(out)!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    assert_same_numbers(torch.load(out), logits)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_load_round_trip(saved_adapter, low_cpu_mem_usage):
    folder, _, logits = saved_adapter
    loaded = PeftModel.from_pretrained(_seeded(), folder, low_cpu_mem_usage=low_cpu_mem_usage)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default, as in PEFT
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    with torch.no_grad():
        assert_same_numbers(loaded(pixels(2)).logits, logits)
    trainable = PeftModel.from_pretrained(_seeded(), folder, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_adapter_moves_between_bare_backbone_and_task_head(tmp_path):
    bare = get_peft_model(_seeded(classifier=False), ReinConfig(token_length=6))
    randomize_adapter(bare)
    with torch.no_grad():
        bare_features = bare(pixels(2)).last_hidden_state
    bare.save_pretrained(tmp_path / "bare")

    head = PeftModel.from_pretrained(_seeded(), tmp_path / "bare")
    with torch.no_grad():
        head_features = head(pixels(2), output_hidden_states=True).hidden_states[-1]
    # the classifier model's last hidden state is before its final norm; compare the norm's output
    head_features = head.base_model.model.dinov2.layernorm(head_features)
    assert_same_numbers(head_features, bare_features)

    head.save_pretrained(tmp_path / "head")
    bare_again = PeftModel.from_pretrained(_seeded(classifier=False), tmp_path / "head")
    with torch.no_grad():
        assert_same_numbers(bare_again(pixels(2)).last_hidden_state, bare_features)


@pytest.mark.parametrize(
    ("model_kwargs", "message"),
    [
        ({"num_layers": 4}, r"'rein_tokens_a' has shape \[2, 6, 4\], but this model needs \[4, 6, 4\]"),
        ({"hidden": 48}, r"'rein_tokens_b' has shape \[2, 4, 32\], but this model needs \[2, 4, 48\]"),
    ],
)
def test_loading_into_a_different_backbone_names_both_shapes(saved_adapter, model_kwargs, message):
    folder, _, _ = saved_adapter
    with pytest.raises(ReinStateDictError, match=message):
        PeftModel.from_pretrained(_seeded(**model_kwargs), folder)


def test_missing_weights_file_is_named_and_the_base_model_is_untouched(saved_adapter):
    folder, _, _ = saved_adapter
    (folder / "adapter_model.safetensors").unlink()
    base = _seeded()
    with pytest.raises(FileNotFoundError, match="no weights file: expected 'adapter_model.safetensors'"):
        PeftModel.from_pretrained(base, folder)
    assert not any(isinstance(m, ReinLayer) for m in base.modules())


def test_corrupt_weights_file_is_named(saved_adapter):
    folder, _, _ = saved_adapter
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"'{weights}' is corrupt or truncated"):
        PeftModel.from_pretrained(_seeded(), folder)


def test_missing_config_is_named(tmp_path):
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        PeftModel.from_pretrained(_seeded(), tmp_path / "nothing-here")


def test_a_file_from_another_config_is_refused(saved_adapter, tmp_path):
    folder, _, _ = saved_adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_dim"] = None  # now the config asks for full-rank tokens, the file has low-rank ones
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ReinStateDictError, match="holds '.*rein_tokens_a'.*different ReinConfig"):
        PeftModel.from_pretrained(_seeded(), folder)
