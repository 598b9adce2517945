"""The package's import structure: no cycles, serving never loads the Ray actors, and the
run-directory layout imports without Ray.

The graph is read from the source with ``ast`` (no module is imported): every ``import`` and
``from ... import`` anywhere in a module, at module level or inside a function (a lazy import is
still a dependency), relative ones resolved; imports under ``if TYPE_CHECKING:`` never run and are
left out. An edge goes to the module that is named: ``from fednano_ray.models import dual`` to
``fednano_ray.models.dual``, ``from fednano_ray.models import NanoEdge`` to the package
``fednano_ray.models`` (its ``__init__``). Parent packages that Python initialises on the way are
not edges, so a package's ``__init__`` importing its own submodules is no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fednano_ray"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


@cache
def imports(module: str) -> tuple[frozenset[str], frozenset[str]]:
    """The package modules ``module`` imports: (all of them, those imported at module level)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    every: set[str] = set()
    eager: set[str] = set()

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if node.level:  # relative: from . import x, from ..y import z
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        # `from pkg import mod` names the module pkg.mod; `from mod import attr`, the module mod.
        return [
            f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names
        ]

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, top)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            for name in targets(node):
                if name.split(".")[0] == "fednano_ray":
                    assert name in MODULES, f"{module} imports {name}: no such module"
                    every.add(name)
                    if top:
                        eager.add(name)
        # Function bodies run later (or never): what they import is lazy. Module-level if/try/with
        # blocks and class bodies run at import time.
        inner = top and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text(), filename=str(path)), True)
    every.discard(module)
    eager.discard(module)
    return frozenset(every), frozenset(eager)


def find_cycle(graph: dict[str, frozenset[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return [*path[path.index(w) :], w]
            if w not in state and (found := dfs(w)):
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := dfs(v)):
            return found
    return None


def closure(starts: set[str], graph: dict[str, frozenset[str]]) -> dict[str, str]:
    """Every module reachable from ``starts``, each with the module that first led to it."""
    seen: dict[str, str] = {}
    todo = list(starts)
    while todo:
        v = todo.pop()
        for w in graph[v]:
            if w not in seen and w not in starts:
                seen[w] = v
                todo.append(w)
    return seen


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _chain(reached: dict[str, str], v: str) -> str:
    chain = [v]
    while chain[-1] in reached:
        chain.append(reached[chain[-1]])
    return " <- ".join(chain)


def test_the_graph_sees_the_imports_it_must():
    """The parser is not vacuous: it finds module-level, lazy and `from pkg import mod` edges."""
    every = {m: imports(m)[0] for m in MODULES}
    eager = {m: imports(m)[1] for m in MODULES}
    assert "fednano_ray.federation.rundir" in eager["fednano_ray.actors.coordinator"]
    assert "fednano_ray.actors.coordinator" in every["fednano_ray.app"]  # lazy, in actor_classes
    assert "fednano_ray.actors.coordinator" not in eager["fednano_ray.app"]
    assert "fednano_ray.serve.ingress" in every["fednano_ray.serve.app"]
    # a package's __init__ importing its submodules
    assert "fednano_ray.strategies.fedavg" in eager["fednano_ray.strategies"]
    assert sum(map(len, every.values())) > 100


def test_no_import_cycle():
    """No cycle among the package's modules, lazy imports included (being lazy only hides one)."""
    graph = {m: imports(m)[0] for m in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_serving_never_imports_the_actors():
    """Nothing under fednano_ray/serve imports fednano_ray.actors, directly (lazy imports
    included) or through what loading the modules it imports loads (their module-level imports
    and parent packages, transitively). A function serve calls may still import more lazily
    (serve.app calls fednano_ray.app.init_ray, whose module imports the actors only inside
    actor_classes): the graph cannot tell which functions run, so that is not followed."""
    serve = {m for m in MODULES if m == "fednano_ray.serve" or m.startswith("fednano_ray.serve.")}
    every = {m: imports(m)[0] for m in MODULES}
    # Loading a module runs its module-level imports and its parent packages' __init__.
    loads = {m: imports(m)[1] | {p for p in _parents(m) if p in MODULES} for m in MODULES}
    # What serve imports, and everything that importing those loads.
    direct = set().union(*(every[m] for m in serve)) - serve
    reached = {m: next(s for s in sorted(serve) if m in every[s]) for m in direct}
    for m, via in closure(direct | serve, loads).items():
        reached.setdefault(m, via)
    actors = sorted(m for m in reached if m.split(".")[:2] == ["fednano_ray", "actors"])
    assert not actors, "serving imports the actors: " + "; ".join(
        _chain(reached, m) for m in actors
    )


def test_the_run_directory_layout_imports_without_ray():
    """fednano_ray.federation (method, rounds, rundir, setup, transport) imports with Ray
    unimportable, and the config resolves its method and strategy."""
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        sys.modules["ray"] = None  # `import ray` (and ray.anything) now raises ImportError
        import fednano_ray.federation
        import fednano_ray.federation.rundir as rundir
        import fednano_ray.federation.method, fednano_ray.federation.rounds  # noqa: E401
        import fednano_ray.federation.setup, fednano_ray.federation.transport  # noqa: E401
        from fednano_ray.config import load_config
        assert load_config("examples/tiny.yaml").method().build_strategy().name == "fednano"
        assert Path(rundir.__file__).resolve().is_relative_to(sys.argv[1]), rundir.__file__
        assert rundir.round_name(3) == "round_0003"
        loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
        assert loaded == ["ray"], loaded  # only the blocker
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
