"""Imports go one way: a module imports only from lower layers (``docs/architecture.md`` describes them).

Every import is counted, also those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "swift_callbacks"
LAYERS: dict[str, int] = {
    # 0: the error policy, lazy exports, atomic file writes
    "errors": 0, "lazy": 0, "files": 0,
    # 1: the configuration kernel, bundled assets
    "configuration": 1, "assets": 1, "answers": 1,
    # 2: shared concepts: model loading, trainer construction; the influence engine, sets, studies
    "models": 2, "trainers": 2, "influence": 2, "sets": 2, "studies": 2,
    # 3: generation backends (load models), the influence history (stores engine scores)
    "generation": 3, "store": 3,
    # 4: the callback; reports (read the history); dataset builders (on generation backends)
    "callback": 4, "report": 4, "builders": 4,
    # 5: training recipes (build trainers with the callback); ScaleQuest (builders, trainers)
    "training": 5, "builders.scalequest": 5,
    # 6: post-hoc scoring (replays the training recipe); evaluation (reads a run's recipe and checkpoints)
    "scoring": 6, "evaluation": 6,
    # 7: applications (the demo; the validation study trains recipes, evaluates, reads the report's verdicts)
    "demo": 7, "validation": 7,
    # 8: entry points and the public API
    "cli": 8, "__init__": 8, "__main__": 9,
}  # fmt: skip


def _unit(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "__init__"
    if parts[:2] == ["builders", "scalequest"]:
        return "builders.scalequest"
    return parts[0] if parts[0] in LAYERS else "__init__"  # a name imported from the package itself


def _imports(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    rel = path.relative_to(root.parent).with_suffix("").parts
    package = ".".join(rel[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names] if target == "swift_callbacks" else [target]
            found += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, t) for line, t in found if t.split(".")[0] == "swift_callbacks"]


def test_every_module_has_a_layer():
    units = {_unit(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    assert units <= set(LAYERS), f"place {sorted(units - set(LAYERS))} in LAYERS (and in docs/architecture.md)"


def _violations(root: Path) -> list[str]:
    wrong = []
    for path in sorted(root.rglob("*.py")):
        source = _unit(".".join(path.relative_to(root.parent).with_suffix("").parts))
        for line, target in _imports(path, root):
            to = _unit(target)
            if to != source and LAYERS[to] >= LAYERS[source]:
                wrong.append(f"{path.relative_to(root.parent)}:{line} ({source}, layer {LAYERS[source]}) imports "
                             f"{target} ({to}, layer {LAYERS[to]})")  # fmt: skip
    return wrong


def test_imports_go_down_the_layers():
    wrong = _violations(PACKAGE)
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_checker_sees_a_wrong_way_import_even_inside_a_function(tmp_path):
    fake = tmp_path / "swift_callbacks"
    (fake / "training").mkdir(parents=True)
    (fake / "configuration.py").write_text("def f():\n    from .callback import InfluenceCallback\n")
    (fake / "training" / "data.py").write_text("from ..demo.run import run_demo\nfrom ..models import load_model\n")
    wrong = _violations(fake)
    assert len(wrong) == 2 and "configuration.py:2" in wrong[0] and "training/data.py:1" in wrong[1], wrong


def test_no_private_name_is_imported_from_another_part():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _unit(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        rel = path.relative_to(PACKAGE.parent).with_suffix("").parts
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = list(rel[:-1])[: len(rel) - node.level]
            target = ".".join(base + ([node.module] if node.module else []))
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if private and _unit(target) != source:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {private} from {target}")
    assert not wrong, "private names used across parts (make them public where they live):\n" + "\n".join(wrong)
