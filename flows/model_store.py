"""Where a run's trained model lives.

The train step asks the store for a directory to train into, then publishes it; ``publish``
returns the ``model_location`` users load from. Today the store is a local directory
(``models/<flow>/<run id>`` under the working directory, or the config's ``model_root``); an S3
store keeps the same two methods and uploads in ``publish``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class LocalModelStore:
    root: Path

    def workdir(self, flow_name: str, run_id: str) -> Path:
        """The directory the trainer writes the model, checkpoints and logs into."""
        path = (self.root / flow_name / str(run_id)).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, workdir: Path) -> str:
        """The location of the published model; local: the directory itself."""
        if not (workdir / "config.json").is_file():
            raise FileNotFoundError(f"No model was saved in {workdir} (config.json missing).")
        return str(workdir)
