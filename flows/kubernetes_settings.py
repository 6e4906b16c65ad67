"""``@kubernetes_settings``: the config's ``kubernetes`` section, applied when a step runs there.

    @kubernetes_settings
    @resources(gpu=settings.resources.gpu, ...)
    @step
    def train(self): ...

    "kubernetes": {                                   # in the config
        "image": "registry.example.com/metaflow-dolly-gpu:cu126-torch2.13",   # every step
        "train": {                                    # the train step only: the GPU node pool
            "node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        }
    }

    python flows/dolly_flow.py --config config flows/configs/a100x4.json run --with kubernetes
    python flows/dolly_flow.py --config config flows/configs/a100x4.json argo-workflows create

A preset knows the image its DeepSpeed and CUDA versions were tested in, and the node pool its
GPUs live on (node selector, the ``nvidia.com/gpu`` taint to tolerate); a user should not have to
repeat those on every command line. ``@kubernetes`` cannot be written on the step, since a laptop
``run`` must stay local; so this StepMutator waits until ``--with kubernetes`` (or Argo
Workflows, which attaches ``@kubernetes`` to every step) has put one there, then fills in every
attribute the command line left at its default from the config. Values given on the command line
(``--with kubernetes:image=...``) win. ``@resources`` (cpu, gpu, memory, shared_memory) is merged
into ``@kubernetes`` by Metaflow itself.
"""

from __future__ import annotations

from typing import Any

from metaflow.exception import MetaflowException
from metaflow.user_decorators.mutable_step import MutableStep
from metaflow.user_decorators.user_step_decorator import StepMutator

CONFIG_NAME = "config"
# @kubernetes attributes a preset may set; the rest (cpu, gpu, memory, shared_memory) belong in
# the config's "resources", which feeds @resources and works on every compute backend.
ALLOWED = (
    "image", "image_pull_policy", "image_pull_secrets", "node_selector", "tolerations", "labels",
    "annotations", "namespace", "service_account", "secrets", "persistent_volume_claims",
    "compute_pool", "disk", "use_tmpfs", "tmpfs_size", "gpu_vendor", "qos",
)
PLACEHOLDER = "your-registry"  # the presets' image until a user has built and pushed their own


class KubernetesSettingsError(MetaflowException):
    headline = "Invalid kubernetes settings in the config"


def settings_for(config: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The attributes to apply: config values where ``current`` still holds the default.

    ``config``: the config's "kubernetes" section; ``current``: the attributes of the step's
    @kubernetes now; ``defaults``: KubernetesDecorator.defaults. Raises on unknown keys and on
    the placeholder image.
    """
    unknown = sorted(set(config) - set(ALLOWED))
    if unknown:
        raise KubernetesSettingsError(
            f"config kubernetes: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(ALLOWED)}. "
            "cpu, gpu, memory and shared_memory go in the config's \"resources\"."
        )
    chosen = {k: v for k, v in config.items() if v is not None and current.get(k) == defaults.get(k)}
    image = chosen.get("image") or current.get("image") or ""
    if PLACEHOLDER in str(image):
        raise KubernetesSettingsError(
            f"config kubernetes.image is the placeholder {image!r}. Build and push the GPU image "
            "(environments/Dockerfile.gpu, see its header), then set kubernetes.image in your config "
            "to it, or pass --with kubernetes:image=<your image>."
        )
    return chosen


class kubernetes_settings(StepMutator):  # noqa: N801 -- decorators are lower case, like @kubernetes
    """Fill the step's @kubernetes (when present) from the config's "kubernetes" section."""

    def mutate(self, mutable_step: MutableStep) -> None:
        from metaflow.plugins.kubernetes.kubernetes_decorator import KubernetesDecorator

        specs = [spec for spec in mutable_step.decorator_specs if spec[0] == "kubernetes"]
        if not specs:
            return  # a local run: nothing to do
        configs = dict(mutable_step.flow.configs)
        section = _plain(configs[CONFIG_NAME].get("kubernetes") or {}) if CONFIG_NAME in configs else {}
        if not section:
            return
        # Every step runs in the image (start checks the data with the same libraries); a
        # sub-section named after a step (the GPU step) adds its node pool to that step only.
        steps = {name for name, _ in mutable_step.flow.steps}
        sections = {k for k, v in section.items() if isinstance(v, dict) and k not in ALLOWED}
        if sections - steps:
            raise KubernetesSettingsError(
                f"config kubernetes: {', '.join(sorted(sections - steps))} is neither a @kubernetes "
                f"attribute nor a step of the flow ({', '.join(sorted(steps))})."
            )
        wanted = {k: v for k, v in section.items() if k not in sections}
        wanted.update(section.get(self._my_step.__name__) or {})
        _, _, _, current = specs[0]
        chosen = settings_for(wanted, current, KubernetesDecorator.defaults)
        # Update the @kubernetes in place. add_decorator(..., OVERRIDE) swaps the step's
        # decorator list for a new one, which the graph Argo compiles from does not see when
        # @kubernetes came from a top-level --with (measured on Metaflow 2.19.39: "list index
        # out of range" in _container_templates). Mutators run before @kubernetes reads its
        # attributes (and again when Argo attaches it late), so this is in time, and idempotent.
        for deco in self._my_step.decorators:
            if deco.name == "kubernetes":
                deco.attributes.update(chosen)


def _plain(value: Any) -> Any:
    """ConfigValue (dict-like, read-only) -> plain dicts and lists for @kubernetes."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
