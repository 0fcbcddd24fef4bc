"""What an `isocache.compile` entry traces, and what selects its saved entry.

`Traced` is a module's ``__call__`` or a function (called with the module as
its first argument when there is one); `Call` the arguments of the call it is
loaded or traced for. An entry is stored under its *slot* (`Traced.slot`: the
traced code's name, the input specs, torch and isocache versions, the
namespace, grad mode); its *manifest* (`Traced.manifest`: the model's
configuration and module structure) picks among a slot's variants before any
recorded fact is checked.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any, Callable

import torch

from . import _core
from ._torch import dynamo, guards
from .entry import EntryRefused
from .tiers.base_store import Entries
from .validity import Globals

__all__ = ["Call", "Slot", "Traced", "call_form", "graph_break"]

_PLAIN = (bool, int, float, str, type(None))


@dataclasses.dataclass(frozen=True)
class Call:
    """The arguments of the call an entry is loaded or traced for."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where an entry is saved and looked up: the store's tier for entries, the slot's key
    (`Traced.slot`), the manifest that selects a variant (`Traced.manifest`), and the entry the slot
    holds now (None: empty)."""

    entries: Entries
    key: str
    manifest: dict[str, str]
    saved: bytes | None


def call_form(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What a call's guards do not check: how many positional arguments, which keywords, and the
    values of plain ones (tensors and other objects by type)."""
    return (
        tuple(a if isinstance(a, _PLAIN) else type(a) for a in args),
        tuple(sorted((k, v if isinstance(v, _PLAIN) else type(v)) for k, v in kwargs.items())),
    )


def graph_break(e: BaseException) -> str:
    """The line of a Dynamo error that says what went wrong (its "Explanation:", else its first line)."""
    text = [line.strip() for line in str(e).strip().splitlines()]
    for line in text:
        if line.startswith("Explanation:"):
            return line.removeprefix("Explanation:").strip()
    return text[0] if text else type(e).__name__


def _spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        dynamic = dynamo.dynamic_dims(value)
        return {
            "dtype": str(value.dtype),
            "shape": [None if i in dynamic else int(s) for i, s in enumerate(value.shape)],
            "stride": [int(s) for s in value.stride()] if not dynamic else None,
            "device": value.device.type,
            "requires_grad": value.requires_grad,
        }
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return [_spec(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _spec(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


@dataclasses.dataclass(frozen=True)
class Traced:
    """What one entry traces: `function` called with `model` first, or the model's own ``__call__``."""

    model: torch.nn.Module | None
    function: Callable[..., Any] | None
    #: The entry in log lines (``LlamaForCausalLM (decode)``).
    name: str
    #: The traced code's qualified name (and phase): part of the slot.
    target: str
    dynamic: bool | None

    @classmethod
    def of(
        cls,
        model: torch.nn.Module | None,
        function: Callable[..., Any] | None,
        dynamic: bool | None,
        label: str | None = None,
    ) -> Traced:
        if model is None and function is None:
            raise TypeError("isocache.compile needs a module or a function")
        named = function if model is None else type(model)
        target = _qualified(named) + ("" if function is None or model is None else f".{function.__name__}")
        suffix = "" if label is None else f" ({label})"
        name = getattr(named, "__qualname__", "function") + suffix
        return cls(model, function, name, target + suffix, dynamic)

    @property
    def bound(self) -> tuple[Any, ...]:
        """What precedes the call's arguments when the traced function is called (the model, if any)."""
        return () if self.model is None else (self.model,)

    @property
    def callable(self) -> Any:
        """What Dynamo traces: the function, else the model."""
        return self.function if self.function is not None else self.model

    @property
    def leading(self) -> tuple[Any, ...]:
        """What a call of `callable` passes before the call's arguments (the model, for a function)."""
        return self.bound if self.function is not None else ()

    def frame(self, call: Call) -> dict[str, Any]:
        """The traced frame's locals for `call`, as the recorded facts name them."""
        return guards.frame_locals(self.callable, self.bound, call.args, call.kwargs)

    def root_globals(self, modules: dict[str, str]) -> Globals:
        """The traced frame's globals (`modules`: names Dynamo gave modules in the saving process)."""
        return guards.root_globals(self.callable, modules)

    def check_scope(self) -> dict[str, Any]:
        """The names the dependency check evaluates with (``___target``: a traced function itself)."""
        return dict(guards.check_scope(), ___target=self.function)

    def load_globals(self, modules: dict[str, str]) -> dict[str, Any]:
        """The forward's globals, plus the modules Dynamo bound under per-process names
        (``___module_collections_<id>_c0``) when the entry was saved."""
        model: Any = self.model
        traced: Any = self.function if self.function is not None else type(model).forward
        scope = dict(traced.__globals__)
        for name, module_name in modules.items():
            try:
                scope.setdefault(name, importlib.import_module(module_name))
            except ImportError as e:
                raise EntryRefused(f"module {module_name} it needs cannot be imported ({e})") from None
        return scope

    def slot(self, call: Call, namespace: str, split: str) -> str:
        """The digest a saved entry is stored under."""
        key = {
            "isocache": _core.__version__,
            "torch": torch.__version__,
            "namespace": namespace,
            "class": self.target,
            "inputs": _spec([list(call.args), call.kwargs]),
            "dynamic": self.dynamic,
            "grad": torch.is_grad_enabled(),
            "split": split,
        }
        return _core.blake3_hex(json.dumps(key, sort_keys=True, default=str).encode())

    def manifest(self) -> dict[str, str]:
        """What selects an entry's variant before anything is traced: the model's configuration and
        module structure (the code it runs and the values it reads are its recorded facts)."""
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            config_text = config.to_json_string(use_diff=False)
        else:
            config_text = repr(config)
        structure: list[Any] = []
        if self.model is not None:
            structure = [(name, type(m).__qualname__, m.extra_repr()) for name, m in self.model.named_modules()] + [
                (name, str(p.dtype), list(p.shape)) for name, p in self.model.named_parameters()
            ]
        return {
            "config": _core.blake3_hex(config_text.encode()),
            "structure": _core.blake3_hex(json.dumps(structure).encode()),
        }
