"""`CompiledModel`: what `isocache.compile` returns for a module or a function.

Its first call loads the saved entry that fits (`warm_start.py`: no Dynamo
tracing) or traces and saves one (`cold_start.py`); calls the entry was not
compiled for (other keywords or plain values, another train/eval mode, inputs
its guards refuse) and models that cannot be traced as one graph run through
``torch.compile`` with the isocache backend instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import time
from typing import Any, Callable

import torch

from . import cold_start, warm_start
from ._once import warn_once
from ._torch import dynamo, guards
from .backend import Backend
from .entry import EntryRefused
from .marking import is_marked, mark_blocks, unmark_blocks
from .tiers.base_store import Entries
from .traced import Call, Slot, Traced, call_form, graph_break

__all__ = ["CompiledModel", "GuardWarning"]

logger = logging.getLogger("isocache")


@dataclasses.dataclass
class GuardWarning:
    """Whether the warning for inputs outside what an entry was compiled for was given: once per
    compiled model (shared by a generation's entries), DEBUG after."""

    given: bool = False


def _refusal(traced: Traced, e: RuntimeError) -> str:
    """What a saved entry's guards refused, for the warning: the input and how it differs, where known."""
    logger.debug("isocache: %s refused a call's inputs: %s", traced.name, e)
    why = guards.refused_input(e, _positional(traced)) or "its guards refused the inputs"
    hint = " (isocache.compile(model, dynamic=True) compiles one entry for every size)" if "size" in why else ""
    return why + hint


def _positional(traced: Traced) -> list[str]:
    """The names of the traced forward's positional parameters (after ``self``), for messages."""
    model = traced.model
    if model is None or traced.function is not None:
        return []  # a function's guards name its parameters
    try:
        params = list(inspect.signature(type(model).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


class CompiledModel:
    """What `isocache.compile` returns for a module or a function: call it like the original.

    One saved entry: the module's ``__call__`` or `function` (called with the
    module as its first argument when there is one) traced for one family of
    inputs. `label` names the entry in log lines and its slot (a generation
    phase, see `generation.py`).
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        *,
        dynamic: bool | None,
        cache_dir: Any = None,
        split: str = "auto",
        function: Callable[..., Any] | None = None,
        label: str | None = None,
        backend: Backend | None = None,
        guard_warning: GuardWarning | None = None,
    ) -> None:
        self._traced = Traced.of(model, function, dynamic, label)
        self._model = model
        self._backend = backend if backend is not None else Backend(cache_dir=cache_dir, split=split)
        self._compiled: Any = None  # the loaded or freshly traced AOT function
        self._fallback: Any = None  # torch.compile(model or function, backend=isocache), when needed
        self._guard_warning = guard_warning if guard_warning is not None else GuardWarning()
        self._call_form: tuple[Any, ...] = ()  # the first call's `call_form`: what the entry serves
        self._training = False  # the model's mode at the first call: what the entry serves
        self._warm: warm_start.WarmStart | None = None  # a loaded entry until its first call returns

    def __getattr__(self, name: str) -> Any:
        # Module-like: everything else is the model's (or the function's).
        traced = self.__dict__["_traced"]
        return getattr(traced.model if traced.model is not None else traced.function, name)

    def __repr__(self) -> str:
        return f"isocache.compile({self._traced.name})"

    @property
    def model(self) -> torch.nn.Module | None:
        return self._model

    @property
    def prepared(self) -> bool:
        """Whether the first call has loaded or traced this entry."""
        return self._compiled is not None or self._fallback is not None

    @property
    def ahead_of_time(self) -> bool:
        """Whether this entry runs a saved or freshly saved ahead-of-time function (not the plain backend)."""
        return self._compiled is not None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Only for a transformers generation model (`generation.GenerationModel`)."""
        raise AttributeError(f"{self._traced.name} has no generate(): compile a transformers generation model")

    def prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Loads or traces this entry for a call with `args` and `kwargs` without making the call (the
        first call does it otherwise)."""
        if not self.prepared:
            self._prepare(Call(args, kwargs))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.prepared:
            self._prepare(Call(args, kwargs))
        if self._compiled is None:
            return self._fallback_call(args, kwargs)
        if call_form(args, kwargs) != self._call_form:
            # Torch's saved guards check tensors, not which keywords a call passes or their plain values:
            # a call with ``output_hidden_states=True`` would run a graph traced without it.
            return self._outside(args, kwargs, "other arguments or argument values than it was compiled for")
        if self._model is not None and self._model.training is not self._training:
            # The saved guards do not check module state: the entry's facts did, once, before loading.
            return self._outside(args, kwargs, f"the model is in {'train' if self._model.training else 'eval'} mode")
        bound = self._traced.bound
        try:
            warm, self._warm = self._warm, None
            if warm is None:
                return self._compiled(*bound, *args, **kwargs)
            start = time.perf_counter()
            try:
                return self._compiled(*bound, *args, **kwargs)
            finally:  # reported whether or not its inputs pass
                warm.first_call_done(time.perf_counter() - start)
        except RuntimeError as e:
            if not dynamo.is_guard_failure(e):
                raise
            return self._outside(args, kwargs, _refusal(self._traced, e))

    def _outside(self, args: tuple[Any, ...], kwargs: dict[str, Any], why: str) -> Any:
        """A call this entry was not compiled for: the plain backend runs it (warned once)."""
        log = logger.debug if self._guard_warning.given else logger.warning
        self._guard_warning.given = True
        log(
            "isocache: a call of %s differs from what its saved entry was compiled for (%s); such calls run "
            "through torch.compile with the isocache backend, traced in each process",
            self._traced.name,
            why,
        )
        return self._fallback_call(args, kwargs)

    def _fallback_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._fallback is None:
            self._fallback = self._torch_compiled()
        leading = self._traced.leading
        try:
            return self._fallback(*leading, *args, **kwargs)
        except Exception as e:
            if not self._unmark_after(e):
                raise
            self._fallback = self._torch_compiled()
            return self._fallback(*leading, *args, **kwargs)

    def _torch_compiled(self) -> Any:
        """``torch.compile`` of what this entry traces, with the isocache backend (traced at every start)."""
        return torch.compile(self._traced.callable, backend=self._backend, dynamic=self._traced.dynamic)

    def _unmark_after(self, e: BaseException) -> bool:
        """After a failed trace: unmarks the model's blocks (one INFO line) so the next trace takes them one
        by one; False when none were marked (the failure is not theirs)."""
        if self._model is None or not is_marked(self._model):
            return False
        logger.info(
            "isocache: %s: its repeated blocks cannot be traced once (%s); tracing each block in place",
            self._traced.name,
            graph_break(e)[:300],
        )
        unmark_blocks(self._model)
        return True

    def _prepare(self, call: Call) -> None:
        self._call_form = call_form(call.args, call.kwargs)
        self._training = self._model is not None and self._model.training
        tensors = (a for a in (*call.args, *call.kwargs.values()) if isinstance(a, torch.Tensor))
        device = next((t.device for t in tensors), torch.device("cpu"))
        if not dynamo.aot_compile_supported():
            self._trace_every_start(device)
            return
        namespace = self._backend.namespace_for(device)
        # Entries live in this machine's stores only (local, then base stores): small, naming shared pieces.
        local, base = self._backend.local(namespace), self._backend.base(namespace)
        entries = None if local is None and base is None else Entries(local, base)
        started = time.perf_counter()
        key = self._traced.slot(call, namespace.name, self._backend.split)
        manifest = self._traced.manifest()
        found = entries.get(key) if entries is not None else None
        if entries is not None and found is not None:
            try:
                saved = Slot(entries, key, manifest, found.value)
                self._warm = warm_start.load(self._traced, call, saved, self._backend, namespace, started)
                self._compiled = self._warm.compiled
                return
            except EntryRefused as e:
                logger.info("isocache: not using the saved compiled %s: %s; tracing it again", self._traced.name, e)
            except Exception as e:  # a bad entry is rebuilt, never fatal
                logger.warning(
                    "isocache: the saved compiled %s could not be loaded (%s: %s); rebuilding it",
                    self._traced.name,
                    type(e).__name__,
                    e,
                )
        # Nothing saved: this process traces, each stack's block once where it can, while
        # compile workers pay Inductor's fixed cost.
        workers = self._backend.workers(device)
        if self._model is not None:
            mark_blocks(self._model)
        slot = None if entries is None else Slot(entries, key, manifest, found.value if found else None)
        with workers.claim() if workers is not None else contextlib.nullcontext():
            self._compiled = self._trace(call, slot)

    def _trace_every_start(self, device: torch.device) -> None:
        """Without torch's ahead-of-time capture (an older torch): the plain backend, which traces at
        every start (said once)."""
        self._backend.workers(device)  # warm while Dynamo traces
        if self._model is not None:
            mark_blocks(self._model)
        warn_once(
            "aot_compile",
            "isocache: isocache.compile's warm start (saving the traced model) needs torch >= %d.%d "
            "(this is %s); %s uses torch.compile(model, backend='isocache'), which traces at every start",
            *dynamo.AOT_COMPILE_SINCE,
            torch.__version__,
            self._traced.name,
        )

    def _trace(self, call: Call, slot: Slot | None) -> Any:
        """Traces and saves this entry; None (the plain backend then) when it cannot be one graph."""
        try:
            return cold_start.trace_and_save(self._traced, self._backend, call, slot)
        except Exception as e:  # graph breaks and the like: plain isocache
            if self._unmark_after(e):
                return self._trace(call, slot)
            logger.warning(
                "isocache: %s cannot be compiled ahead of time as one graph (%s); "
                "using torch.compile(model, backend='isocache'), which traces at every start",
                self._traced.name,
                graph_break(e)[:300],
            )
            return None
