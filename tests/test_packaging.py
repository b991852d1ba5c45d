"""The flat layout's packaging rules and the import rules of DESIGN.md."""

import ast
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("train", "parallel", "memory", "models", "data", "kernels", "recipes", "eval", "bench")


def test_packages_list_equals_folders_with_init():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"longctx"} | {
        "longctx." + ".".join(p.parent.relative_to(REPO).parts)
        for p in REPO.rglob("__init__.py")
        if p.parent != REPO and not {".venv", ".ci-venv", "build", "tests"} & set(p.parent.relative_to(REPO).parts)
    }
    assert listed == found


def test_layout_rules():
    assert not (REPO / "conftest.py").exists() and not (REPO / "tests" / "__init__.py").exists()
    root_init = ast.parse((REPO / "__init__.py").read_text())
    imported = {n.names[0].name for n in ast.walk(root_init) if isinstance(n, ast.Import)}
    imported |= {n.module for n in ast.walk(root_init) if isinstance(n, ast.ImportFrom)}
    assert "torch" not in imported


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = path.relative_to(REPO).parent.parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(("longctx", *base, *(node.module.split(".") if node.module else [])))
                names.add(module)
                names |= {f"{module}.{a.name}" for a in node.names}
            else:
                names.add(node.module)
    return names


def _files(sub: str):
    return sorted((REPO / sub).rglob("*.py"))


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_import_rules(sub):
    forbidden = {
        "models": {"torch.distributed", "longctx.parallel", "longctx.memory", "longctx.train", "longctx.data"},
        "kernels": {"torch.distributed", "longctx.parallel", "longctx.memory", "longctx.models", "longctx.train"},
        "parallel": {"longctx.memory", "longctx.models", "longctx.train"},
        "memory": {"longctx.parallel", "longctx.models", "longctx.train"},
        "data": {f"longctx.{o}" for o in SUBPACKAGES if o != "data"},
        "recipes": {"longctx.train", "longctx.models", "longctx.parallel"},
        # evaluation gets a forward function and a tokenizer: it never builds a model or reads a recipe
        "eval": {"longctx.train", "longctx.recipes", "longctx.models", "longctx.parallel", "longctx.memory",
                 "longctx.data"},
    }.get(sub, set())
    for path in _files(sub):
        for name in _imports(path):
            for bad in forbidden:
                assert not (name == bad.rstrip(".") or name.startswith(bad.rstrip(".") + ".")), f"{path}: {name}"


def test_only_cli_and_build_read_the_recipe():
    allowed = {REPO / "cli.py", REPO / "train" / "build.py", REPO / "train" / "trainer.py", REPO / "train" / "data_report.py",
               REPO / "train" / "evaluation.py", REPO / "train" / "elimination_fit.py"}
    for path in REPO.rglob("*.py"):
        parts = set(path.relative_to(REPO).parts)
        if {".venv", ".ci-venv", "tests", "build", "bench"} & parts or path.parent == REPO / "recipes":  # bench: programs, like cli
            continue
        if any(n.startswith("longctx.recipes") for n in _imports(path)):
            assert path in allowed, path
