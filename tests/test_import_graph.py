"""The modules of dlm/runs import each other without a cycle (resume and train once did, through
TrainState, now in dlm.runs.state). Every import counts: at the top, inside a function, or under
TYPE_CHECKING, since each is an arrow a reader has to follow. Reads the source with ast; runs nothing."""

import ast
import subprocess
import sys

from tests.conftest import ROOT


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path, known: set[str]) -> set[str]:
    """The modules in `known` that the file at `path` imports (`from a.b import c` names a.b, or a.b.c
    when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_graph(package: str) -> dict[str, set[str]]:
    paths = {module_name(p): p for p in (ROOT / package.replace(".", "/")).glob("*.py")}
    return {name: imports(path, set(paths)) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as the list of its modules (the first repeated at the end), else None."""
    state: dict[str, str] = {}  # "open" while on the path being walked, "done" once all it reaches is walked

    def walk(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for following in sorted(graph[node]):
            if state.get(following) == "open":
                return path[path.index(following):] + [following]
            if following not in state:
                cycle = walk(following, path + [following])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = walk(start, [start])
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one_and_only_one_that_is_there():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no cycle


def test_the_runs_modules_import_each_other_without_a_cycle():
    graph = import_graph("dlm.runs")
    assert {"dlm.runs.train", "dlm.runs.resume", "dlm.runs.state"} <= set(graph)
    assert "dlm.runs.resume" in graph["dlm.runs.train"]  # the graph sees the imports that are there
    cycle = find_cycle(graph)
    assert cycle is None, f"dlm/runs modules import each other in a cycle: {' -> '.join(cycle)}"


def test_resume_loads_without_the_training_loop():
    """dlm.runs.resume stands below the loop: importing it does not import dlm.runs.train."""
    code = "import sys, dlm.runs.resume; print('dlm.runs.train' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
