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

__all__ = [
    "describe",
    "graph_device",
    "namespace_device_type",
    "namespace_fields",
    "namespace_for_device",
    "namespace_of",
]


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


# Name -> namespace, for each namespace this process named through `namespace_for_device`, so that
# `describe` can find its fields by name. Goes with those two once their callers hold a `Namespace`.
_NAMED: dict[str, Namespace] = {}


def namespace_for_device(device: torch.device, **extra: str) -> str:
    """`<device type>-<16 hex>`: short, safe as a directory name (`namespace_of(...).name`)."""
    namespace = namespace_of(device, **extra)
    _NAMED.setdefault(namespace.name, namespace)
    return namespace.name


def describe(namespace: str) -> str | None:
    """The description of a namespace this process named: its fields and Inductor's changed settings
    as JSON (what `python -m isocache stats` shows), or None for a namespace named elsewhere."""
    named = _NAMED.get(namespace)
    return None if named is None else named.describe(inductor.changed_config())


def namespace_device_type(namespace: str) -> str:
    """The device type a namespace from `namespace_for_device` is for (``"cpu"`` for ``cpu-6e40...``)."""
    return namespace.split("-", 1)[0]


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
