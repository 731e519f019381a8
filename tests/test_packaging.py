"""Packaging: the wheel carries the Apache-2.0 LICENSE, the `py.typed` marker, project URLs and classifiers; the
source distribution carries every file the README links to (where the README is shown alone, it says so)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import rein_peft

REPO = Path(__file__).resolve().parent.parent
README_LINK = re.compile(r"\]\((?!https?://|#)([^)#\s]+)")


def _run(command: list[str], **kwargs) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The wheel and the sdist built from this checkout by pyproject.toml's own backend (setuptools>=77, installed
    apart, as a build front end installs it into its isolated environment)."""
    folder = tmp_path_factory.mktemp("dist")
    backend = folder / "backend"
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(backend), "setuptools>=77"])
    build = f"from setuptools import build_meta as m; m.build_wheel({str(folder)!r}); m.build_sdist({str(folder)!r})"
    _run([sys.executable, "-c", build], cwd=REPO, env={**os.environ, "PYTHONPATH": str(backend)})
    return folder


def test_wheel_ships_license_type_marker_urls_and_classifiers(built):
    (wheel,) = built.glob("rein_peft-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = f"rein_peft-{rein_peft.__version__}.dist-info"
        assert "rein_peft/py.typed" in names
        assert archive.read(f"{dist_info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
        metadata = Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
    assert (REPO / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "Paper, https://arxiv.org/abs/2312.04265" in metadata.get_all("Project-URL")
    classifiers = metadata.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and "Programming Language :: Python :: 3.11" in classifiers


def test_every_file_the_readme_links_to_exists_and_ships_in_the_sdist(built):
    links = sorted(set(README_LINK.findall((REPO / "README.md").read_text())))
    assert "docs/training.md" in links
    missing = [link for link in links if not (REPO / link).is_file()]
    assert missing == []
    (sdist,) = built.glob("rein_peft-*.tar.gz")
    with tarfile.open(sdist) as archive:
        shipped = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert [link for link in links if link not in shipped] == []
    assert "LICENSE" in shipped
