"""Finding a run's model through the Metaflow client (DollyFlow, or a sweep's best point).

    from training.metaflow_runs import run_model_location
    run_model_location()                    # the latest successful run of this user
    run_model_location("DollyFlow/1764412345678")
    run_model_location("1764412345678")     # a run id of DollyFlow
    run_model_location("DollySweepFlow/1764412345679")   # the best point's model

Local runs are found through the ``.metaflow`` directory of the working directory (or a parent):
run this from where the flow ran. With a metadata service (``metaflow configure``), anywhere.
"""

from __future__ import annotations

import os

FLOW_NAME = "DollyFlow"


class RunLookupError(LookupError):
    """No usable run: the message says which run and what to do."""


def ensure_metaflow_user() -> None:
    """Metaflow refuses to run without a non-root user name (METAFLOW_USER, SUDO_USER, USERNAME
    or USER). In a root container (CI, a fresh cloud machine) runs are recorded as user "dolly"
    instead of failing the very first command; the client then looks in the same namespace."""
    if all(os.environ.get(var) in (None, "", "root") for var in ("METAFLOW_USER", "SUDO_USER", "USERNAME", "USER")):
        os.environ["METAFLOW_USER"] = "dolly"


def run_model_location(run: str | None = None, flow_name: str = FLOW_NAME) -> str:
    """``model_location`` of a successful run: the latest of this user when ``run`` is None or
    "latest", else the run with that pathspec (``DollyFlow/<id>``) or id, whoever ran it."""
    ensure_metaflow_user()
    from metaflow import Flow, Run, namespace
    from metaflow.exception import MetaflowInvalidPathspec, MetaflowNotFound

    where = (f"Metaflow looked in {os.getcwd()} for a .metaflow directory (local runs); run this "
             "from the directory you ran the flow in, or configure the metadata service.")
    if run in (None, "", "latest"):
        try:
            found = Flow(flow_name).latest_successful_run
        except MetaflowNotFound:
            found = None
        if found is None:
            raise RunLookupError(
                f"No successful {flow_name} run found. Train one with `python flows/dolly_flow.py run`, "
                f"or pass --run {flow_name}/<run id>. {where}"
            )
    else:
        pathspec = run if "/" in run else f"{flow_name}/{run}"
        namespace(None)  # an explicit run is found whoever ran it
        try:
            found = Run(pathspec)
        except MetaflowInvalidPathspec:
            raise RunLookupError(f"{run!r} is not a run: pass {flow_name}/<run id>, a run id, or 'latest'.") from None
        except MetaflowNotFound:
            raise RunLookupError(f"Run {pathspec} not found. {where}") from None
        if not found.successful:
            raise RunLookupError(
                f"Run {pathspec} did not finish successfully, so it published no model. Finish it "
                f"with `python flows/dolly_flow.py resume --origin-run-id {found.id}`, or pick another run."
            )
    # The end step's artifacts: the trained model (DollyFlow, DollyMultiNodeFlow) or the best
    # point's (DollySweepFlow).
    location = getattr(found.data, "model_location", None) if found.data is not None else None
    if not location:
        raise RunLookupError(f"Run {found.pathspec} has no model_location artifact.")
    return location
