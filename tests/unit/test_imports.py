"""Every module imports on its own, and no two mars_viz modules import each other (not even inside a function).

A cycle works until someone imports the modules in the other order (or moves a lazy import to the top); then it is
a `partially initialized module` error far from the change that caused it. These checks find it first.
"""

from __future__ import annotations

import ast
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mars_viz

ROOT = Path(mars_viz.__file__).parent


def _modules() -> dict[str, Path]:
    """Dotted name -> source file, for the package, its subpackages and every module in them."""
    out = {"mars_viz": ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix="mars_viz."):
        rel = Path(*info.name.split(".")[1:])
        out[info.name] = ROOT / rel / "__init__.py" if info.ispkg else (ROOT / rel).with_suffix(".py")
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The mars_viz modules `name` imports anywhere in its source (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from . import rule` imports the submodule; `from .state import MarsState` imports .state
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_finds_the_package():
    assert {"mars_viz.core.state", "mars_viz.ui.session", "mars_viz.ui", "mars_viz.ui.app"} <= set(MODULES)


def test_the_import_parser_resolves_relative_and_local_imports():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert "mars_viz.core.selection" in graph["mars_viz.core.state"]  # from .selection import LayerScores
    assert "mars_viz.ui.api" in graph["mars_viz.ui.app"]  # from . import api, ...
    assert "mars_viz.ui.launch" in graph["mars_viz.cli.main"]  # a function-local `from .ui.launch import launch`


def test_no_import_cycles():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    mutual = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph[b]})
    assert not mutual, f"modules that import each other: {mutual}"
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"


CHILD = r"""
import importlib, os, sys, traceback
# The heavy third-party libraries load once; each mars_viz module is then imported by a forked child in which no
# mars_viz module has been imported yet, so each one gets a fresh package and must import on its own.
for lib in ("torch", "transformers", "gradio", "plotly.graph_objects", "numpy", "PIL.Image", "safetensors"):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
assert not any(m == "mars_viz" or m.startswith("mars_viz.") for m in sys.modules)
failed = 0
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            print(f"--- import {name} failed:", file=sys.stderr)
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    failed += status != 0
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_module_imports_on_its_own():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}
    names = sorted(m for m in MODULES if m != "mars_viz.__main__")  # __main__ runs the CLI when imported
    proc = subprocess.run([sys.executable, "-c", CHILD, *names], capture_output=True, text=True, env=env,
                          cwd=ROOT.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


# ---- the layers (README "Use it as a library"; each folder's docstring says the same) -----------------------------
# folder -> the mars_viz folders it may import. Lower layers know nothing of the ones above: the maths runs without a
# model, the model code without MARS, the figures without gradio; `api` is the library's front door, `ui` and `cli`
# sit on top.
LAYERS: dict[str, set[str]] = {
    "paths": set(),
    "core": set(),
    "model": {"paths"},
    "data": {"paths", "model"},
    "steer": {"core", "model", "data"},
    "maps": {"core", "model", "data", "steer"},
    "fit": {"paths", "core", "model", "data", "steer", "maps"},
    "analysis": {"paths", "core", "model", "data", "steer", "maps", "fit"},
    "views": {"core", "data", "steer", "maps", "analysis"},
    "api": {"core", "model", "steer"},
    "ui": {"paths", "core", "model", "data", "steer", "maps", "fit", "analysis", "views", "api"},
    "cli": {"paths", "core", "model", "data", "steer", "maps", "fit", "analysis", "views", "api", "ui"},
}
# third-party modules only some layers may import
ONLY_IN = {"gradio": {"ui", "cli"}, "plotly": {"views", "ui"}}


def _folder(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] not in {"__main__"} else None


def _third_party(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_every_folder_has_a_rule():
    folders = {_folder(m) for m in MODULES} - {None}
    assert folders == set(LAYERS), f"folders without a layer rule (or rules without a folder): {folders ^ set(LAYERS)}"


def test_each_layer_imports_only_the_layers_below_it():
    bad = []
    for name, path in MODULES.items():
        src = _folder(name)
        if src is None:
            continue
        for dep in _imports(name, path):
            dst = _folder(dep)
            if dst is not None and dst != src and dst not in LAYERS[src]:
                bad.append(f"{name} imports {dep} ({src} may import only {sorted(LAYERS[src]) or 'nothing'})")
    assert not bad, "\n".join(bad)


def test_the_rules_check_catches_an_upward_import(tmp_path):
    fake = tmp_path / "geometry.py"
    fake.write_text("from ..ui.app import create_app\n")
    MODULES["mars_viz.core._fake"] = fake
    try:
        deps = _imports("mars_viz.core._fake", fake)
    finally:
        del MODULES["mars_viz.core._fake"]
    assert "mars_viz.ui.app" in deps and _folder("mars_viz.ui.app") not in LAYERS["core"]


def test_gradio_and_plotly_stay_in_the_top_layers():
    bad = [f"{name} imports {lib}" for name, path in MODULES.items()
           for lib, allowed in ONLY_IN.items() if lib in _third_party(path) and _folder(name) not in allowed]
    assert not bad, "\n".join(bad)


def test_the_runtime_never_imports_the_lab_outside_the_graft_command():
    users = sorted(name for name, path in MODULES.items() if "mars_lab" in _third_party(path))
    assert users == ["mars_viz.cli.main"], users


def test_the_maths_holds_no_hooks_and_no_model():
    bad = [name for name, path in MODULES.items() if _folder(name) == "core"
           and re.search(r"register_forward|transformers|nn\.Module", path.read_text())]
    assert not bad, f"core must stay pure maths: {bad}"
