"""The house rules: commands at the package root, nothing imports a command, library imports point down the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "kdir"
COMMANDS = {
    "run",
    "evaluate",
    "evaluate_teacher",
    "train_teacher",
    "audit",
    "score",
    "mine",
    "encode",
    "expand",
    "generate_queries",
    "store",
    "report",
}
# bottom up: a module may import its own layer and the layers below it (TYPE_CHECKING-only imports included)
LAYERS = [
    {"kdir.errors", "kdir.utils.io", "kdir.utils.report"},
    {"kdir.data"},
    {"kdir.stores"},
    {"kdir.models"},
    {"kdir.losses"},
    {"kdir.retrieval"},
    {"kdir.training"},
    {"kdir.utils.config", "kdir.utils.settings", "kdir.utils.task", "kdir.utils"},
    {f"kdir.{c}" for c in COMMANDS} | {"kdir"},
]


def _layer(module: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[1]):
                best = (i, len(name))
    assert best is not None, module
    return best[0]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _kdir_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "kdir":
                continue
            for a in node.names:  # `from kdir import models` imports kdir.models; the version is plain data
                if (node.module, a.name) != ("kdir", "__version__"):
                    out.append((node.lineno, f"{node.module}.{a.name}"))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "kdir"]
    return out


def _resolve(name: str) -> str:
    """The module an imported dotted name lives in (``kdir.models.ColBERT`` -> ``kdir.models``)."""
    parts = name.split(".")
    while parts:
        candidate = ROOT.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    raise AssertionError(name)


def test_the_package_root_holds_only_the_commands():
    modules = {p.stem for p in PKG.glob("*.py")} - {"__init__"}
    assert modules == COMMANDS | {"errors"}
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {"data", "losses", "models", "retrieval", "stores", "training", "utils"}


@pytest.mark.parametrize("folder", ["kdir", "tests", "benchmarks", "experiments"])
def test_nothing_imports_a_command(folder):
    bad = []
    for path in (ROOT / folder).rglob("*.py"):
        for line, name in _kdir_imports(path):
            module = _resolve(name)
            if module in {f"kdir.{c}" for c in COMMANDS} and module != _module_name(path):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not bad, "\n".join(bad)


def test_library_imports_point_down_the_layers():
    bad = []
    for path in PKG.rglob("*.py"):
        me = _module_name(path)
        for line, name in _kdir_imports(path):
            module = _resolve(name)
            if _layer(module) > _layer(me):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {me} imports {module}")
    assert not bad, "\n".join(sorted(set(bad)))
