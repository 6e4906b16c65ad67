"""GPU-to-GPU connection matrix from NVML, the table `nvidia-smi topo -m` prints.

Each cell says how GPU i reaches GPU j: `NV#` for # NVLinks (direct, or both GPUs on NVSwitch),
otherwise the closest common PCIe ancestor from `nvmlDeviceGetTopologyCommonAncestor`. Multi-GPU
training speed depends on it: NCCL all-reduce over NV18 is an order of magnitude faster than
over SYS.

    links = nvlink_peers(nvml, handle, bus_ids, report)    # once per GPU
    topo = topology_matrix(nvml, handles, [links, ...], report)
    topo["matrix"][0][1]                                    # e.g. "NV4" or "PXB"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpu_profile.nvml_errors import is_gpu_lost, is_unsupported

# What each cell means, in nvidia-smi's words; the card prints it under the matrix.
LEGEND = {
    "X": "self",
    "NV#": "connection traversing a bonded set of # NVLinks (directly or through NVSwitch)",
    "PIX": "connection traversing at most a single PCIe bridge",
    "PXB": "connection traversing multiple PCIe bridges (without the PCIe host bridge)",
    "PHB": "connection traversing PCIe and a PCIe host bridge (typically the CPU)",
    "NODE": "connection traversing PCIe and the interconnect between host bridges in a NUMA node",
    "SYS": "connection traversing PCIe and the SMP interconnect between NUMA nodes (QPI/UPI)",
    "BRD": "both GPUs on one board (e.g. a dual-GPU card)",
    "?": "NVML could not tell",
}


@dataclass
class NvLinks:
    """Active NVLinks of one GPU: to which peer GPU (by index), and how many go to an NVSwitch."""

    to_gpu: dict[int, int] = field(default_factory=dict)
    to_switch: int = 0

    @property
    def active(self) -> int:
        return sum(self.to_gpu.values()) + self.to_switch


def nvlink_peers(
    nvml: Any, handle: Any, bus_ids: Sequence[str | None], report: Callable[[str], None]
) -> NvLinks:
    """Count this GPU's active NVLinks per peer GPU; a PCIe-only GPU has none.

    `bus_ids` are all GPUs' PCI bus ids by index (None for a GPU that could not be read).
    """
    links = NvLinks()
    peer_by_bus = {b.upper(): i for i, b in enumerate(bus_ids) if b is not None}
    for link in range(nvml.NVML_NVLINK_MAX_LINKS):
        try:
            if nvml.nvmlDeviceGetNvLinkState(handle, link) != nvml.NVML_FEATURE_ENABLED:
                continue
            remote = nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId
        except nvml.NVMLError as err:
            # A GPU without NVLink says NOT_SUPPORTED; links past its count are INVALID_ARGUMENT.
            if is_unsupported(nvml, err) or err.value == nvml.NVML_ERROR_INVALID_ARGUMENT:
                continue
            if not is_gpu_lost(nvml, err):
                report(f"Reading NVLink {link} failed: {err}; NVLink counts may be incomplete")
            return links
        peer = peer_by_bus.get(remote.upper())
        if peer is None:
            # The far end is not a GPU of this node: an NVSwitch (DGX/HGX boards).
            links.to_switch += 1
        else:
            links.to_gpu[peer] = links.to_gpu.get(peer, 0) + 1
    return links


def topology_matrix(
    nvml: Any,
    handles: Sequence[Any],
    links: Sequence[NvLinks],
    report: Callable[[str], None],
) -> dict[str, list]:
    """{"labels": ["GPU0", ...], "matrix": [["X", "NV4", ...], ...]} for the GPUs given.

    A handle may be None (a GPU that could not be opened): its cells are "?".
    """
    levels = {
        nvml.NVML_TOPOLOGY_INTERNAL: "BRD",
        nvml.NVML_TOPOLOGY_SINGLE: "PIX",
        nvml.NVML_TOPOLOGY_MULTIPLE: "PXB",
        nvml.NVML_TOPOLOGY_HOSTBRIDGE: "PHB",
        nvml.NVML_TOPOLOGY_NODE: "NODE",
        nvml.NVML_TOPOLOGY_SYSTEM: "SYS",
    }
    n = len(handles)
    matrix = [["X"] * n for _ in range(n)]
    reported = False
    for i in range(n):
        for j in range(i + 1, n):
            nv = links[i].to_gpu.get(j, 0)
            if links[i].to_switch and links[j].to_switch:
                # Through NVSwitch every pair gets the bandwidth of the narrower side.
                nv += min(links[i].to_switch, links[j].to_switch)
            if nv:
                cell = f"NV{nv}"
            elif handles[i] is None or handles[j] is None:
                cell = "?"
            else:
                try:
                    level = nvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j])
                    cell = levels.get(level, "?")
                except nvml.NVMLError as err:
                    cell = "?"
                    if not reported and not is_unsupported(nvml, err):
                        report(f"PCIe topology between GPU{i} and GPU{j} unknown: {err}")
                        reported = True
            matrix[i][j] = matrix[j][i] = cell
    return {"labels": [f"GPU{i}" for i in range(n)], "matrix": matrix}
