"""The layout's import direction (docs/architecture.md), read from the source of every module of the package:

- each adapter (`rein_peft.tuners.<method>`) imports nothing of rein_peft outside its own package but what the
  tuners share (`rein_peft.tuners.tuners_utils`, which imports nothing of rein_peft);
- the integrations (`rein_peft.integrations`) build on the adapters and the shared helpers, never on the official
  system;
- the shared helpers (`rein_peft.utils`) import no other part;
- the official system (`rein_peft.official`) builds on all of them and is imported by none;
- no module imports the top-level package (its facade) but for `__version__`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rein_peft"
TOP = "rein_peft"
# what every tuner may import besides itself
TUNERS_SHARED = "tuners:tuners_utils"
# part -> the parts it may import besides itself
ALLOWED = {
    "tuners": set(),
    "utils": set(),
    "integrations": {"tuners", "utils"},
    "official": {"tuners", "integrations", "utils"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[str, list[str]]]:
    """Every `import x` / `from x import a, b` of the file (at any depth), relative ones resolved: (module, names)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((module, [alias.name for alias in node.names]))
    return found


def part(module: str) -> str | None:
    """The part of the layout a module of the package belongs to: "tuners:<method>" for an adapter, "integrations",
    "official", "utils", "top" for the facade and the command modules beside it; None outside the package."""
    parts = module.split(".")
    if parts[0] != TOP:
        return None
    if len(parts) >= 3 and parts[1] == "tuners":
        return f"tuners:{parts[2]}"
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "top"


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_layout_has_its_three_parts_and_the_helpers():
    parts = {part(module_name(path)) for path in MODULES}
    assert parts >= {"tuners:rein", "tuners:soma", TUNERS_SHARED, "integrations", "official", "utils", "top"}


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_imports_go_only_in_the_allowed_direction(path):
    importer = part(module_name(path))
    if importer == "top":
        return  # the facade and the commands may import anything
    for module, names in imported_modules(path):
        target = part(module)
        if target is None or target == importer:
            continue
        if target == TUNERS_SHARED and importer.startswith("tuners:") and importer != TUNERS_SHARED:
            continue
        if target == "top":
            assert module == TOP and names == ["__version__"], f"{module_name(path)} imports the facade: {module}"
            continue
        kind = importer.partition(":")[0]
        assert target.partition(":")[0] in ALLOWED[kind], (
            f"{module_name(path)} ({importer}) imports {module} ({target}); {kind} may import only "
            f"{sorted(ALLOWED[kind]) or 'itself'} (docs/architecture.md)"
        )


def test_the_direction_check_sees_relative_imports():
    # a relative import two levels up from an adapter module resolves to another part, and would be refused
    model = PACKAGE / "tuners" / "rein" / "model.py"
    assert all(part(module) in (None, "tuners:rein") for module, _ in imported_modules(model))
    assert ("rein_peft.tuners.rein.config", ["ReinConfig"]) in [
        (module, [name for name in names if name == "ReinConfig"]) for module, names in imported_modules(model)
    ]
    segmenter = PACKAGE / "official" / "segmenter.py"
    assert "rein_peft.utils.compat" in {module for module, _ in imported_modules(segmenter)}
