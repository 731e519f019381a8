"""Docs are tests: every ```python block of README.md and docs/*.md runs as written, page by page in one namespace
(each page in a fresh working folder), with the Hub ids and the sizes below swapped for tiny local stand-ins.

A block that cannot run here is marked in the page source by an HTML comment on the line before it that gives the
reason, `<!-- docs-test: skip (needs the Hub dataset "beans") -->`. A marked block still runs and must raise: once
it runs, the mark is no longer needed and the test fails. Every script or module a ```bash block runs
(`python -m rein_peft...`, `examples/...`, `benchmarks/...`) answers `--help`.
"""

from __future__ import annotations

import json
import re
import runpy
import shutil
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import SIZES, tiny_dinov2, tiny_mask2former_config
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import CONFIG_NAME
from test_convert import mmseg_checkpoint, official_state_dict
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss
from transformers.utils import import_utils

from rein_peft import ReinConfig, ReinPeftType, ReinStateDictError

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARK = re.compile(r"<!-- docs-test: skip \((?P<reason>.+)\) -->")
FENCE = re.compile(r"^```(?P<language>\w*)\s*$")


def _dinov2_backbone() -> tf.Dinov2Model:
    # no labels of its own: transformers' default, 2, as in facebook/dinov2-small's config
    return tiny_dinov2(classifier=False, num_labels=2)


def _dinov2_large() -> tf.Dinov2Model:
    # DINOv2-L's depth (the pages name its layers 8, 12, 16, 24) and patch 14, at conftest's width
    return tiny_dinov2(classifier=False, num_hidden_layers=24, patch_size=14, image_size=56)


def _convnext_imagenet() -> tf.ConvNextForImageClassification:
    # an ImageNet head of 1000 labels, which a 19-class head replaces
    config = tf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32, num_labels=1000)
    return tf.ConvNextForImageClassification(config).eval()


# what the pages load from the Hub -> the tiny model of the same class saved in its place
HUB_MODELS: dict[str, Callable[[], tf.PreTrainedModel]] = {
    "facebook/dinov2-small": _dinov2_backbone,
    "facebook/dinov2-giant": _dinov2_backbone,
    "facebook/dinov2-large": _dinov2_large,
    "facebook/convnext-large-224": _convnext_imagenet,
}
# adapters the pages load from a user's Hub repo -> a tiny Rein adapter over "facebook/dinov2-small" (10 labels)
HUB_ADAPTERS = ("<you>/<other-adapter>", "<you>/<name>")
# files the pages read -> a stand-in of the same kind
OFFICIAL_CHECKPOINT = "iter_40000.pth"  # an official Rein checkpoint: 100 tokens of rank 16 per layer of DINOv2-L's 24


def _write_official_checkpoint(path: Path) -> None:
    config = _dinov2_large().config
    sizes = (config.num_hidden_layers, 100, config.hidden_size, 16)
    torch.save(mmseg_checkpoint(official_state_dict(low_rank=True, linked=False, sizes=sizes)), path)


FILES: dict[str, Callable[[Path], None]] = {OFFICIAL_CHECKPOINT: _write_official_checkpoint}
# sizes the pages use that would make a block slow here -> the same call at a tiny size
SIZES_IN_PAGES = {
    "hidden_sizes=[192, 384, 768, 1536], depths=[3, 3, 27, 3]": "hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 2, 1]",
    "3, 224, 224)": "3, 32, 32)",  # images
    "3, 512, 512)": "3, 64, 64)",
    "image_size=512": "image_size=64",
}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    source: str
    skip_reason: str | None


def blocks_of(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        end = next(end for end in range(index + 1, len(lines)) if lines[end].startswith("```"))
        mark = SKIP_MARK.search(lines[index - 1]) if index > 0 else None
        source = "\n".join(lines[index + 1 : end]) + "\n"
        blocks.append(Block(page, index + 1, fence["language"], source, mark["reason"] if mark else None))
        index = end + 1
    return blocks


def _python_pages() -> list[Path]:
    return [page for page in PAGES if any(block.language == "python" for block in blocks_of(page))]


@pytest.fixture(scope="session")
def substitutes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each Hub id of the pages -> a folder holding its tiny stand-in (with an image processor); each file -> its
    stand-in."""
    root = tmp_path_factory.mktemp("docs_models")
    processor = tf.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folders = {}
    for hub_id, build in HUB_MODELS.items():
        folder = root / hub_id.replace("/", "--")
        build().save_pretrained(folder)
        processor.save_pretrained(folder)
        folders[hub_id] = str(folder)
    adapter = root / "rein-adapter"
    base = tf.Dinov2ForImageClassification.from_pretrained(folders["facebook/dinov2-small"], num_labels=10)
    get_peft_model(base, ReinConfig(token_length=4, lora_dim=2, modules_to_save=["classifier"])).save_pretrained(
        adapter
    )
    folders.update(dict.fromkeys(HUB_ADAPTERS, str(adapter)))
    for name, write in FILES.items():
        write(root / name)
        folders[name] = str(root / name)
    return folders


def substituted(source: str, substitutes: dict[str, str]) -> str:
    for hub_id, folder in substitutes.items():
        source = source.replace(f'"{hub_id}"', repr(folder))
    for size, tiny in SIZES_IN_PAGES.items():
        source = source.replace(size, tiny)
    return source


@pytest.mark.parametrize("page", _python_pages(), ids=lambda page: page.relative_to(ROOT).as_posix())
def test_python_blocks_run_as_written(
    page: Path, substitutes: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in (block for block in blocks_of(page) if block.language == "python"):
        where = f"{page.relative_to(ROOT)}:{block.line}"
        code = compile(substituted(block.source, substitutes), where, "exec")
        try:
            exec(code, namespace)
        except Exception:
            if block.skip_reason is None:
                pytest.fail(f"{where} fails as written:\n{traceback.format_exc()}")
        else:
            if block.skip_reason is not None:
                pytest.fail(f"{where} runs now: remove its mark '{block.skip_reason}'")


# a command line of a ```bash block that runs one of the project's scripts or modules
COMMAND = re.compile(r"python -m (?P<module>rein_peft[\w.]*)|(?P<script>(?:examples|benchmarks)/[\w/]+\.py)")


def documented_commands() -> list[str]:
    commands = set()
    for page in PAGES:
        for block in (block for block in blocks_of(page) if block.language == "bash"):
            for match in COMMAND.finditer(block.source):
                commands.add(f"-m {match['module']}" if match["module"] else match["script"])
    return sorted(commands)


def test_the_documented_commands_include_the_examples_and_the_conversion_command():
    assert {"examples/train_image_classification.py", "-m rein_peft.resize_backbone"} <= set(documented_commands())


@pytest.mark.parametrize("command", documented_commands())
def test_every_documented_command_answers_help(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    # run in this process, as `python <command> --help` runs it, so that torch and transformers are imported once
    if command.startswith("-m "):
        module = command.removeprefix("-m ")
        monkeypatch.setattr(sys, "argv", [module, "--help"])

        def run() -> object:
            return runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script = ROOT / command
        monkeypatch.setattr(sys, "argv", [str(script), "--help"])
        monkeypatch.syspath_prepend(str(script.parent))  # as python puts the script's folder first

        def run() -> object:
            return runpy.run_path(str(script), run_name="__main__")

    with pytest.raises(SystemExit) as exit_status:
        run()
    output = capsys.readouterr().out
    assert exit_status.value.code in (0, None), output
    assert output.startswith("usage:"), output


TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
# DINOv2-S's width, so that the head's shapes in the messages are those of the page ([10, 768]: CLS + mean patch)
SMALL_WIDTH = {"hidden_size": 384, "num_hidden_layers": 1, "num_attention_heads": 6, "intermediate_size": 64}


@pytest.fixture(scope="module")
def ten_label_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A DINOv2-S-wide backbone with no labels of its own, and a Rein adapter whose head has 10 labels."""
    root = tmp_path_factory.mktemp("troubleshooting")
    tiny_dinov2(classifier=False, num_labels=2, **SMALL_WIDTH).save_pretrained(root / "base")
    model = tf.Dinov2ForImageClassification.from_pretrained(root / "base", num_labels=10)
    config = ReinConfig(token_length=2, lora_dim=1, modules_to_save=["classifier"])
    get_peft_model(model, config).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def _message(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _rein_not_imported(folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    # the state of PEFT's tables without `import rein_peft`
    for table in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
        monkeypatch.delitem(table, ReinPeftType.REIN)
    with pytest.raises(KeyError) as error:
        PeftModel.from_pretrained(tf.Dinov2ForImageClassification.from_pretrained(folders[0]), folders[1])
    return _message(error.value)


def _scipy_missing(folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    _, message = import_utils.BACKENDS_MAPPING["scipy"]
    monkeypatch.setitem(import_utils.BACKENDS_MAPPING, "scipy", (lambda: False, message))
    config = tiny_mask2former_config(tf.Dinov2Config(**SIZES, out_features=["stage1"]), num_queries=4)
    with pytest.raises(ImportError) as error:
        Mask2FormerLoss(config, weight_dict={})
    return str(error.value)


def _head_mismatch_said_by_rein_peft(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> str:
    with pytest.raises(ReinStateDictError) as error:
        PeftModel.from_pretrained(tf.Dinov2ForImageClassification.from_pretrained(folders[0]), folders[1])
    return f"{ReinStateDictError.__module__}.{_message(error.value)}"


def _adapter_without_labels(folders: tuple[Path, Path], tmp_path: Path) -> Path:
    # as saved before adapters recorded their labels
    shutil.copytree(folders[1], tmp_path / "adapter")
    config_file = tmp_path / "adapter" / CONFIG_NAME
    config = json.loads(config_file.read_text())
    del config["id2label"]
    config_file.write_text(json.dumps(config))
    return tmp_path / "adapter"


def _head_mismatch_through_peft(folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    with pytest.raises(RuntimeError) as error:
        base = tf.Dinov2ForImageClassification.from_pretrained(folders[0])
        PeftModel.from_pretrained(base, _adapter_without_labels(folders, tmp_path))
    return _message(error.value)


def _head_mismatch_through_transformers(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> str:
    with pytest.raises(RuntimeError) as error:
        base = tf.Dinov2ForImageClassification.from_pretrained(folders[0])
        base.load_adapter(_adapter_without_labels(folders, tmp_path))
    return _message(error.value)


def _kernels_missing(folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str | None:
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    try:  # transformers 5.25 uses Hub kernels by default, and needs the kernels package for them
        tf.Dinov2Model.from_pretrained(folders[0])
    except ValueError as error:
        return _message(error)
    return None


def _peft_too_old_for_transformers(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> str | None:
    try:  # transformers 5.24 and later ask for PEFT >= 0.22 in their own adapter API
        tf.Dinov2Model.from_pretrained(folders[0]).add_adapter(ReinConfig(token_length=2))
    except ValueError as error:
        return _message(error)
    return None


ERRORS = {
    "KeyError: 'REIN'": _rein_not_imported,
    "scipy missing": _scipy_missing,
    "head of another label count, rein_peft": _head_mismatch_said_by_rein_peft,
    "head of another label count, PEFT": _head_mismatch_through_peft,
    "head of another label count, transformers": _head_mismatch_through_transformers,
    "Kernels are not available": _kernels_missing,
    "PEFT >= 0.22": _peft_too_old_for_transformers,
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_troubleshooting_quotes_the_errors_word_for_word(
    name: str, ten_label_adapter: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    message = ERRORS[name](ten_label_adapter, monkeypatch, tmp_path)
    if message is None:
        pytest.skip(f"transformers {tf.__version__} with these packages does not produce this error")
    quoted = {line.strip() for line in TROUBLESHOOTING.read_text(encoding="utf-8").splitlines()}
    missing = [line.strip() for line in message.splitlines() if line.strip() and line.strip() not in quoted]
    assert not missing, f"docs/troubleshooting.md does not quote these lines of the error as printed: {missing}"
