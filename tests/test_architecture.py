"""Imports flow one way (ui -> services -> encoder; worker -> services, encoder) and encoder needs only
torch, numpy and PIL at module level (optional tools are imported where they are used)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"encoder": set(), "services": {"encoder"}, "worker": {"services", "encoder"}, "ui": {"services"}}
ENCODER_THIRD_PARTY = {"torch", "numpy", "PIL"}
# imported inside the functions that need them: fast inference, training's progress bar, the HED data step
ENCODER_OPTIONAL = {"onnxruntime", "onnx", "tqdm", "h5py"}
QDRANT_OWNERS = {"services"}


def module_imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def package_files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py")) if (REPO / package).is_dir() else []


@pytest.mark.parametrize("package", sorted(p for p in LAYERS if (REPO / p).is_dir()))  # ui/ comes later
def test_imports_flow_one_way(package: str) -> None:
    forbidden = set(LAYERS) - LAYERS[package] - {package}
    for path in package_files(package):
        bad = module_imports(path, top_level_only=False) & forbidden
        assert not bad, (
            f"{path.relative_to(REPO)} imports {sorted(bad)}: {package} may use only {sorted(LAYERS[package])}"
        )


def test_encoder_needs_only_torch_numpy_pil_at_import() -> None:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for path in package_files("encoder"):
        extra = module_imports(path, top_level_only=True) - stdlib - ENCODER_THIRD_PARTY - {"encoder"}
        assert not extra, f"{path.relative_to(REPO)} imports {sorted(extra)} at module level"


def test_encoder_imports_nothing_else_inside_functions() -> None:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    allowed = stdlib | ENCODER_THIRD_PARTY | ENCODER_OPTIONAL | {"encoder"}
    for path in package_files("encoder"):
        extra = module_imports(path, top_level_only=False) - allowed
        assert not extra, f"{path.relative_to(REPO)} imports {sorted(extra)}: not one of the encoder's optional tools"


def test_only_services_talks_to_qdrant() -> None:
    for package in set(LAYERS) - QDRANT_OWNERS:
        for path in package_files(package):
            assert "qdrant_client" not in module_imports(path, top_level_only=False), path


def test_every_module_opens_with_a_docstring() -> None:
    for package in LAYERS:
        for path in package_files(package):
            tree = ast.parse(path.read_text())
            if path.name == "__init__.py" and not tree.body:
                continue
            assert ast.get_docstring(tree), f"{path.relative_to(REPO)} has no module docstring"
