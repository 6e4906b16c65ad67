"""``@gpu_profile``: sample every GPU of the node while a step runs, and show it in a live card.

    from gpu_profile import gpu_profile

    @gpu_profile(interval=1)
    @resources(gpu=4, shared_memory=32768)
    @step
    def train(self):
        ...

Why two Metaflow pieces: ``gpu_profile`` is a StepMutator (Metaflow's user-level API), because
it must add a ``@card(type="blank", id="gpu_profile")`` to the step and validate ``interval``
when the flow is validated, before any task starts. The mutator then adds ``GpuProfileSampling``,
a UserStepDecorator that wraps the step: it starts the NVML sampler thread before the step body,
refreshes the card while the body runs, and after it (success, failure or SIGTERM) stops the
sampler, stores the ``gpu_profile_data`` and ``gpu_profile_num_gpus`` artifacts and renders the
card a final time. A packaged Metaflow extension would need installing on every image; user
decorators ship in the flow's code package (Metaflow packages modules that define them).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

from metaflow import current
from metaflow.exception import MetaflowException
from metaflow.user_decorators.user_step_decorator import StepMutator, UserStepDecorator

from gpu_profile.live_card import METAFLOW_FLOOR_S, refresh_interval_s, wait_out_floor

CARD_ID = "gpu_profile"


class GpuProfileError(MetaflowException):
    headline = "@gpu_profile"


def _check_interval(interval: Any, step_name: str) -> float:
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0.05 <= interval <= 3600:
        raise GpuProfileError(
            f"@gpu_profile on step '{step_name}': interval={interval!r} must be a number of seconds "
            "between 0.05 and 3600, e.g. @gpu_profile(interval=1)."
        )
    return float(interval)


class gpu_profile(StepMutator):  # noqa: N801 -- decorators are lower case, like @card and @step
    """Profile the GPUs (NVML) and host (CPU, RAM) of the node every ``interval`` seconds."""

    def init(self, *args: Any, **kwargs: Any) -> None:
        if args:
            raise GpuProfileError("@gpu_profile takes keyword arguments only: @gpu_profile(interval=1).")
        unknown = set(kwargs) - {"interval"}
        if unknown:
            raise GpuProfileError(
                f"@gpu_profile: unknown argument(s) {', '.join(sorted(unknown))}; it takes interval=<seconds>."
            )
        self.interval = kwargs.get("interval", 1)

    def pre_mutate(self, mutable_step: Any) -> None:
        # Metaflow 2.19 gives mutators no public step name; the decorated function has it.
        interval = _check_interval(self.interval, self._my_step.__name__)
        try:
            refresh_interval_s()  # a bad DOLLY_CARD_REFRESH_S stops the flow before any task
        except ValueError as err:
            raise GpuProfileError(f"@gpu_profile: {err}") from None
        mutable_step.add_decorator(
            "card",
            deco_kwargs={"type": "blank", "id": CARD_ID, "refresh_interval": METAFLOW_FLOOR_S},
        )
        mutable_step.add_decorator(GpuProfileSampling, deco_kwargs={"interval": interval})


class GpuProfileSampling(UserStepDecorator):
    """Runs the sampler around the step body; added by ``@gpu_profile``, not used directly."""

    def init(self, *args: Any, **kwargs: Any) -> None:
        self.interval = float(kwargs.get("interval", 1))
        self._sampler = None
        self._refresher: threading.Thread | None = None
        self._stopping = threading.Event()
        self._previous_sigterm: Any = None
        self._rendered_at = 0.0

    def pre_step(self, step_name: str, flow: Any, inputs: Any = None) -> None:
        from gpu_profile.sampler import GpuSampler

        self._sampler = GpuSampler(interval=self.interval)
        self._sampler.start()
        self._stopping.clear()
        self._refresher = threading.Thread(target=self._refresh_loop, name="gpu-profile-card", daemon=True)
        self._refresher.start()
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        return None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # A preempted node: keep what was sampled, then let the previous handler (or the
        # default, which ends the process) act.
        self._finish()
        previous = self._previous_sigterm
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    def _refresh_loop(self) -> None:
        # The card exists from the start: Metaflow runs a card's first render in the background
        # and does not wait for it, so a final render that was the first (a step failing before
        # the first redraw) could be lost with the task's end; later ones are waited for.
        self._render(final=False)
        # Each redraw is a process: spaced by the CPUs (gpu_profile/live_card.py), or it would
        # take the CPU time the profile is there to show.
        interval = refresh_interval_s()
        while not self._stopping.wait(interval):
            self._render(final=False)

    def _render(self, final: bool, redraw: bool = True) -> None:
        from gpu_profile.render import card_components

        if redraw:
            self._rendered_at = wait_out_floor(self._rendered_at) if final else time.monotonic()
        try:
            components = card_components(self._sampler.snapshot())
            card = current.card[CARD_ID]
            card.clear()
            card.extend(components)
            if redraw:
                card.refresh(force=final)
        except Exception as err:  # a profile must never fail the training step it watches
            print(f"@gpu_profile: could not render the card ({type(err).__name__}: {err})", file=sys.stderr)

    def _finish(self) -> None:
        self._stopping.set()
        if self._refresher is not None:
            self._refresher.join(timeout=30)
        if self._sampler is not None:
            self._sampler.stop()

    def post_step(self, step_name: str, flow: Any, exception: Exception | None = None) -> Any:
        self._finish()
        data = self._sampler.snapshot()
        flow.gpu_profile_data = data
        flow.gpu_profile_num_gpus = data["num_gpus"]
        # The final components: @card renders them at task end when the step succeeds (a redraw
        # of our own now would cost two more card processes); on failure it renders nothing, so
        # force a runtime render that `card view` shows.
        self._render(final=exception is not None, redraw=exception is not None)
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        if exception:
            return exception, None
        return None, None
