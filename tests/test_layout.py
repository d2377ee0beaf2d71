"""The package's layers depend one way: floor → engine → pruning/evaluation → TRL integration → applications.

Every ``seft_trl`` import of every module, function-level ones included, is read from the source
and checked against the module's layer, so an upward import fails here before it tangles anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import seft_trl

PACKAGE = Path(seft_trl.__file__).parent

# The first dotted component under seft_trl decides the layer.
LAYERS = {
    "patterns": 0, "criteria": 0, "config": 0, "targets": 0, "kernels": 0, "numba_kernels": 0, "numba_topology": 0,
    "triton_kernels": 0, "saving": 0, "text": 0, "sharding": 0, "allocator": 0, "parent": 0, "locations": 0, "memory": 0,
    "topology": 1, "window": 1, "layer": 1, "optim_state": 1, "engine": 1, "report": 1, "distillation": 1,
    "pruning": 2, "evaluation": 2,
    "trainer": 3,
    "apps": 4, "prune": 4, "testing": 4,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the seft_trl modules ``path`` imports."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    return imports_in(path.read_text(), package)


def imports_in(source: str, package: str) -> set[str]:
    """The seft_trl modules that ``source``, a module of ``package``, imports (relative ones resolved)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t == "seft_trl" or t.startswith("seft_trl.")}
    return found


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def library_modules() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "__init__.py"]


def test_every_module_has_a_layer():
    unplaced = {module_name(p) for p in library_modules() if layer_of(module_name(p)) is None}
    assert not unplaced, f"give these modules a layer in LAYERS: {sorted(unplaced)}"


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for path in library_modules():
        name = module_name(path)
        for imported in imported_modules(path):
            target = layer_of(imported)
            if target is not None and target > layer_of(name):
                upward.append(f"{name} (layer {layer_of(name)}) imports {imported} (layer {target})")
    assert not upward, "\n".join(upward)


def test_test_support_is_a_leaf():
    users = [module_name(p) for p in library_modules() if any(m.startswith("seft_trl.testing") for m in imported_modules(p))]
    assert not users, f"library modules import the test support: {users}"


def test_the_check_resolves_relative_and_function_level_imports():
    source = "from ..trainer import SEFTSFTTrainer\nfrom . import masks\ndef f():\n    from ...x import y\n    import seft_trl.apps.demo\n"
    found = imports_in(source, "seft_trl.pruning")
    assert {"seft_trl.trainer", "seft_trl.pruning.masks", "seft_trl.apps.demo"} <= found
    assert layer_of("seft_trl.trainer") > layer_of("seft_trl.pruning.api")
