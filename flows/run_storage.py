"""Where a run's model and checkpoints live.

The trainer always writes into a local directory (``models/<flow>/<run id>`` under the working
directory, or the config's ``model_root``). With S3 (an explicit ``--checkpoint-uri``, or
Metaflow's S3 data root when one is configured) the trainer also uploads every checkpoint while
it trains and the final model at the end, under ``<root>/<flow>/<run id>/``, the prefix
``metaflow.S3(run=self)`` uses; without S3 the local directory is the model's location.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from training.adapters import is_adapter_dir


@dataclass
class LocalModelStore:
    root: Path

    def workdir(self, flow_name: str, run_id: str, node: int = 0, branch: str = "") -> Path:
        """The directory the trainer writes the model, checkpoints and logs into.

        Nodes after the first (a multi-node gang) get their own: on one host they must not
        write their checkpoint shards over node 0's. So does each branch of a sweep
        (``<run id>/point-2``)."""
        name = f"{run_id}-node{node}" if node else str(run_id)
        path = (self.root / flow_name / name / branch if branch else self.root / flow_name / name).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, workdir: Path) -> str:
        """The location of the published model; local: the directory itself (a model, or under
        LoRA without merge the adapter alone)."""
        if not ((workdir / "config.json").is_file() or is_adapter_dir(workdir)):
            raise FileNotFoundError(f"No model was saved in {workdir} (no config.json or adapter_config.json).")
        return str(workdir)


def run_s3_root(flow_name: str, run_id: str) -> str:
    """This run's prefix in Metaflow's S3 data root, or "" when no S3 is configured."""
    from metaflow.metaflow_config import DATATOOLS_S3ROOT

    return f"{DATATOOLS_S3ROOT.rstrip('/')}/{flow_name}/{run_id}" if DATATOOLS_S3ROOT else ""


def s3_endpoint_env() -> dict[str, str]:
    """Point the trainer's boto3 at the S3 endpoint Metaflow uses (an S3-compatible server)."""
    from metaflow.metaflow_config import S3_ENDPOINT_URL

    env = dict(os.environ)
    if S3_ENDPOINT_URL and "AWS_ENDPOINT_URL_S3" not in env:
        env["AWS_ENDPOINT_URL_S3"] = S3_ENDPOINT_URL
    return env


def resolve_resume_from(value: str) -> str:
    """An s3:// checkpoint URL as given, or a pathspec's checkpoints folder.

    The folder, not its newest checkpoint: only a download shows whether a checkpoint's bytes
    match its manifest, and the trainer's resolve_resume then falls back to an older one."""
    if value.startswith("s3://"):
        return value
    from metaflow import Run, namespace
    from metaflow.exception import MetaflowInvalidPathspec, MetaflowNotFound

    from training.checkpoint_store import S3CheckpointStore

    namespace(None)
    try:
        previous = Run(value)
    except MetaflowInvalidPathspec:
        raise ValueError(f"{value!r} is not a run: pass <FlowName>/<run id> (DollyFlow/1764412345678) "
                         "or a checkpoint's s3:// URL.") from None
    except MetaflowNotFound:
        raise ValueError(f"{value}: no such run (Metaflow looked in {os.getcwd()} for a .metaflow directory, "
                         "or in the metadata service); pass a run that exists, from the directory you ran "
                         "it in, or a checkpoint's s3:// URL.") from None
    uri = previous["start"].task.data.checkpoint_root
    if not uri:
        raise ValueError(f"run {value} kept its checkpoints on local disk; pass a checkpoint's s3:// URL.")
    store = S3CheckpointStore(f"{uri}/checkpoints")
    names = store.names()
    if not names:
        raise ValueError(f"run {value} has no complete checkpoint in {store.uri}.")
    return store.uri


def resume_source(explicit: str, *, retry_count: int, resumed_run: bool, uploads: bool) -> str:
    """The trainer's ``--resume_from`` for this attempt of the train step ("" to start fresh).

    ``explicit`` (``--resume-from``) on the first attempt; ``latest`` (the newest valid
    checkpoint in this run's own prefix) on a retry (``@retry``) or in Metaflow's ``resume`` of a
    failed run, and only when checkpoints go to S3; a fresh run starts from the base model and
    never looks at what another run left under a shared ``--checkpoint-uri``."""
    if explicit and retry_count == 0:
        return explicit
    if uploads and (retry_count > 0 or resumed_run):
        return "latest"
    return ""


def checkpoint_root_of(checkpoint_uri: str, run_root: str, flow_name: str, run_id: str) -> str:
    """Where this run's checkpoints and model go: its own prefix under ``--checkpoint-uri``
    (``<uri>/<flow>/<run id>``), else ``run_root`` (this run's prefix in Metaflow's S3 data root),
    else "" (local disk only).

    Under the given URI, not at it: two runs given the same ``--checkpoint-uri`` would otherwise
    resume from, prune and overwrite each other's checkpoints. A retry and Metaflow's ``resume``
    keep the run's prefix (``resume`` clones `start`, which set it)."""
    if checkpoint_uri:
        return f"{checkpoint_uri.rstrip('/')}/{flow_name}/{run_id}"
    return run_root.rstrip("/")
