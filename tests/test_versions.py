"""The tested torch / triton range: pyproject declares it, and the Triton kernels refuse a triton outside it
in one line when imported (a new triton release fails here, by name, not at a launch deep in training)."""
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_triton import versions
from gpt2_triton.model.ops import triton_unusable

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version, ok", [("3.6.0", True), ("3.9.0", True), ("3.8.0+git1234", True), ("3.5.1", False),
                                         ("3.10.0", False), ("4.0.0", False), ("main", True)])
def test_triton_range(version, ok):
    problem = versions.problem("triton", version)
    assert (problem is None) == ok
    if not ok:
        assert problem == (f"gpt2_triton: triton {version} is not a tested release (3.6 to 3.9); "
                           "install one, e.g. pip install 'triton>=3.6,<3.10'")


def test_installed_versions_are_tested_and_pyproject_says_the_same_range():
    assert versions.problem("torch") is None and versions.problem("triton") is None
    text = (ROOT / "pyproject.toml").read_text()
    for package, ((lo_major, lo_minor), (hi_major, hi_minor)) in versions.TESTED.items():
        assert f'"{package}>={lo_major}.{lo_minor},<{hi_major}.{hi_minor + 1}"' in text, package


def test_untested_triton_refused_at_import_and_by_the_config_check(monkeypatch):
    code = ("import importlib.metadata as m\n"
            "real = m.version\n"
            "m.version = lambda name: '3.10.0' if name == 'triton' else real(name)\n"
            "import gpt2_triton.kernels.norm\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "ImportError: gpt2_triton: triton 3.10.0 is not a tested release (3.6 to 3.9); "
        "install one, e.g. pip install 'triton>=3.6,<3.10'")
    real = versions.metadata.version
    monkeypatch.setattr(versions.metadata, "version", lambda name: "3.10.0" if name == "triton" else real(name))
    assert "triton 3.10.0 is not a tested release" in triton_unusable("triton", "cuda")
    assert triton_unusable("torch", "cuda") is None  # the torch kernels never import triton
