"""The torch adapter: every private ``torch._dynamo`` / ``torch._inductor`` API isocache touches.

One module per torch subsystem:

- `inductor`: compiling a piece (``standalone_compile``), (de)serializing
  artifacts, plain Inductor;
- `inductor_dir`: Inductor's cache directory, private and held by descriptor;
- `dynamo`: torch's ahead-of-time capture (``aot_compile``), saved compiled
  functions, guard failures, Dynamo's restart signal, module source;
- `fx`: symbolic sizes and their ranges, dynamic dimensions;
- `runtime`: the light runtime of saved pieces' wrapper code.

Written against torch 2.11 through 2.15. A difference between versions is a
named shim in the module of its subsystem, whose docstring says which
versions it covers; nothing outside this package imports a private torch name.
"""

from __future__ import annotations

import torch

__all__ = ["TESTED", "register_torch_logs", "release", "untested"]


#: The oldest and the newest torch CI tests (scripts/check): pyproject's floor, and the release below its
#: upper bound (tests/test_torch_versions.py keeps the two in step).
TESTED = ((2, 11), (2, 15))


def untested() -> str | None:
    """Why this torch is outside the tested range, as one sentence that says what to do (None: inside)."""
    oldest, newest = TESTED
    this = release()
    if oldest <= this <= newest:
        return None
    side = "newer than the newest" if this > newest else "older than the oldest"
    return (
        f"torch {torch.__version__} is {side} torch isocache is tested with ({'{}.{}'.format(*oldest)} to "
        f"{'{}.{}'.format(*newest)}); isocache uses private torch APIs that may differ there: if compiling or "
        f"loading fails, install a torch in that range, or set ISOCACHE_DISABLE=1 to run plain Inductor"
    )


def release() -> tuple[int, int]:
    """This torch's (major, minor): what every version shim compares."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def register_torch_logs() -> None:
    """Makes the ``isocache`` logger one of torch's logs, like ``dynamo`` or ``inductor``.

    ``TORCH_LOGS="isocache"`` shows its INFO lines, ``"+isocache"`` its DEBUG
    lines too, and ``TORCH_LOGS=help`` lists it. (Torch 2.11-2.15 already
    treat an importable module named in ``TORCH_LOGS`` as a log; this names it.)
    Written against ``torch._logging._internal.register_log``.
    """
    try:
        from torch._logging._internal import register_log
    except ImportError:  # pragma: no cover
        return
    register_log("isocache", "isocache")
