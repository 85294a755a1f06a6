"""The package's layers, read from its imports: each import points down or sideways, never up, and no
two modules import each other, through any path. Lazy imports inside functions count too."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "aelab"
# Bottom to top. A module may import its own layer's modules and those of the layers below it.
LAYERS = [
    ("base", ["aelab.registry", "aelab.console", "aelab.runs", "aelab.keys"]),
    ("parts", ["aelab.models", "aelab.losses", "aelab.regularizers", "aelab.corruptions", "aelab.data",
               "aelab.optim", "aelab.devices", "aelab.samplers", "aelab.schedules"]),
    ("build", ["aelab.build"]),
    ("training", ["aelab.training"]),
    ("analysis", ["aelab.analysis"]),
    ("sweeps", ["aelab.sweeps"]),
    ("cli", ["aelab.cli", "aelab.__main__"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    for number, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return number
    if module == "aelab":
        return 0
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def imports(module: str, top_level_only: bool = False) -> set[str]:
    """The modules `module` imports: aelab's own (resolved) and third-party top-level names."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:  # `from . import console` names a module
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source)
    return found


def own(names: set[str]) -> set[str]:
    return {n for n in names if n == "aelab" or n.startswith("aelab.")} - {"aelab.configs"}


def test_every_module_is_in_a_layer():
    for module in MODULES:
        if not module.startswith("aelab.configs"):
            layer(module)


@pytest.mark.parametrize("module", [m for m in MODULES if not m.startswith("aelab.configs")])
def test_no_import_points_up_a_layer(module):
    for target in own(imports(module)):
        assert layer(target) <= layer(module), (
            f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]}), a layer above it")


def test_no_import_circles():
    graph = {m: own(imports(m)) & set(MODULES) - {m} for m in MODULES}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circle = path[path.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_sweep_report_imports_no_torch():
    """aelab report reads run dirs: importing it (and what it imports at module level) loads no torch."""
    seen, todo = set(), [m for m in MODULES if m.startswith("aelab.sweeps")]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        names = imports(module, top_level_only=True)
        assert not {n for n in names if n.split(".")[0] == "torch"}, f"{module} imports torch"
        todo += [n for n in own(names) if n in MODULES]
