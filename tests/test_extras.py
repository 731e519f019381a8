"""Code that needs an optional package checks for it before any work and names the extra that installs it. Each test
hides one package in this process (`sys.modules[name] = None`: its import fails as an uninstalled one does) and runs
the real entry point."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import rein_peft
from rein_peft.utils.extras import MissingExtraError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))

SEGMENTATION = 'pip install "rein-peft[segmentation]"'
EXAMPLES = 'pip install "rein-peft[examples]"'
BENCH = 'pip install "rein-peft[bench]"'


@pytest.fixture
def hide(monkeypatch):
    """hide(name): make `import name` fail, as if the package were not installed (undone after the test)."""

    def hide_package(name: str) -> None:
        monkeypatch.setitem(sys.modules, name, None)

    return hide_package


def test_build_official_segmenter_without_scipy_names_the_extra_before_any_work(hide, tmp_path):
    hide("scipy")
    with pytest.raises(MissingExtraError, match=r"needs scipy, which is not installed") as error:
        # a checkpoint folder that does not exist: a check made after loading would raise OSError instead
        rein_peft.build_official_segmenter(tmp_path / "no-such-checkpoint")
    assert SEGMENTATION in str(error.value)


@pytest.mark.parametrize(("package", "shown"), [("datasets", "datasets"), ("PIL", "Pillow")])
def test_load_dg_dataset_without_its_packages_names_the_extra_before_any_work(hide, tmp_path, package, shown):
    hide(package)
    with pytest.raises(MissingExtraError, match=rf"load_dg_dataset needs {shown}, which is not installed") as error:
        rein_peft.load_dg_dataset("cityscapes", str(tmp_path / "no-such-folder"))  # else: FileNotFoundError
    assert EXAMPLES in str(error.value)


def test_reproduce_example_without_scipy_stops_before_writing_its_data_sets(hide, tmp_path, capsys):
    import reproduce_domain_generalization

    hide("scipy")
    with pytest.raises(SystemExit) as stop:
        reproduce_domain_generalization.main(["--output_dir", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert SEGMENTATION in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # no fake data set, no backbone written


@pytest.mark.parametrize("flags", [["--decoder", "mask2former"], ["--official_segmenter"]])
def test_segmentation_example_with_mask2former_without_scipy_stops_first(hide, tmp_path, capsys, flags):
    import train_semantic_segmentation

    hide("scipy")
    with pytest.raises(SystemExit) as stop:
        train_semantic_segmentation.main([*flags, "--output_dir", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert SEGMENTATION in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("benchmark", ["memory", "overhead", "domain_generalization"])
def test_benchmarks_without_matplotlib_stop_before_measuring(hide, tmp_path, monkeypatch, benchmark):
    module = __import__(benchmark)
    hide("matplotlib")
    # overhead's main reads sys.argv; the others take argv
    monkeypatch.setattr(sys, "argv", [benchmark, "--output", str(tmp_path)])
    with pytest.raises(MissingExtraError, match=r"needs matplotlib, which is not installed") as error:
        module.main() if benchmark == "overhead" else module.main(["--quick", "--output", str(tmp_path)])
    assert BENCH in str(error.value)
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written
