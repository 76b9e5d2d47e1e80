"""The package's import structure: no cycles (imports inside functions included), the engine never imports
the loop, the loop's modules import without jax, every deferred import says why, no module over 800 lines."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "seal_jax"
MAX_LINES = 800
# Loop modules that need jax at import: the MiniLM sentence encoder is a JAX model.
LOOP_NEEDS_JAX = {"seal_jax.selfedit.embeddings"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The seal_jax module ``name`` names (a module, or the package a name is taken from)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path) -> list[tuple[str, ast.stmt]]:
    """Every seal_jax module imported anywhere in ``path`` (module level, functions, TYPE_CHECKING blocks)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(resolve(a.name), node) for a in node.names if a.name.split(".")[0] == "seal_jax"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "seal_jax":
            for a in node.names:  # ``from seal_jax.selfedit import grading`` imports the module grading
                full = f"{node.module}.{a.name}"
                out.append((full if full in MODULES else resolve(node.module), node))
    return [(m, n) for m, n in out if m is not None]


def graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in imports_of(path)} - {name} for name, path in MODULES.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, …, a]``, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from seal_jax.selfedit import grading\n    import seal_jax.lm.api\n")
    assert [m for m, _ in imports_of(module)] == ["seal_jax.selfedit.grading", "seal_jax.lm.api"]


def test_no_two_modules_import_each_other():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_engine_never_imports_the_loop():
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("seal_jax.lm"):
            assert not [t for t in targets if t.startswith("seal_jax.selfedit")], name


def test_every_import_inside_a_function_says_why_it_is_deferred():
    """An import inside a function (or method) needs a ``# deferred: …`` comment on its line or the line
    above, naming the heavy or optional dependency it keeps out of the module's import."""
    missing = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    here = lines[node.lineno - 2:node.end_lineno]  # the line above through the statement's end
                    if not any("deferred" in line.partition("#")[2] for line in here):
                        missing.append(f"{name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not missing, "imports inside functions without a '# deferred: why' comment:\n" + "\n".join(missing)


def test_no_module_is_longer_than_800_lines():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


LOOP = sorted(n for n in MODULES if n.startswith("seal_jax.selfedit.") and n not in LOOP_NEEDS_JAX)


@pytest.mark.parametrize("name", [*LOOP, "seal_jax", "seal_jax.lm.types", "seal_jax.report"])
def test_loop_modules_import_without_jax(name):
    """In a fresh interpreter: reading configs, parsing model output, grading, results and reports never
    import jax (the engine loads when a run loads a model)."""
    code = f"import sys, {name}; print('jax' in sys.modules, sorted(m for m in sys.modules if m.startswith('jax'))[:5])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("False"), f"importing {name} imports jax: {out.stdout}"


def test_the_engine_facade_still_loads_on_first_use():
    code = ("import sys, seal_jax as sj; before = 'jax' in sys.modules; lm_class = sj.LM; "
            "print(before, 'jax' in sys.modules, lm_class.__module__, sj.load.__module__, sj.Adapters.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True", "seal_jax.lm.api", "seal_jax.lm.api", "seal_jax.lm.lora"]
    # the engine's modules too, as the README's ahead-of-time example reaches them (sj.lm.sharding.make_mesh)
    code = ("import seal_jax as sj; print(sj.lm.sharding.make_mesh.__module__, sj.lm.layouts.__name__)\n"
            "try:\n    sj.lm.no_such_module\nexcept AttributeError as e:\n    print('refused:', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["seal_jax.lm.sharding seal_jax.lm.layouts",
                                       "refused: module 'seal_jax.lm' has no attribute 'no_such_module'"]
