"""The package layering, enforced: a module of ``lightning_moe`` imports only from its own package and
the packages below it, and no two modules import each other, directly or through others.

Every import counts: at module level, inside functions (lazy imports) and under ``TYPE_CHECKING``.
The order is the README's "Layout" section; there is no list of exceptions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_moe"

LAYERS: list[tuple[str, ...]] = [
    ("_validate", "_warnings", "extras", "optim"),
    ("kernels",),
    ("routing",),
    ("experts",),
    ("balancing",),
    ("dispatch",),
    ("layers",),
    ("parallel",),
    ("integrations",),
    ("discovery",),
    ("models",),
    ("upcycling",),
    ("metrics",),
    ("callbacks",),
    ("data",),
    ("module",),
    ("hf_module",),
    ("report",),
    ("cli",),
    ("bench",),
    ("__init__",),  # the top-level package re-exports the public API
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """``lightning_moe`` modules imported anywhere in ``path`` (``from pkg import submodule`` resolved)."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py", modules)


def imports_in(source: str, here: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name == "lightning_moe" or name.startswith("lightning_moe."))
    return {name for name in found if name != here}


def test_every_package_has_a_layer():
    packages = {top_package(module) for module in all_modules()}
    assert packages <= set(LEVEL), f"add {sorted(packages - set(LEVEL))} to LAYERS (and to the README's Layout)"


def test_no_module_imports_from_a_package_above_its_own():
    modules = all_modules()
    upward = []
    for module, path in sorted(modules.items()):
        level = LEVEL[top_package(module)]
        for imported in sorted(imports_of(path, modules)):
            if LEVEL[top_package(imported)] > level:
                upward.append(f"{module} imports {imported}")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules():
    modules = all_modules()
    graph = {module: {m for m in imports_of(path, modules) if m in modules} for module, path in modules.items()}
    # A package's __init__ re-exports its modules; modules importing their own package's __init__ would
    # make every package a cycle, so edges into a package's own __init__ from inside it are errors too.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("source", ["import lightning_moe.module\n", "from lightning_moe import module\n",
                                    "from lightning_moe.module import MoELanguageModel\n",
                                    "def f():\n    from lightning_moe.module import x\n",
                                    "if TYPE_CHECKING:\n    from ..module import x\n"])
def test_the_check_sees_every_import_form(source):
    """The checker itself: each way of importing a package above is seen (a check that cannot fail
    would prove nothing)."""
    imported = imports_in(source, "lightning_moe.routing.probe", False, all_modules())
    assert "lightning_moe.module" in imported
    assert LEVEL[top_package("lightning_moe.module")] > LEVEL["routing"]
