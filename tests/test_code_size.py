"""Functions in dlm/ stay short, and so do their positional parameter lists (the developer guide:
functions under about 80 lines; parameters that travel together become an options object, and the
rest keyword-only). Reads the source with ast; runs nothing.

What is measured, for every function and method, nested ones included:
- lines: from the `def` line to its last line, docstring and comments included (decorators not);
- positional parameters: positional-only and ordinary ones, `self` and `cls` included. They are
  positional, and counting them keeps the rule what the `def` line shows: a method with eight
  parameters after `self` has nine. Keyword-only ones (after `*`) and *args / **kwargs are free.
A dataclass's generated __init__ counts too: `self` and each field that __init__ takes by position
(not under kw_only=True, not after `_: KW_ONLY`, not field(init=False) or field(kw_only=True)).
Fields a dataclass inherits are not counted: no dataclass in dlm/ inherits another's.

ALLOWED names the functions still over while another branch fixes them; the second test fails as
soon as one is no longer over (or gone), so the list only shrinks.
"""

import ast
from pathlib import Path

from tests.conftest import ROOT

MAX_LINES = 80
MAX_POSITIONAL = 8

ALLOWED = {
}


def _decorator_name(node: ast.expr) -> str:
    target = node.func if isinstance(node, ast.Call) else node
    return target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")


def _is_keyword_only_call(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and any(
        k.arg == "kw_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)


def _dataclass_positional(node: ast.ClassDef) -> int | None:
    """self + the fields a @dataclass's __init__ takes by position; None for any other class."""
    decorators = [d for d in node.decorator_list if _decorator_name(d) == "dataclass"]
    if not decorators:
        return None
    if _is_keyword_only_call(decorators[0]):
        return 0
    count = 1  # self
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        annotation = ast.unparse(statement.annotation)
        if "KW_ONLY" in annotation:
            break
        if "ClassVar" in annotation:
            continue
        value = statement.value
        if (isinstance(value, ast.Call) and _decorator_name(value) == "field"
                and (_is_keyword_only_call(value) or any(
                    k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False
                    for k in value.keywords))):
            continue
        count += 1
    return count


def measure(source: str) -> dict[str, tuple[int, int]]:
    """{qualified name: (lines, positional parameters)} for every function, method and dataclass
    __init__ in `source`."""
    found: dict[str, tuple[int, int]] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                found[name] = (child.end_lineno - child.lineno + 1, len(child.args.posonlyargs) + len(child.args.args))
                visit(child, name + ".<locals>.")
            elif isinstance(child, ast.ClassDef):
                positional = _dataclass_positional(child)
                if positional is not None:
                    found[f"{prefix}{child.name}.__init__"] = (0, positional)
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def over_the_limits(lines: int, positional: int) -> list[str]:
    return ([f"{lines} lines (at most {MAX_LINES})"] if lines > MAX_LINES else []) + (
        [f"{positional} positional parameters (at most {MAX_POSITIONAL})"] if positional > MAX_POSITIONAL else [])


def package_measures() -> dict[str, tuple[int, int]]:
    measures = {}
    for path in sorted((ROOT / "dlm").rglob("*.py")):
        relative = Path(path).relative_to(ROOT).as_posix()
        for name, sizes in measure(path.read_text(encoding="utf-8")).items():
            measures[f"{relative}::{name}"] = sizes
    return measures


def test_the_measure_counts_lines_positionals_and_dataclass_fields():
    body = "\n".join(f"    x{i} = {i}" for i in range(79))
    source = f'''
from dataclasses import KW_ONLY, dataclass, field


def at_the_limit(a):
{body}


def one_over(a):
{body}
    return a


def keywords_are_free(a, b, c, d, e, f, g, h, *args, i, j, k, **kwargs):
    def inner(p, q):
        return p
    return inner


def nine(a, b, c, d, e, /, f, g, h, i):
    pass


class Holder:
    def eight_with_self(self, a, b, c, d, e, f, g):
        pass

    @classmethod
    def nine_with_cls(cls, a, b, c, d, e, f, g, h):
        pass


@dataclass
class Plain:
    a: int
    b: int
    c: int = field(init=False)
    d: int = field(default=0, kw_only=True)
    _: KW_ONLY
    e: int = 0


@dataclass(kw_only=True)
class Keywords:
    a: int
    b: int


class NotADataclass:
    a: int
'''
    measured = measure(source)
    assert measured["at_the_limit"] == (80, 1) and not over_the_limits(*measured["at_the_limit"])
    assert measured["one_over"] == (81, 1) and over_the_limits(*measured["one_over"]) == ["81 lines (at most 80)"]
    assert measured["keywords_are_free"][1] == 8 and measured["keywords_are_free.<locals>.inner"] == (2, 2)
    assert measured["nine"][1] == 9 and over_the_limits(*measured["nine"]) == ["9 positional parameters (at most 8)"]
    assert measured["Holder.eight_with_self"][1] == 8 and measured["Holder.nine_with_cls"][1] == 9
    assert measured["Plain.__init__"] == (0, 3)  # self, a, b
    assert measured["Keywords.__init__"] == (0, 0)
    assert "NotADataclass.__init__" not in measured


def test_no_function_in_dlm_is_too_long_or_takes_too_many_positionals():
    measures = package_measures()
    assert "dlm/cli.py::build_parser" in measures and "dlm/runs/state.py::TrainState.__init__" in measures
    found = {name: over_the_limits(*sizes) for name, sizes in measures.items() if name not in ALLOWED}
    too_big = {name: reasons for name, reasons in found.items() if reasons}
    assert not too_big, "split these into named steps, or pass options that travel together as one object " \
                        "and the rest after `*`:\n" + "\n".join(f"  {name}: {', '.join(reasons)}"
                                                              for name, reasons in sorted(too_big.items()))


def test_every_allowed_function_is_still_over_the_limits():
    """Remove an entry from ALLOWED once its function is fixed (or renamed: then measure the new one)."""
    measures = package_measures()
    done = sorted(name for name in ALLOWED if name not in measures or not over_the_limits(*measures[name]))
    assert not done, "within the limits now (or gone): remove from ALLOWED in tests/test_code_size.py: " + ", ".join(done)
