"""A plain `pip install .` (a wheel, not editable) carries every data file the code opens."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests.conftest import REPO
from training.dataset import BUNDLED_DATASET_DIR
from training.evaluation import DEFAULT_EVAL_INSTRUCTIONS


def test_the_wheel_holds_every_data_file_the_code_opens(tmp_path):
    # From a copy without build outputs: setuptools would reuse an old build/ folder's files.
    source = shutil.copytree(REPO, tmp_path / "source", ignore=shutil.ignore_patterns(
        ".git", ".venv*", "venv", "build", "*.egg-info", "__pycache__", "models", "outputs", "test-artifacts",
        ".metaflow", ".whl"))
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = wheels.glob("metaflow_dolly-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    opened = [DEFAULT_EVAL_INSTRUCTIONS, *sorted(BUNDLED_DATASET_DIR.glob("*.jsonl"))]
    assert len(opened) >= 3  # the instructions, the sample's train and eval splits
    missing = [str(path.relative_to(REPO)) for path in opened if str(path.relative_to(REPO)) not in names]
    assert missing == [], f"not in {wheel.name}: {missing}"
    assert {"training/trainer.py", "training/model_facts.py", "gpu_profile/decorator.py"} <= names
