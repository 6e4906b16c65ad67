"""GPU and host profiling for Metaflow steps: an NVML sampler thread and a live card.

    from gpu_profile import gpu_profile

    @gpu_profile(interval=1)
    @step
    def train(self):
        ...

    python flows/dolly_flow.py card view train --id gpu_profile

The pieces: ``sampler.GpuSampler`` (NVML + psutil in a background thread, bounded store),
``summary`` (per-GPU table and a one-line verdict), ``render.card_components`` (the card),
``decorator.gpu_profile`` (the step decorator).
"""

from gpu_profile.decorator import gpu_profile

__all__ = ["gpu_profile"]
