"""`import rein_peft` changes nothing for PEFT's other methods: a LoRA adapter that fails to load fails the same way,
and leaves the model in the same state, with and without the import; a LoRA model's saved card is the same file.

Each side runs in a fresh Python, one that never imports rein_peft and one that does, so that neither sees the
other's registrations (this process has imported rein_peft through conftest)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import SIZES

# Saves a LoRA adapter from a backbone 16 wider than the base, then tries to load it into the base by each entry point
# and reports the error and what the base model holds afterwards; with IMPORT_REIN set, `import rein_peft` first.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    args = json.loads(sys.argv[1])
    if args["import_rein"]:
        import rein_peft  # noqa: F401
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Dinov2Config, Dinov2ForImageClassification

    def base(hidden):
        torch.manual_seed(0)
        return Dinov2ForImageClassification(Dinov2Config(**{**args["sizes"], "hidden_size": hidden})).eval()

    out = args["out"]
    adapter = out + "/wide"
    lora = get_peft_model(base(args["sizes"]["hidden_size"] + 16), LoraConfig(target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(adapter)

    def state(model):
        return {
            "modules": [[name, type(module).__name__] for name, module in model.named_modules()],
            "parameters": [[name, param.requires_grad] for name, param in model.named_parameters()],
            "peft_config": sorted(getattr(model, "peft_config", {})),
            "hf_peft_config_loaded": getattr(model, "_hf_peft_config_loaded", None),
        }

    def attempt(load):
        model = base(args["sizes"]["hidden_size"])
        try:
            load(model)
        except Exception as error:
            return {"error": [type(error).__name__, str(error).replace(out, "<out>")], "state": state(model)}
        raise AssertionError("the load of an adapter of another width succeeded")

    report = {
        "peft_from_pretrained": attempt(lambda model: PeftModel.from_pretrained(model, adapter)),
        # PeftModel.load_adapter: into a PeftModel of the base that has a good LoRA adapter already
        "peft_load_adapter": attempt(
            lambda model: get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"])).load_adapter(
                adapter, adapter_name="wide"
            )
        ),
        "transformers_load_adapter": attempt(lambda model: model.load_adapter(adapter)),
        "card": open(adapter + "/README.md", encoding="utf-8", newline="").read(),
    }
    with open(out + "/report.json", "w") as file:
        json.dump(report, file)
    """
)


def run_side(out: Path, import_rein: bool) -> dict:
    out.mkdir()
    args = {"import_rein": import_rein, "sizes": SIZES, "out": str(out)}
    subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args)], check=True)
    return json.loads((out / "report.json").read_text())


def test_a_failing_lora_load_is_the_same_with_and_without_rein_peft(tmp_path):
    without = run_side(tmp_path / "without", import_rein=False)
    with_rein = run_side(tmp_path / "with", import_rein=True)
    for entry_point in ("peft_from_pretrained", "peft_load_adapter", "transformers_load_adapter"):
        assert with_rein[entry_point] == without[entry_point], entry_point
    # the state compared is PEFT's own: its from_pretrained and transformers' load_adapter leave the LoRA layers they
    # injected in the base model (Rein's rollback, were it applied to LoRA, would remove them)
    for entry_point in ("peft_from_pretrained", "transformers_load_adapter"):
        assert any(".lora_A." in name for name, _ in without[entry_point]["state"]["parameters"]), entry_point
    assert with_rein["card"] == without["card"]
