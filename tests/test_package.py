"""The package's face: public names stay what they are after any submodule is imported."""

import ast
import importlib
import pkgutil
import types
from pathlib import Path

import lorafit


def test_public_names_are_not_replaced_by_submodules_of_the_same_name():
    public = {name: getattr(lorafit, name) for name in lorafit.__all__}
    for info in pkgutil.walk_packages(lorafit.__path__, "lorafit."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name, value in public.items():
        assert getattr(lorafit, name) is value, f"lorafit.{name} was replaced by {getattr(lorafit, name)!r}"
        assert not isinstance(value, types.ModuleType), name
    for name in set(lorafit.lora.__all__) - {
        "merge_adapter"
    }:  # lorafit.merge_adapter: the API's (writes files)
        assert getattr(lorafit.lora, name) is public[name], f"lorafit.lora.{name} was replaced"
    assert callable(lorafit.generate) and callable(lorafit.evaluate) and callable(lorafit.load)
    submodules = {m.name for m in pkgutil.iter_modules(lorafit.__path__)}
    assert not submodules & set(lorafit.__all__), "a submodule shares its name with a public function"


# ----------------------------------------------------------------------------- the import graph

PACKAGE = Path(lorafit.__file__).parent

# Entry points: lorafit's own modules are imported inside their functions so `import lorafit` and
# `lorafit --help` stay cheap.
LAZY_MODULES = {"lorafit.api", "lorafit.cli", "lorafit.demo"}

# Other in-function imports of lorafit modules, each with why it is not at the top. "can move to the top":
# no cycle holds it there; it is in a file being reworked elsewhere: move it, then delete the entry.
# In-function imports of lorafit modules outside the entry points (api, cli, demo), each with its reason.
# None are left: every cycle they dodged is gone (the TYPE_CHECKING imports of packing and checkpoint
# are not imports at run time). A new one must be listed here with the reason it cannot be at the top.
IN_FUNCTION_IMPORTS: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, here: str, modules) -> set[str]:
    """The lorafit modules an import statement in module `here` loads (by name; a package's
    submodule named in `from package import name` counts as that submodule)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    base = node.module or ""
    if node.level:  # relative: from .layers import X
        package = here if modules[here].name == "__init__.py" else here.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    out = set()
    for a in node.names:
        if f"{base}.{a.name}" in modules:
            out.add(f"{base}.{a.name}")
        elif base in modules:
            out.add(base)
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(here: str, modules) -> tuple[set[str], set[str]]:
    """(top-level, in-function) lorafit imports of module `here`. Top level: run when the module is
    imported (also inside a top-level if/try), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(modules[here].read_text())
    top, inner = set(), set()

    def walk(node, nested):
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (inner if nested else top).update(_targets(child, here, modules) - {here})
            walk(child, nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(tree, False)
    return top, inner


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk (each as the path that closes it)."""
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                found.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_the_cycle_finder_finds_a_cycle_and_skips_type_checking_imports(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    (tmp_path / "m.py").write_text(
        "from typing import TYPE_CHECKING\nfrom lorafit import errors\nif TYPE_CHECKING:\n"
        "    from lorafit.data import X\ndef f():\n    from lorafit import quant\n"
    )
    modules = {
        "lorafit.m": tmp_path / "m.py",
        "lorafit.errors": None,
        "lorafit.data": None,
        "lorafit.quant": None,
    }
    assert _imports("lorafit.m", modules) == ({"lorafit.errors"}, {"lorafit.quant"})


def test_lorafit_modules_import_each_other_without_cycles():
    modules = _modules()
    graph = {m: _imports(m, modules)[0] for m in modules}
    assert graph["lorafit.model"] >= {"lorafit.quant", "lorafit.precision"}  # the walk sees real imports
    assert _cycles(graph) == [], "top-level imports among lorafit's modules form a cycle"


def test_in_function_imports_of_lorafit_modules_are_entry_points_or_listed_with_a_reason():
    modules = _modules()
    unlisted = sorted(
        (m, target)
        for m in modules
        if m not in LAZY_MODULES
        for target in _imports(m, modules)[1]
        if (m, target) not in IN_FUNCTION_IMPORTS
    )
    assert unlisted == [], (
        "import these at the top of the module, or (when that would make a cycle) list them in "
        "IN_FUNCTION_IMPORTS with the reason"
    )
