"""The Python in README.md and docs/model.md runs as written, in a fresh interpreter as a user has it (no
TRITON_INTERPRET): on a GPU with Triton kernels, on a CPU with torch's."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("doc", ["README.md", "docs/model.md"])
def test_python_snippets_run(doc, tmp_path):
    blocks = python_blocks(ROOT / doc)
    assert blocks, f"{doc} has no python block"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"  # a second thread on a busy 2-core machine waits for the scheduler
    for code in blocks:
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{doc}:\n{code}\n{result.stderr[-3000:]}"
