"""torch.compile's ``mode`` and ``options`` for the isocache backend: checked, and turned into the
Inductor options every piece is compiled with (part of the namespace, so configurations never mix).

The mode's options (``torch._inductor.list_mode_options``) and `options` go over the backend's own
(`Backend.configured`: the backend itself when they add nothing). A ValueError names what is wrong at
construction or at ``torch.compile`` (torch 2.15), not at the first call: an unknown mode or option, a
value of the wrong type, or CUDA graphs (``mode="reduce-overhead"`` or ``"max-autotune"``), which
isocache's pieces do not use (with what to pass instead). Other arguments torch passes are ignored
(``name``: a label for torch's debug output; an argument a newer torch adds: warned once).
"""

from __future__ import annotations

from typing import Any

from ._once import warn_once
from ._torch import dynamo, inductor

__all__ = ["check_compile_call", "checked_options", "compile_options", "warn_unknown_args"]


#: Arguments torch.compile passes to a backend that do not change what isocache compiles
#: (torch 2.15's ``name`` labels the compiled region in torch's debug output).
_IGNORED_COMPILE_ARGS = frozenset({"name"})

#: Modes whose options turn CUDA graphs on, and what to pass instead.
_CUDA_GRAPH_MODES = {
    "max-autotune": "mode='max-autotune-no-cudagraphs' (the same autotuning without CUDA graphs)",
    "reduce-overhead": "no mode",
}


def checked_options(options: dict[str, Any], what: str) -> dict[str, Any]:
    """Inductor options checked (`inductor.check_options`), CUDA graphs refused."""
    if not options:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"{what}: expected a dict of Inductor options, got {type(options).__name__}")
    checked = inductor.check_options(options, what)
    if checked.get("triton.cudagraphs"):
        raise ValueError(
            f"{what}: 'triton.cudagraphs': True asks for CUDA graphs, which isocache does not apply to the pieces "
            "it compiles and saves; leave it out, or use backend='inductor' for CUDA graphs"
        )
    return checked


def compile_options(mode: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Inductor options ``torch.compile(mode=mode, options=options)`` asks for, checked: a ValueError
    names an unknown mode or option, a value of the wrong type, or a mode that needs CUDA graphs (and
    what to pass instead)."""
    extra: dict[str, Any] = {}
    if mode is not None and mode != "default":
        if not isinstance(mode, str):
            raise ValueError(f"torch.compile(mode={mode!r}): a mode is a string such as 'max-autotune-no-cudagraphs'")
        if mode in _CUDA_GRAPH_MODES:
            raise ValueError(
                f"torch.compile(mode={mode!r}) asks for CUDA graphs, which isocache does not apply to the pieces "
                f"it compiles and saves: pass {_CUDA_GRAPH_MODES[mode]} with backend='isocache', "
                "or use backend='inductor' for CUDA graphs"
            )
        extra.update(checked_options(inductor.mode_options(mode), f"torch.compile(mode={mode!r})"))
    if options:
        extra.update(checked_options(options, "torch.compile(options=...)"))
    return extra


def check_compile_call() -> None:
    """From a backend's ``_dynamo_backend_init`` (torch 2.15): the mode and options of the
    ``torch.compile`` call resolving it, checked then (`compile_options`) rather than at the first call."""
    call = dynamo.compile_call()
    if call is not None:
        compile_options(call.other.get("mode"), call.other.get("options"))


def warn_unknown_args(other: dict[str, Any]) -> None:
    """One warning for arguments torch.compile passed that isocache neither uses nor knows to ignore."""
    unknown = sorted(set(other) - _IGNORED_COMPILE_ARGS)
    if unknown:
        warn_once(
            ("compile-args", tuple(unknown)),
            "isocache: torch.compile passed %s to the backend, which isocache does not know and ignores",
            ", ".join(unknown),
        )
