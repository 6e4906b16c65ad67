"""The import-linter contracts of pyproject.toml: kept by the code as it is, broken (and named)
by an import that runs the wrong way, even one inside a function."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT_IMPORTS, "--no-cache"], capture_output=True, text=True, cwd=tree, timeout=120,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(tree)})


def copy_of_the_code(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for package in ("training", "gpu_profile"):
        shutil.copytree(REPO / package, tree / package, ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(REPO / "pyproject.toml", tree)
    return tree


def test_the_code_keeps_every_contract(tmp_path):
    result = lint_imports(copy_of_the_code(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_inside_a_function_breaks_the_layers_and_is_named(tmp_path):
    tree = copy_of_the_code(tmp_path)
    plan = tree / "training" / "plan.py"
    plan.write_text(plan.read_text() + "\n\ndef _uses_the_trainer():\n"
                    "    from training.trainer import main\n\n    return main\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "training.plan -> training.trainer" in result.stdout, result.stdout


def test_a_new_module_without_a_layer_breaks_the_contract(tmp_path):
    tree = copy_of_the_code(tmp_path)
    (tree / "training" / "unplaced.py").write_text('"""A module no layer names."""\n')
    result = lint_imports(tree)
    assert result.returncode != 0 and "training.unplaced" in result.stdout, result.stdout


def test_gpu_profile_importing_training_breaks_its_contract(tmp_path):
    tree = copy_of_the_code(tmp_path)
    sampler = tree / "gpu_profile" / "sampler.py"
    sampler.write_text(sampler.read_text() + "\nimport training.paths\n")
    result = lint_imports(tree)
    assert result.returncode != 0 and "gpu_profile.sampler -> training.paths" in result.stdout, result.stdout
