"""What an NVML error means for the profiler: unsupported field, lost GPU, or no GPU at all.

pynvml raises `NVMLError(code)`, which it turns into a subclass per code (`NVMLError(3)` is an
`NVMLError_NotSupported`), and every instance carries `.value`, the NVML return code. Comparing
codes covers both spellings, and the checks take the NVML module so a test double can stand in:

    >>> import pynvml
    >>> is_unsupported(pynvml, pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED))
    True
    >>> no_gpu_reason(pynvml, pynvml.NVMLError_LibraryNotFound())
    'NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this machine or container'
"""

from __future__ import annotations

from typing import Any


def is_unsupported(nvml: Any, err: Exception) -> bool:
    """True when the GPU or driver cannot answer this query at all (record it, do not retry).

    FUNCTION_NOT_FOUND is an older driver without the query, which is the same thing to us.
    """
    return getattr(err, "value", None) in (
        nvml.NVML_ERROR_NOT_SUPPORTED,
        nvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    )


def is_gpu_lost(nvml: Any, err: Exception) -> bool:
    """True when the GPU fell off the bus or needs a reset: no further query can succeed."""
    return getattr(err, "value", None) in (
        nvml.NVML_ERROR_GPU_IS_LOST,
        nvml.NVML_ERROR_RESET_REQUIRED,
    )


def no_gpu_reason(nvml: Any, err: Exception) -> str:
    """A sentence for a person on why NVML could not start (the nvmlInit error)."""
    reasons = {
        nvml.NVML_ERROR_LIBRARY_NOT_FOUND: (
            "NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this machine or "
            "container"
        ),
        nvml.NVML_ERROR_DRIVER_NOT_LOADED: "the NVIDIA kernel driver is not loaded",
        nvml.NVML_ERROR_NO_PERMISSION: "no permission to open the NVIDIA driver (/dev/nvidia*)",
        nvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: (
            "NVML library and kernel driver versions differ (driver updated without a reboot?)"
        ),
    }
    return reasons.get(getattr(err, "value", None), f"nvmlInit failed: {err}")
