"""The package's layers (docs/architecture.md): a module imports only from its own layer or
the layers below it, anywhere in the file (inside functions too; `if TYPE_CHECKING:` blocks
aside), and no modules import each other in a cycle."""

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import smoltrain

ROOT = Path(smoltrain.__file__).parent
LAYERS = [  # lowest first; a module's layer is that of its longest matching prefix
    ("errors", "atomic", "perf", "device"),
    ("model",),
    ("formats",),
    ("generate",),
    ("tokenizer",),
    ("data",),
    ("evaluation",),
    ("train",),
    ("cli", "cli_args", "app", "__main__", ""),
]


def layer_of(module: str) -> int:
    name = module.removeprefix("smoltrain").removeprefix(".")
    first = name.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if first in names)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The smoltrain modules `path` imports, outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("smoltrain")}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").startswith("smoltrain")
        ):
            if node.module == "smoltrain":  # from smoltrain import x: the module x
                found |= {f"smoltrain.{a.name}" for a in node.names}
            else:
                found.add(node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(ROOT.rglob("*.py"))}


def test_every_import_goes_down_the_layers():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    try:
        TopologicalSorter({m: {t for t in ts if t in graph} for m, ts in graph.items()}).prepare()
    except CycleError as e:
        raise AssertionError(f"modules import each other in a cycle: {' -> '.join(e.args[1])}") from None


def test_the_layer_test_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from smoltrain.train.config import TrainConfig\n"
        "def f():\n    from smoltrain.cli import main\n    from smoltrain import generate\n"
    )
    assert imports(path) == {"smoltrain.cli", "smoltrain.generate"}
    assert layer_of("smoltrain.cli") > layer_of("smoltrain.train.setup") > layer_of("smoltrain.model.kernels")


def test_the_house_stays_walkable():
    """STYLE.md's limits: no module over 500 lines, no function over 100, a README of <= 150."""
    too_long = []
    for path in sorted(ROOT.rglob("*.py")):
        source = path.read_text()
        if (lines := len(source.splitlines())) > 500:
            too_long.append(f"{module_name(path)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if (length := node.end_lineno - node.lineno + 1) > 100:
                    too_long.append(f"{module_name(path)}.{node.name}: {length} lines")
    readme = ROOT.parents[1] / "README.md"
    if readme.exists() and (lines := len(readme.read_text().splitlines())) > 150:
        too_long.append(f"README.md: {lines} lines")
    assert not too_long, "\n".join(too_long)
