"""What `test_peft_suite.py` needs to run PEFT's own test suite against Rein: PEFT's tests fetched from its source
distribution, and tiny transformers classifiers that PEFT's test methods load by "model id" (a local folder)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import peft
import torch
import transformers as tf
from conftest import IMAGE, LABELS
from conftest import SIZES as TINY_SIZES

# where the downloaded sdist is kept between runs, so that a rerun does not download it again
SDIST_CACHE = Path.home() / ".cache" / "rein_peft"
# the package name under which PEFT's `tests/` folder is imported (a namespace package: PEFT's test modules import
# each other relatively); not `tests`, which would clash with this repository's own test folder
PEFT_TESTS_PACKAGE = "peft_sdist_tests"
# PEFT's test modules that the suite drives
TESTING_COMMON = "testing_common.py"
CUSTOM_MODELS = "test_custom_models.py"
PIP_TIMEOUT_S = 300


def download_peft_sdist(version: str, cache_root: Path = SDIST_CACHE) -> Path:
    """The source distribution of `peft==version`, downloaded with pip into `cache_root/peft-sdist-<version>` unless
    it is already there. Raises `RuntimeError` saying what failed when pip cannot download it."""
    folder = cache_root / f"peft-sdist-{version}"
    found = sorted(folder.glob(f"peft-{version}.tar.gz"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    # pip downloads into a folder of this process's own and the file then moves into place in one step: test
    # processes running side by side (pytest-xdist workers) may download at once, and none reads a half-written file
    staging = Path(tempfile.mkdtemp(dir=folder))
    try:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += [f"peft=={version}", "-d", str(staging)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"`{' '.join(command)}` did not finish in {PIP_TIMEOUT_S} s.") from error
        found = sorted(staging.glob(f"peft-{version}.tar.gz"))
        if result.returncode != 0 or not found:
            raise RuntimeError(
                f"Could not download PEFT {version}'s source distribution, which holds PEFT's test suite: "
                f"`{' '.join(command)}` exited with {result.returncode}.\n{result.stderr[-2000:]}\n"
                "The suite needs the package registry (PyPI); check the network or the pip configuration."
            )
        sdist = folder / found[0].name
        os.replace(found[0], sdist)
        return sdist
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def extract_peft_tests(sdist: Path, destination: Path) -> Path:
    """Extract the sdist's `tests/` folder into `destination/peft_sdist_tests`; the folder to put on `sys.path`."""
    target = destination / PEFT_TESTS_PACKAGE
    with tarfile.open(sdist) as archive:
        members = [member for member in archive.getmembers() if member.isfile()]
        tests = [member for member in members if member.name.split("/")[1:2] == ["tests"]]
        for member in tests:
            member.name = "/".join([PEFT_TESTS_PACKAGE, *member.name.split("/")[2:]])
        archive.extractall(destination, members=tests, filter="data")
    missing = [name for name in (TESTING_COMMON, CUSTOM_MODELS) if not (target / name).is_file()]
    if missing:
        raise RuntimeError(f"{sdist.name} has no tests/{missing[0]}: PEFT's test layout changed, update the suite.")
    return destination


@contextmanager
def diffusers_placeholder() -> Iterator[None]:
    """`testing_common` imports `diffusers.StableDiffusionPipeline` only to recognise Stable Diffusion pipelines in
    the cases that test them. Where diffusers is not installed, a module whose `StableDiffusionPipeline` no object is
    an instance of stands in for it while PEFT's test modules are imported: the cases run here never build a pipeline,
    so every such check is False, as it would be with diffusers installed. It is removed afterwards, so that nothing
    else takes diffusers for installed."""
    if importlib.util.find_spec("diffusers") is not None:
        yield
        return
    placeholder = types.ModuleType("diffusers")
    placeholder.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
    sys.modules["diffusers"] = placeholder
    try:
        yield
    finally:
        del sys.modules["diffusers"]


def import_peft_tests(cache_root: Path, extract_to: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """Download (once) and import PEFT's `testing_common` and `test_custom_models` for the installed PEFT."""
    sdist = download_peft_sdist(peft.__version__, cache_root)
    sys.path.insert(0, str(extract_peft_tests(sdist, extract_to)))
    with diffusers_placeholder():
        testing_common = importlib.import_module(f"{PEFT_TESTS_PACKAGE}.testing_common")
        custom_models = importlib.import_module(f"{PEFT_TESTS_PACKAGE}.test_custom_models")
    return testing_common, custom_models


# --- the tiny models PEFT's test methods load ------------------------------------------------------------------------

BATCH = 4
SIZES = {**TINY_SIZES, "num_labels": LABELS}  # the tests' tiny ViT sizes, as classifiers


class LogitsOutput:
    """Makes a transformers image classifier look like the custom models of PEFT's suite, whose generic test methods
    sum, compare and index a model's output as one tensor and set `model.dtype` after casting a model: the forward
    returns the logits `[B, num_labels]`, and `dtype` may be set to the dtype the model already has."""

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        return super().forward(pixel_values=pixel_values, **kwargs).logits

    @property
    def dtype(self) -> torch.dtype:
        return super().dtype

    @dtype.setter
    def dtype(self, value: torch.dtype) -> None:
        if value != self.dtype:
            raise ValueError(f"The model is in {self.dtype}; cast it with `.to({value})` instead of setting dtype.")


class ViTLogits(LogitsOutput, tf.ViTForImageClassification):
    """A `ViTForImageClassification` that returns its logits (see `LogitsOutput`)."""


class Dinov2Logits(LogitsOutput, tf.Dinov2ForImageClassification):
    """A `Dinov2ForImageClassification` that returns its logits (see `LogitsOutput`)."""


TINY_MODELS = {
    "vit": (ViTLogits, tf.ViTConfig),
    "dinov2": (Dinov2Logits, tf.Dinov2Config),
}


def save_tiny_models(folder: Path) -> dict[str, str]:
    """Save a seeded tiny classifier of each family under `folder`; family -> its folder (its "model id")."""
    model_ids = {}
    for family, (model_class, config_class) in TINY_MODELS.items():
        torch.manual_seed(0)
        model = model_class(config_class(**SIZES))
        model_ids[family] = str(folder / family)
        model.save_pretrained(model_ids[family])
    return model_ids


class TinyClassifiers:
    """Stands where PEFT's testers expect a transformers class: `from_pretrained(model_id, dtype=None)` loads the
    tiny classifier saved in the folder `model_id`, with the same seed each time, as PEFT's custom-model wrapper does
    (the adapters created afterwards are then reproducible too)."""

    @classmethod
    def from_pretrained(cls, model_id: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
        torch.manual_seed(0)
        model_type = tf.AutoConfig.from_pretrained(model_id).model_type
        model_class = TINY_MODELS[model_type][0]
        return model_class.from_pretrained(model_id, dtype=dtype or torch.float32)


def tiny_inputs() -> dict[str, torch.Tensor]:
    """The batch every case runs on: seeded images `[4, 3, 32, 32]`."""
    generator = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=generator)}
