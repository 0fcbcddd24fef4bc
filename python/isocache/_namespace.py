"""The namespace mixed into every digest and naming every store directory: its fields, from torch.

Two processes may share a compiled piece only when everything that shapes the
compiled code, but is not part of the graph, is the same: isocache's formats,
the torch build, Inductor's configuration, the device kind and capability, and
the Python version. This module reads them from torch (`namespace_fields`,
`namespace_of`); the `Namespace` they make, its name and its description are
torch-free (`namespace.py`), for the command line.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch

from . import _core
from ._torch import inductor
from .namespace import Namespace

__all__ = ["graph_device", "namespace_fields", "namespace_of"]


@functools.cache
def _device_capability(device_type: str, index: int) -> str:
    if device_type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(index)
        return f"sm{major}{minor}:{torch.cuda.get_device_name(index)}"
    if device_type == "cpu":
        # Inductor builds CPU kernels with -march=native: an artifact is only
        # safe on a CPU with the same instruction set extensions.
        return f"{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}:{_cpu_flags_hash()}"
    return device_type


@functools.cache
def _torch_build() -> str:
    """Size and mtime of torch's native library: tells apart two builds of one version."""
    try:
        st = os.stat(torch._C.__file__)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except (OSError, AttributeError, TypeError):
        return "unknown"


def _cpu_flags_hash() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    return _core.blake3_hex(flags.encode())[:12]
    except OSError:
        pass
    return "unknown"


def namespace_fields(device: torch.device, **extra: str) -> dict[str, str]:
    """What goes into the namespace, readable (for logs, `explain` and `python -m isocache stats`).

    `extra`: what the caller adds (a backend's Inductor options and grad mode).
    """
    index = device.index if device.index is not None else 0
    return {
        "isocache": f"canon{_core.FORMAT_VERSION}/store{_core.STORE_FORMAT_VERSION}",
        "torch": torch.__version__,
        "torch_git": str(getattr(torch.version, "git_version", "")),
        "torch_build": _torch_build(),
        "inductor_config": inductor.config_fingerprint(),
        "device": device.type,
        "capability": _device_capability(device.type, index),
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        **extra,
    }


def namespace_of(device: torch.device, **extra: str) -> Namespace:
    """The namespace of pieces compiled for `device` by this process (`extra` as for `namespace_fields`)."""
    return Namespace(namespace_fields(device, **extra))


def graph_device(gm: torch.fx.GraphModule, example_inputs: Sequence[Any] | None = None) -> torch.device:
    """The device of the first tensor input (CPU when there is none)."""
    for index, node in enumerate(gm.graph.nodes):
        if node.op != "placeholder":
            break
        value = node.meta.get("val", node.meta.get("example_value"))
        if value is None and example_inputs is not None and index < len(example_inputs):
            value = example_inputs[index]
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")
