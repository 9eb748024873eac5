"""Layering of the package: what each module may import, and that importing has no side effects.

Rules (STYLE.md, "Layers below tasks below learning"):

- ``diffto.layers`` imports neither ``diffto.tasks`` nor Lightning;
- ``diffto.tasks`` does not import ``diffto.learning`` (nor the CLI);
- ``diffto.problem`` and ``diffto.costs``, the floor, import no layer, task or learner;
- no import cycles between diffto modules, function-level imports included;
- importing any module leaves ``os.environ`` unchanged, and works whichever module comes first.

Two checks. A static one reads every source file (imports inside functions included,
``if TYPE_CHECKING:`` blocks excluded) and builds the module graph. A dynamic one imports each
module first in a process of its own and records what it pulled in: one interpreter imports the
third-party libraries once, then forks a child per module, so each child starts without any
diffto module loaded at the cost of a fork rather than of a fresh ``import torch``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest

_PACKAGES = ("diffto", "diffto.layers", "diffto.tasks", "diffto.lightning_configs")
_LIGHTNING = ("lightning", "lightning_fabric", "pytorch_lightning")


def _is_under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@cache
def source_modules() -> dict[str, Path]:
    """Every diffto module name -> its source file, found by walking the package folders."""
    out: dict[str, Path] = {}
    for package in _PACKAGES:
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations, package
        root = Path(next(iter(spec.submodule_search_locations)))
        for folder, dirs, files in os.walk(root):  # symlinked folders are not followed
            rel = Path(folder).relative_to(root)
            dirs[:] = [d for d in dirs if (Path(folder) / d / "__init__.py").is_file()]
            parts = [package, *rel.parts] if rel.parts else [package]
            if ".".join(parts) in _PACKAGES and ".".join(parts) != package:
                dirs[:] = []
                continue  # a mapped package seen through a link: walked on its own
            for file in files:
                if file.endswith(".py") and file != "__main__.py":
                    stem = file[:-3]
                    name = ".".join(parts if stem == "__init__" else [*parts, stem])
                    out[name] = Path(folder) / file
    return out


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(module: str, path: Path) -> set[str]:
    """Absolute names a module imports anywhere in its body, ``TYPE_CHECKING`` blocks left out.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a diffto module, and
    ``pkg`` itself only for names defined there: Python imports a submodule through a package
    that is still initializing without running it again, so that is no cycle.
    """
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{a.name}" for a in node.names} & source_modules().keys()
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined in the package itself
                found.add(target)
        stack.extend(ast.iter_child_nodes(node))
    return found


@cache
def import_graph() -> dict[str, set[str]]:
    return {name: _imports(name, path) for name, path in source_modules().items()}


def _forbidden(module: str) -> tuple[str, ...]:
    """Module-name prefixes ``module`` must not import (directly or through other modules)."""
    if _is_under(module, ("diffto.layers",)):
        return ("diffto.tasks", "diffto.learning", "diffto.data", "diffto.cli", *_LIGHTNING)
    if _is_under(module, ("diffto.tasks",)):
        return ("diffto.learning", "diffto.cli")
    if module in ("diffto.problem", "diffto.costs"):
        return ("diffto.layers", "diffto.tasks", "diffto.learning", "diffto.data", "diffto.cli",
                *_LIGHTNING)
    return ()


def test_the_walk_finds_the_package():
    names = source_modules()
    for expected in ("diffto", "diffto.problem", "diffto.layers.lqr", "diffto.tasks.registry",
                     "diffto.tasks.go2.env", "diffto.learning.ppo", "diffto.cli"):
        assert expected in names, expected
    assert not any(".layers.layers" in n or "diffto.diffto" in n for n in names)


def test_no_module_imports_across_the_layers():
    """Every import statement, function-level ones included, respects the layer order."""
    bad = []
    for module, imported in sorted(import_graph().items()):
        for name in sorted(imported):
            if _is_under(name, _forbidden(module)):
                bad.append(f"{module} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    """No cycle among diffto modules in the static graph (function-level imports included).

    A package importing its own submodules to re-export them is not a cycle by itself; a
    cycle is a path back to the start through imports of modules (Tarjan's SCCs).
    """
    graph = import_graph()
    modules = set(graph)
    edges = {m: sorted(n for n in graph[m] if n in modules and n != m) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the ~100 modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


# ----------------------------------------------------------------------------- dynamic
_CHILD = textwrap.dedent(
    """
    import importlib, json, os, sys, warnings
    warnings.simplefilter("ignore")
    modules, third_party = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for name in third_party:  # paid once; every child inherits them
        try:
            importlib.import_module(name)
        except Exception:
            pass
    try:
        import torch
        torch.set_num_threads(1)
    except Exception:
        pass
    preloaded = set(sys.modules)
    results, running = {}, {}

    def child(order):
        env = dict(os.environ)
        first = order[0]
        out = {"first": first, "error": None}
        try:
            for name in order:
                importlib.import_module(name)
                if name == first:
                    out["loaded"] = sorted(m for m in sys.modules if m not in preloaded)
                    out["env_changed"] = sorted(
                        k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)
                    )
        except BaseException as err:
            out["error"] = f"{type(err).__name__}: {err}"
        return out

    orders = [[m] for m in modules] + [sorted(modules), sorted(modules, reverse=True)]
    workers = int(os.environ.get("LAYERING_WORKERS", "2"))
    pending = list(enumerate(orders))
    while pending or running:
        while pending and len(running) < workers:
            i, order = pending.pop(0)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                with os.fdopen(w, "w") as f:
                    json.dump(child(order), f)
                os._exit(0)
            os.close(w)
            running[pid] = (i, r)
        pid, _ = os.wait()
        i, r = running.pop(pid)
        with os.fdopen(r) as f:
            text = f.read()
        results[i] = json.loads(text) if text else {"first": orders[i][0], "error": "crashed"}
    print(json.dumps([results[i] for i in range(len(orders))]))
    """
)


@cache
def dynamic_results() -> tuple[dict, ...]:
    modules = sorted(source_modules())
    third_party = sorted(
        {
            n.split(".")[0]
            for imported in import_graph().values()
            for n in imported
            if n and not n.startswith("diffto") and n.split(".")[0] not in sys.builtin_module_names
        }
        # mujoco stays out: it is quick to import, and a module that decided MUJOCO_GL by
        # whether mujoco is loaded yet must be seen doing so
        - {"mujoco"}
    )
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}  # as a user's shell would
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(modules), json.dumps(third_party)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the dynamic check forks")
def test_each_module_imported_first_loads_only_its_layers_and_sets_no_environment():
    bad = []
    for result in dynamic_results():
        first = result["first"]
        if result["error"]:
            bad.append(f"{first} (imported first, then the others): {result['error']}")
            continue
        for name in result["loaded"]:
            if _is_under(name, _forbidden(first)):
                bad.append(f"import {first} loads {name}")
        if result["env_changed"]:
            bad.append(f"import {first} changes os.environ {result['env_changed']}")
    assert not bad, "\n".join(bad)
