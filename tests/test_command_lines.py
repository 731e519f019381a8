"""Every command line answers `--help`: each example and benchmark with a `main`, each `python -m rein_peft.<x>`
module. Run in-process as `python <script> --help` runs them (`runpy`, `__main__`, the real argument parser)."""

from __future__ import annotations

import pkgutil
import runpy
import sys
from pathlib import Path

import pytest

import rein_peft

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(
    path.relative_to(REPO).as_posix()
    for folder in ("examples", "benchmarks")
    for path in (REPO / folder).glob("*.py")
    if "def main(" in path.read_text()
)
# every module of the package, subpackages included, that runs as `python -m rein_peft.<dotted name>`
def _source(module: pkgutil.ModuleInfo) -> str:
    return Path(module.module_finder.path, f"{module.name.rpartition('.')[2]}.py").read_text()


MODULES = sorted(
    module.name.removeprefix("rein_peft.")
    for module in pkgutil.walk_packages(rein_peft.__path__, "rein_peft.")
    if not module.ispkg and 'if __name__ == "__main__":' in _source(module)
)


def _help(monkeypatch, capsys, argv0: str, run) -> str:
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    with pytest.raises(SystemExit) as stop:
        run()
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_the_command_lines_are_found():
    assert {"examples/train_image_classification.py", "benchmarks/memory.py"} <= set(SCRIPTS)
    assert {"resize_backbone", "convert_dinov2"} <= set(MODULES)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(monkeypatch, capsys, script):
    monkeypatch.syspath_prepend(str(REPO / Path(script).parent))  # as `python <script>` puts its folder first
    path = str(REPO / script)
    text = _help(monkeypatch, capsys, path, lambda: runpy.run_path(path, run_name="__main__"))
    assert text.startswith("usage: ") and "--help" in text


@pytest.mark.parametrize("module", MODULES)
def test_every_module_answers_help_with_its_python_m_form(monkeypatch, capsys, module):
    name = f"rein_peft.{module}"
    text = _help(monkeypatch, capsys, name, lambda: runpy.run_module(name, run_name="__main__", alter_sys=True))
    assert text.startswith(f"usage: python -m {name} ")


def test_resize_backbone_help_says_which_values_are_defaults(monkeypatch, capsys):
    from rein_peft import resize_backbone

    text = " ".join(_help(monkeypatch, capsys, "resize_backbone", resize_backbone.main).split())
    assert "new patch size (the official one) (default: 16)" in text
    assert "image side of the new position grid (default: 512)" in text
