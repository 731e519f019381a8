"""Rein adapters on the Hub: `push_to_hub` and `PeftModel.from_pretrained` through the real huggingface_hub client,
talking HTTP to a loopback Hub (tests/hub_server.py) that runs in a thread of this process.

huggingface_hub reads HF_ENDPOINT when it is imported, and this process has imported it already, so the client side
of each scenario runs in a fresh Python (`run_client`), with its own empty HF cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import FLOAT32_RTOL, assert_same_numbers
from hub_server import serve_hub
from huggingface_hub import ModelCard

BASE_REPO, ADAPTER_REPO, PINNED_REPO = "tester/tiny-dinov2", "tester/rein-adapter", "tester/rein-pinned"

# the module's fixtures (a Hub server, the pushes of a client process) run once on each pytest-xdist worker that runs
# a test of this module: one worker runs them all
pytestmark = pytest.mark.xdist_group("hub")

# Run before every client script. `OUT` is the script's own folder (also its working directory), `ARGS` its inputs.
HUB_PRELUDE = f"""
import json
import os
import sys

from huggingface_hub import HfApi, hf_hub_download

BASE_REPO, ADAPTER_REPO, PINNED_REPO = {BASE_REPO!r}, {ADAPTER_REPO!r}, {PINNED_REPO!r}
OUT, ARGS = sys.argv[1], json.loads(sys.argv[2])
api = HfApi()


def report(**values):
    print("RESULT " + json.dumps(values))
"""

# ... and this one as well, for the scenarios with models.
CLIENT_PRELUDE = """
import traceback

import torch

import rein_peft  # registers Rein with PEFT: before loading any Rein adapter
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from transformers import Dinov2Config, Dinov2ForImageClassification

PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(123))


def tiny_base():
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8, num_labels=3)
    torch.manual_seed(0)
    return Dinov2ForImageClassification(config).eval()


def hub_base():
    return Dinov2ForImageClassification.from_pretrained(BASE_REPO).eval()


def randomize(model, seed):
    # Seeded values for every trainable tensor (adapter and classifier copy) that change the output visibly.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                values = torch.randn(param.shape, generator=generator)
                param.copy_(values / param.shape[-1] ** 0.5 if param.ndim >= 2 else values * 0.5)


def adapter_state(model):
    with torch.no_grad():
        logits = model(pixel_values=PIXELS).logits
    weights = {name: tensor.clone() for name, tensor in get_peft_model_state_dict(model).items()}
    return {"weights": weights, "logits": logits}


def error_of(call):
    # The exception `call` raises, and its chain: type names, message, and any frame inside rein_peft but the
    # wrapper that puts the model back after a failed load (rein_peft/integrations/rollback.py), which every load
    # passes through.
    try:
        call()
    except Exception as error:
        chain = [error]
        while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None:
            chain.append(cause)
        frames = [frame.filename for link in chain for frame in traceback.extract_tb(link.__traceback__)]
        rein_dir, rollback = os.path.dirname(rein_peft.__file__), rein_peft.integrations.rollback.__file__
        return {"types": [type(link).__name__ for link in chain], "message": str(error),
                "rein_peft_frames": [name for name in frames if name.startswith(rein_dir) and name != rollback]}
    raise AssertionError(f"{call} raised nothing")
"""


def run_client(hub: str, home: Path, script: str, models: bool = True, **args: object) -> dict:
    """Run the prelude(s) + `script` in a fresh Python against the loopback Hub at `hub`, in the folder `home` (its
    cwd, `OUT` and HF cache); `args` arrive as `ARGS`. Returns what the script passed to `report(...)`."""
    home.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {
        "HF_ENDPOINT": hub,
        "HF_TOKEN": "dummy-token",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HOME": str(home / "hf_home"),
        "HF_HUB_CACHE": str(home / "hf_home" / "hub"),
    }
    code = HUB_PRELUDE + (CLIENT_PRELUDE if models else "") + textwrap.dedent(script)
    done = subprocess.run(
        [sys.executable, "-c", code, str(home), json.dumps(args)],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        pytest.fail(f"client script failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-8000:]}")
    reports = [line.removeprefix("RESULT ") for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(reports) == 1, done.stdout
    return json.loads(reports[0])


def assert_same_adapter(loaded: dict, pushed: dict) -> None:
    assert loaded["weights"].keys() == pushed["weights"].keys()
    for name, tensor in pushed["weights"].items():
        assert torch.equal(loaded["weights"][name], tensor), name
    assert_same_numbers(loaded["logits"], pushed["logits"])


@dataclass(frozen=True)
class Pushed:
    report: dict
    tensors: dict  # adapter_state() of every push: "adapter", "pinned_first", "pinned_second"


@pytest.fixture(scope="module")
def hub() -> Iterator[str]:
    with serve_hub() as url:
        yield url


@pytest.fixture(scope="module")
def pushed(hub: str, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    """Push the tiny base model, then load it back so that its `_name_or_path` is the repo id; push one adapter to
    ADAPTER_REPO, and two versions of another to PINNED_REPO."""
    home = tmp_path_factory.mktemp("pusher")
    script = """
        tiny_base().push_to_hub(BASE_REPO)
        from transformers import BitImageProcessor  # for pipelines, which load the processor from the base repo

        processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor.push_to_hub(BASE_REPO)
        model = get_peft_model(hub_base(), rein_peft.ReinConfig(token_length=6, modules_to_save=["classifier"]))
        randomize(model, seed=1)
        model.push_to_hub(ADAPTER_REPO)
        tensors = {"adapter": adapter_state(model)}

        first = model.push_to_hub(PINNED_REPO)
        first_info_sha = api.model_info(PINNED_REPO).sha
        tensors["pinned_first"] = adapter_state(model)
        randomize(model, seed=2)
        second = model.push_to_hub(PINNED_REPO)
        tensors["pinned_second"] = adapter_state(model)
        torch.save(tensors, os.path.join(OUT, "pushed.pt"))

        report(
            files=api.list_repo_files(ADAPTER_REPO),
            card=ModelCard.load(ADAPTER_REPO).content,
            adapter_config=json.load(open(hf_hub_download(ADAPTER_REPO, "adapter_config.json"))),
            first_sha=first.oid,
            first_info_sha=first_info_sha,
            second_sha=second.oid,
            latest_info_sha=api.model_info(PINNED_REPO).sha,
            files_at_first=api.list_repo_files(PINNED_REPO, revision=first.oid),
        )
    """
    result = run_client(hub, home, script)
    return Pushed(result, torch.load(home / "pushed.pt"))


def test_push_to_hub_uploads_adapter_and_model_card(pushed: Pushed):
    files = pushed.report["files"]
    assert sorted(files) == [".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"]

    adapter_config = pushed.report["adapter_config"]
    assert adapter_config["peft_type"] == "REIN"
    assert adapter_config["token_length"] == 6
    assert adapter_config["base_model_name_or_path"] == BASE_REPO

    # Rein's card (tests/test_model_card.py has its contents): PEFT's metadata, and a snippet that loads this repo
    card = ModelCard(pushed.report["card"])
    snippet = _card_snippet(pushed)
    facts = {
        "library_name": card.data.library_name,
        "base_model": card.data.base_model,
        "tagged rein": "rein" in (card.data.tags or []),
        "snippet starts with `import rein_peft`": snippet.startswith("import rein_peft"),
        "snippet loads the pushed repo": f"PeftModel.from_pretrained(base, {ADAPTER_REPO!r})" in snippet,
    }
    expected = {
        "library_name": "peft",
        "base_model": BASE_REPO,
        "tagged rein": True,
        "snippet starts with `import rein_peft`": True,
        "snippet loads the pushed repo": True,
    }
    assert facts == expected, f"the pushed README.md starts:\n{card.content[:400]}"


def _card_snippet(pushed: Pushed) -> str:
    text = ModelCard(pushed.report["card"]).text
    return text.split("```python\n", 1)[1].split("```", 1)[0] if "```python\n" in text else ""


def test_pushed_card_snippet_runs_as_written(pushed: Pushed, hub: str, tmp_path: Path):
    script = _card_snippet(pushed) + textwrap.dedent(
        """
        torch.save(adapter_state(model), os.path.join(OUT, "loaded.pt"))
        report(labels=model.config.num_labels)
        """
    )
    assert run_client(hub, tmp_path, script) == {"labels": 3}
    assert_same_adapter(torch.load(tmp_path / "loaded.pt"), pushed.tensors["adapter"])


def test_from_pretrained_in_a_fresh_process_is_bit_identical(pushed: Pushed, hub: str, tmp_path: Path):
    script = """
        model = PeftModel.from_pretrained(hub_base(), ADAPTER_REPO)
        state = adapter_state(model)
        with model.disable_adapter(), torch.no_grad():
            state["base_logits"] = model(pixel_values=PIXELS).logits
        torch.save(state, os.path.join(OUT, "loaded.pt"))
        config = model.peft_config["default"]
        report(config_type=type(config).__name__, token_length=config.token_length, training=model.training)
    """
    result = run_client(hub, tmp_path, script)
    assert result == {"config_type": "ReinConfig", "token_length": 6, "training": False}
    loaded = torch.load(tmp_path / "loaded.pt")
    assert_same_adapter(loaded, pushed.tensors["adapter"])
    assert not torch.allclose(loaded["logits"], loaded["base_logits"], atol=1e-3)  # the adapter does something


def test_revision_pins_an_earlier_push(pushed: Pushed, hub: str, tmp_path: Path):
    first_sha, second_sha = pushed.report["first_sha"], pushed.report["second_sha"]
    assert len(first_sha) == len(second_sha) == 40 and first_sha != second_sha
    assert pushed.report["first_info_sha"] == first_sha
    assert pushed.report["latest_info_sha"] == second_sha
    assert "adapter_model.safetensors" in pushed.report["files_at_first"]

    script = """
        pinned = PeftModel.from_pretrained(hub_base(), PINNED_REPO, revision=ARGS["first_sha"])
        latest = PeftModel.from_pretrained(hub_base(), PINNED_REPO)
        torch.save({"pinned": adapter_state(pinned), "latest": adapter_state(latest)}, os.path.join(OUT, "loaded.pt"))
        report()
    """
    run_client(hub, tmp_path, script, first_sha=first_sha)
    loaded = torch.load(tmp_path / "loaded.pt")
    first, second = pushed.tensors["pinned_first"], pushed.tensors["pinned_second"]
    assert not torch.equal(first["logits"], second["logits"])
    assert_same_adapter(loaded["pinned"], first)
    assert_same_adapter(loaded["latest"], second)


def test_transformers_api_pipeline_and_auto_peft_model_load_from_the_hub(pushed: Pushed, hub: str, tmp_path: Path):
    """transformers' `load_adapter`, the auto class, the pipeline and `AutoPeftModel`, each given the adapter's repo
    id, reproduce `PeftModel.from_pretrained`."""
    script = """
        import numpy as np
        from peft import AutoPeftModel
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

        def logits(model, pixels=PIXELS):
            with torch.no_grad():
                return model(pixel_values=pixels).logits

        def error(a, b):  # relative to the largest logit
            return ((a - b).abs().max() / b.abs().max()).item()

        reference = PeftModel.from_pretrained(hub_base(), ADAPTER_REPO)
        loaded = hub_base()
        loaded.load_adapter(ADAPTER_REPO, adapter_name="from_hub")
        auto = AutoModelForImageClassification.from_pretrained(ADAPTER_REPO).eval()
        auto_peft = AutoPeftModel.from_pretrained(ADAPTER_REPO).eval()

        images = [Image.fromarray(np.full((40, 40, 3), 40 * index, dtype=np.uint8)) for index in range(3)]
        processed = AutoImageProcessor.from_pretrained(BASE_REPO)(images=images, return_tensors="pt")["pixel_values"]
        probabilities = logits(reference, processed).softmax(-1)
        predicted = pipeline("image-classification", model=ADAPTER_REPO, top_k=3)(images)
        pipeline_error = max(
            abs(prediction["score"] - probabilities[image, reference.config.label2id[prediction["label"]]].item())
            for image, predictions in enumerate(predicted)
            for prediction in predictions
        )
        report(
            load_adapter=error(logits(loaded), logits(reference)),
            auto_model=error(logits(auto), logits(reference)),
            auto_peft_model=error(logits(auto_peft), logits(reference)),
            pipeline=pipeline_error,
            pipeline_top=[predictions[0]["label"] for predictions in predicted],
            reference_top=[reference.config.id2label[index] for index in probabilities.argmax(-1).tolist()],
        )
    """
    result = run_client(hub, tmp_path, script)
    assert result.pop("pipeline_top") == result.pop("reference_top")
    assert all(error <= FLOAT32_RTOL for error in result.values()), result


def test_missing_repo_revision_or_weights_give_clear_errors(hub: str, tmp_path: Path):
    script = """
        rein_peft.ReinConfig(token_length=6).save_pretrained(os.path.join(OUT, "config_only"))
        api.create_repo("tester/config-only")
        api.upload_file(
            path_or_fileobj=os.path.join(OUT, "config_only", "adapter_config.json"),
            path_in_repo="adapter_config.json",
            repo_id="tester/config-only",
        )
        report(
            config_only_files=api.list_repo_files("tester/config-only"),
            hub_missing_repo=error_of(lambda: hf_hub_download("tester/no-such-repo", "adapter_config.json")),
            missing_repo=error_of(lambda: PeftModel.from_pretrained(tiny_base(), "tester/no-such-repo")),
            missing_revision=error_of(
                lambda: PeftModel.from_pretrained(tiny_base(), "tester/config-only", revision="no-such-branch")
            ),
            missing_weights=error_of(lambda: PeftModel.from_pretrained(tiny_base(), "tester/config-only")),
        )
    """
    result = run_client(hub, tmp_path, script)
    assert sorted(result["config_only_files"]) == [".gitattributes", "adapter_config.json"]

    assert result["hub_missing_repo"]["types"][0] == "RepositoryNotFoundError"
    assert "Repository Not Found" in result["hub_missing_repo"]["message"]

    # PEFT wraps the Hub's error in a ValueError that names the repo and the file it looked for.
    missing_repo = result["missing_repo"]
    assert missing_repo["types"][:2] == ["ValueError", "RepositoryNotFoundError"]
    assert missing_repo["message"] == "Can't find 'adapter_config.json' at 'tester/no-such-repo'"

    missing_revision = result["missing_revision"]
    assert missing_revision["types"][:2] == ["ValueError", "RevisionNotFoundError"]
    assert "tester/config-only" in missing_revision["message"]

    missing_weights = result["missing_weights"]
    assert missing_weights["types"][:2] == ["ValueError", "RemoteEntryNotFoundError"]
    assert "adapter_model.safetensors" in missing_weights["message"]
    assert "tester/config-only" in missing_weights["message"]

    for case in ("hub_missing_repo", "missing_repo", "missing_revision", "missing_weights"):
        assert result[case]["rein_peft_frames"] == [], f"{case}: the error comes from inside rein_peft"


def test_hub_server_speaks_what_the_client_needs(hub: str, tmp_path: Path):
    """The loopback Hub itself, through plain huggingface_hub calls (no torch, so this one is quick)."""
    script = """
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete, snapshot_download
        from huggingface_hub.errors import RevisionNotFoundError

        repo = "tester/server-check"
        api.create_repo(repo)
        files = [CommitOperationAdd("a/b.txt", b"b1"), CommitOperationAdd("x.txt", b"x1")]
        one = api.create_commit(repo, files, commit_message="one")
        files = [CommitOperationAdd("x.txt", b"x2"), CommitOperationDelete("a/")]
        two = api.create_commit(repo, files, commit_message="two")
        unchanged = api.upload_file(path_or_fileobj=b"x2", path_in_repo="x.txt", repo_id=repo)  # makes no commit
        snapshot = snapshot_download(repo, revision=one.oid)
        try:
            api.model_info(repo, revision="dev")
            missing_revision = None
        except RevisionNotFoundError as error:
            missing_revision = type(error).__name__
        result = dict(
            user=api.whoami()["name"],
            shas=[one.oid, two.oid, unchanged.oid, api.model_info(repo).sha],
            tree=[entry.path for entry in api.list_repo_tree(repo, revision=one.oid)],
            tree_recursive=[entry.path for entry in api.list_repo_tree(repo, revision=one.oid, recursive=True)],
            paths_info=[entry.path for entry in api.get_paths_info(repo, ["x.txt", "a", "nope"], revision=one.oid)],
            files_now=api.list_repo_files(repo),
            x_then_now=[open(hf_hub_download(repo, "x.txt", revision=rev)).read() for rev in (one.oid, "main")],
            snapshot=sorted(os.path.relpath(os.path.join(folder, name), snapshot)
                            for folder, _, names in os.walk(snapshot) for name in names),
            exists=[api.file_exists(repo, "a/b.txt", revision=one.oid), api.file_exists(repo, "a/b.txt")],
            missing_revision=missing_revision,
        )
        api.delete_repo(repo)
        report(**result, exists_after_delete=api.repo_exists(repo))
    """
    result = run_client(hub, tmp_path, script, models=False)
    one, two, unchanged, latest = result.pop("shas")
    assert len({one, two}) == 2 and all(len(sha) == 40 for sha in (one, two))
    assert unchanged == latest == two
    assert result == {
        "user": "tester",
        "tree": [".gitattributes", "a", "x.txt"],
        "tree_recursive": [".gitattributes", "a", "a/b.txt", "x.txt"],
        "paths_info": ["x.txt", "a"],
        "files_now": [".gitattributes", "x.txt"],
        "x_then_now": ["x1", "x2"],
        "snapshot": [".gitattributes", os.path.join("a", "b.txt"), "x.txt"],
        "exists": [True, False],
        "missing_revision": "RevisionNotFoundError",
        "exists_after_delete": False,
    }


def test_the_main_job_pushes_its_adapter(hub: str, tmp_path: Path):
    """examples/train_image_classification.py --push_to_hub uploads the trained adapter, which loads back (its
    `main` on those flags, in the client process: what `python <script> <flags>` runs)."""
    examples = Path(__file__).resolve().parent.parent / "examples"
    script = f"""
        sys.path.insert(0, {str(examples)!r})
        from train_image_classification import main
        flags = ["--max_train_samples", "64", "--max_eval_samples", "32", "--max_steps", "2", "--skip_baseline"]
        flags += ["--output_dir", os.path.join(OUT, "run"), "--push_to_hub", "--hub_model_id", "tester/rein-example"]
        main(flags)
        weights = safetensors.torch.load_file(hf_hub_download("tester/rein-example", "adapter_model.safetensors"))
        local = safetensors.torch.load_file(os.path.join(OUT, "run", "adapter", "adapter_model.safetensors"))
        report(
            files=sorted(api.list_repo_files("tester/rein-example")),
            same=sorted(weights) == sorted(local) and all(torch.equal(weights[k], local[k]) for k in local),
        )
    """
    result = run_client(hub, tmp_path, "import safetensors.torch\n" + textwrap.dedent(script))
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(result["files"])
    assert result["same"]
