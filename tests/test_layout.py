"""The package's house rules: imports run one way and never in a circle.

Reads every module's *module-level* imports (imports inside functions are the thin delegations
users expect, such as ``GPT.from_pretrained``, and run only when called) and checks
* no import circle among gptcore's modules,
* the layering ``cli -> train | generate -> io -> models -> ops -> _C``: the model layer imports
  nothing above ``ops``; ``ops`` and ``reference`` import no upper layer; ``torch/`` (when it
  exists) is imported by nothing,
* ``import gptcore`` loads each module once.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import gptcore

PKG = pathlib.Path(gptcore.__file__).parent
UPPER = ("gptcore.io", "gptcore.generate", "gptcore.train", "gptcore.cli", "gptcore.eval",
         "gptcore.serve", "gptcore.torch", "gptcore.data")


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_pkg: bool, level: int, name: str) -> str:
    if level == 0:
        return name
    base = module.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _graph():
    """module -> set of gptcore modules it imports at module level."""
    mods = {}
    for path in PKG.rglob("*.py"):
        mods[_module_name(path)] = path
    mods["gptcore._C"] = None  # the extension module (built beside or elsewhere: imports nothing)
    graph = {}
    for mod, path in mods.items():
        if path is None:
            graph[mod] = set()
            continue
        is_pkg = path.name == "__init__.py"
        deps = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level only
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                # `from pkg import sub` imports the submodule (pkg is already loading); `from
                # mod import name` imports mod
                base = _resolve(mod, is_pkg, node.level, node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            for t in targets:
                # the nearest existing module (an imported name may be a function)
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("gptcore"):
                    deps.add(t)
        graph[mod] = deps
    return graph


def test_no_import_circle():
    graph = _graph()
    # a package importing its own submodules is not a circle through them unless they import it
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cyc = stack[stack.index(d):] + [d]
                # parent packages re-exporting children are fine; children importing the parent
                # package's __init__ back is the circle that matters
                if not all(b.startswith(a + ".") for a, b in zip(cyc, cyc[1:])):
                    pytest.fail("import circle: " + " -> ".join(cyc))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("layer", ["gptcore.models", "gptcore.ops", "gptcore.reference",
                                   "gptcore.tensor", "gptcore.optim"])
def test_lower_layers_import_nothing_above_them(layer):
    graph = _graph()
    for mod, deps in graph.items():
        if mod == layer or mod.startswith(layer + "."):
            bad = sorted(d for d in deps if d.startswith(UPPER))
            assert not bad, f"{mod} imports {bad} at module level (it sits below them)"


def test_nothing_imports_the_torch_package():
    graph = _graph()
    for mod, deps in graph.items():
        if not mod.startswith("gptcore.torch"):
            assert not any(d.startswith("gptcore.torch") for d in deps), mod


def test_import_gptcore_loads_each_module_once():
    code = ("import sys, collections\n"
            "seen = collections.Counter()\n"
            "class Spy:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.startswith('gptcore'): seen[name] += 1\n"
            "        return None\n"
            "sys.meta_path.insert(0, Spy())\n"
            "import gptcore\n"
            "twice = [m for m, n in seen.items() if n > 1]\n"
            "assert not twice, twice\n"
            "assert 'torch' not in sys.modules, 'import gptcore imported torch'\n"
            "print(len(seen))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) > 5


def test_every_internal_import_resolves():
    """Imports inside functions run only when called, so a module moved without updating them
    fails late (or, behind an ``except ImportError``, silently). Each must name a module or an
    attribute that exists."""
    import importlib

    bad = []
    for path in PKG.rglob("*.py"):
        mod = _module_name(path)
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or (node.level == 0 and not (
                    node.module or "").startswith("gptcore")):
                continue
            base = _resolve(mod, is_pkg, node.level, node.module or "")
            try:
                target = importlib.import_module(base)
            except ImportError as e:
                bad.append(f"{path.name}:{node.lineno}: {base} ({e})")
                continue
            for alias in node.names:
                if not hasattr(target, alias.name):
                    try:
                        importlib.import_module(f"{base}.{alias.name}")
                    except ImportError:
                        bad.append(f"{path.name}:{node.lineno}: {base}.{alias.name}")
    assert not bad, "imports that do not resolve: " + "; ".join(bad)
