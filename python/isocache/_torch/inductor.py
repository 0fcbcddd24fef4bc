"""Inductor: compile a piece, serialize it, load it back; Inductor's config (its cache directory: `inductor_dir`).

Written against torch 2.11-2.15 (``standalone_compile`` with ``aot=True``,
``AOTCompiledArtifact``, ``CompiledArtifact``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import torch
import torch.fx

from .. import _core
from . import inductor_dir, release, runtime

__all__ = [
    "TRAINING_GRAPHS_SINCE",
    "WORKERS_SINCE",
    "Unsupported",
    "changed_config",
    "check_options",
    "compile_piece",
    "config_fingerprint",
    "deserialize",
    "fake_inputs",
    "is_dynamic",
    "mode_options",
    "piece_callable",
    "plain_inductor",
    "probe_cpu_isas",
    "returns_tuple",
    "serialize",
    "workers_supported",
]

logger = logging.getLogger("isocache")


def fake_inputs(gm: torch.fx.GraphModule) -> list[Any] | None:
    """The piece's example inputs as Dynamo traced them (fake tensors, SymInts)."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            break
        value = node.meta.get("example_value", node.meta.get("val"))
        if value is None:
            return None
        out.append(value)
    return out


_probed = False
_probe_lock = threading.Lock()


def probe_cpu_isas() -> None:
    """Once per process, before Inductor's first CPU compile or load: its vector-ISA probe, with one build
    where it would do one per ISA.

    A process's first CPU compile checks every vector ISA the CPU claims
    (AMX, AVX-512 VNNI, AVX-512, AVX2 on a recent x86) by building and
    loading a small program with its flags, about 2 s of compiler time each
    on a fresh Inductor cache, and then uses the first that works. The
    candidates come widest first, each one's flags a superset of the next's
    (AVX2's are implied by AVX-512's), so the compiler and loader that take
    one take every later one: this checks candidates in order with a real
    build and records the rest as passed, in this process's caches (each
    ISA's own extra checks still run). The first usable ISA, the one Inductor
    picks, is the same. Written against torch 2.11-2.15
    (``cpu_vec_isa.supported_vec_isa_list``, ``x86_isa_checker``,
    ``VecISA.check_build``); does nothing where those differ.

    Loading a CPU artifact runs the same check (the kernels' cache keys name
    the ISA), so loads come through here too; with the widest ISA's program
    already in Inductor's cache, this costs a file lookup, a loader process
    per ISA and a compiler run per ISA that fails (tenths of a second). So the
    outcome is recorded in Inductor's private directory, keyed by torch, the
    CPU's flags, the candidates and the compiler binary; a later process
    with the same takes it from there.
    """
    global _probed
    with _probe_lock:
        if not _probed:
            _probe()
            _probed = True


def _probe() -> None:
    import platform

    try:
        from torch._inductor import cpu_vec_isa

        if platform.machine() not in ("x86_64", "AMD64"):
            return
        flags = cpu_vec_isa.x86_isa_checker()
        candidates = [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]
        if not all(callable(getattr(isa, "check_build", None)) for isa in candidates):
            return
    except (ImportError, AttributeError):
        return
    names = [str(isa) for isa in candidates]
    record = _isa_record(flags, names)
    known = record.read() if record is not None else None
    if known in names or known == _NO_ISA:
        # An earlier process on this machine probed the same candidates with the same compiler:
        # its outcome, without building or starting a loader process (tenths of a second, and a
        # compiler run per ISA that fails, at every start).
        first = names.index(known) if known in names else len(names)
        for k, isa in enumerate(candidates):
            _check_without_building(isa, passed=k >= first)
        return
    for k, isa in enumerate(candidates):
        if isa:  # built and loaded (or found in Inductor's cache)
            for narrower in candidates[k + 1 :]:
                _check_without_building(narrower)
            if record is not None:
                record.write(names[k])
            return
    if record is not None:
        record.write(_NO_ISA)


_NO_ISA = "none"


class _IsaRecord:
    """The probe's outcome, one line in Inductor's private directory (trusted as the artifacts there
    are), named by what it depends on: torch, the CPU's flags, the candidates and the compiler."""

    def __init__(self, name: str) -> None:
        self.name = name

    def read(self) -> str | None:
        fd = inductor_dir.open_file(self.name)
        if fd is None:
            return None
        with os.fdopen(fd, "r") as f:
            return f.read(64).strip() or None

    def write(self, outcome: str) -> None:
        fd = inductor_dir.open_file(self.name)
        if fd is not None:
            with os.fdopen(fd, "w") as f:
                f.write(outcome + "\n")


def _isa_record(flags: Any, names: list[str]) -> _IsaRecord | None:
    import hashlib
    import shutil

    from torch._inductor import config as inductor_config

    compilers = []
    for name in [os.environ.get("CXX"), *getattr(inductor_config.cpp, "cxx", ())]:
        path = shutil.which(name) if name else None
        if path:
            st = os.stat(path)
            compilers.append(f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}")
    if not compilers or inductor_dir.in_use() is None:
        return None  # Inductor finds its compiler another way, or no private directory: probe as it does
    basis = repr((torch.__version__, sorted(flags), names, compilers, inductor_config.cpp.vec_isa_ok))
    return _IsaRecord(f"isocache-vec-isa-{hashlib.sha256(basis.encode()).hexdigest()[:24]}")


def _check_without_building(isa: Any, passed: bool = True) -> None:
    """Runs `isa`'s check (cached per process by Inductor) with its build taken as `passed`."""
    vars(isa)["check_build"] = lambda code: passed  # this instance only, for this one call
    try:
        bool(isa)
    finally:
        vars(isa).pop("check_build", None)


def _portable_config() -> dict[str, Any]:
    """Inductor's settings that shape compiled code, as its own cache keys them: without those that
    hold paths or only steer the compile (``_cache_config_ignore_prefix``: the CUTLASS directories, one
    of them the working directory, compile threads, trace options) and without private ones."""
    import torch._inductor.config as inductor_config

    # What ``save_config_portable`` selects, without its serializer, which imports Inductor's compiler
    # (``torch._inductor.choices``: 0.4 s that a warm start does not otherwise pay).
    prefixes = ["_", *getattr(inductor_config, "_cache_config_ignore_prefix", [])]
    try:
        config: dict[str, Any] = inductor_config._get_dict(ignored_prefixes=prefixes)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # pragma: no cover - a config module without it
        config = {k: v for k, v in inductor_config.get_config_copy().items() if not k.endswith("_dir")}
    return config


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _setting_text(value: Any) -> str:
    """A setting's value as text that is the same in every process (a function by its name, not its address)."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    return _ADDRESS.sub("", repr(value))


def config_fingerprint() -> str:
    """A fingerprint of Inductor's configuration, portable: the same in another working directory,
    virtual environment or machine of the same kind (see `_portable_config`)."""
    config = _portable_config()
    text = "\n".join(f"{k}={_setting_text(config[k])}" for k in sorted(config))
    return _core.blake3_hex(text.encode())[:32]


def changed_config() -> dict[str, str]:
    """Inductor's settings that differ from their defaults, as ``{name: repr(value)}``: what the
    fingerprint hashes, readable (a namespace's description names them)."""
    import torch._inductor.config as inductor_config

    try:
        # Values, not "was it set": torch sets some settings to their default value while compiling.
        current = _portable_config()
        defaults = {name: entry.default for name, entry in inductor_config._config.items()}  # type: ignore[attr-defined]
    except AttributeError:  # a config module without the per-entry defaults this reads
        return {}
    changed = {}
    for name in sorted(current.keys() & defaults.keys()):
        try:
            same = bool(current[name] == defaults[name])
        except Exception:  # a value that does not compare: shown
            same = False
        if not same:
            changed[name] = _setting_text(current[name])
    return changed


def _owner(name: str) -> tuple[Any, str] | None:
    """The config module that holds Inductor option `name` and its key there (None: no such option).
    Written against torch 2.11-2.15 (``torch._inductor.config``; from 2.15 also
    ``get_compile_option_owner`` for a device's own options)."""
    import torch._inductor.config as inductor_config

    if name in inductor_config.get_config_copy():
        return inductor_config, name
    try:
        from torch._inductor.codegen.common import get_compile_option_owner, init_backend_registration
    except ImportError:
        return None
    init_backend_registration()
    owner = get_compile_option_owner(name)
    if owner is None or owner[1] not in owner[0].get_config_copy():
        return None
    return owner


def check_options(options: dict[str, Any], what: str = "inductor_options") -> dict[str, Any]:
    """`options` as Inductor config patches (``max-autotune`` spelled ``max_autotune``), checked as
    ``torch.compile(options=...)`` checks them: a ValueError names an unknown option with the nearest
    valid names, or a value of the wrong type with the type expected."""
    import difflib
    import typing

    import torch._inductor.config as inductor_config

    checked: dict[str, Any] = {}
    for key, value in options.items():
        if not isinstance(key, str):
            raise ValueError(f"{what}: option names are strings, got {key!r}")
        name = key.replace("-", "_")
        owner = _owner(name)
        if owner is None:
            near = difflib.get_close_matches(name, list(inductor_config.get_config_copy()), n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(repr(n) for n in near)}? " if near else ""
            raise ValueError(
                f"{what}: {key!r} is not an Inductor option; {hint}torch._inductor.list_options() lists the valid names"
            )
        module, attr = owner
        expected = module.get_type(attr)
        if typing.get_origin(expected) is None and isinstance(expected, type) and not isinstance(value, expected):
            raise ValueError(f"{what}: {key!r} takes a {expected.__name__}, got {type(value).__name__} {value!r}")
        checked[name] = value
    return checked


def mode_options(mode: str) -> dict[str, Any]:
    """The Inductor options a ``torch.compile`` mode sets (``torch._inductor.list_mode_options``); a
    ValueError names the modes for an unknown one."""
    from torch._inductor import list_mode_options

    modes = list_mode_options()
    if mode not in modes:
        raise ValueError(f"mode={mode!r} is not a torch.compile mode: expected one of {', '.join(map(repr, modes))}")
    return dict(modes[mode])


def is_dynamic(example_inputs: Sequence[Any]) -> bool:
    """True when any input is symbolic (a SymInt or a tensor with symbolic sizes)."""
    for value in example_inputs:
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return True
        if isinstance(value, torch.Tensor) and any(
            isinstance(s, torch.SymInt) for s in (*value.shape, *value.stride())
        ):
            return True
    return False


def compile_piece(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict[str, Any] | None = None,
) -> Any:
    """Compiles one piece with Inductor into a serializable `CompiledArtifact`."""
    from torch._inductor import standalone_compile

    if all(v.device.type == "cpu" for v in example_inputs if isinstance(v, torch.Tensor)):
        probe_cpu_isas()
    dynamic_shapes = "from_graph" if is_dynamic(example_inputs) else "from_example_inputs"
    # aot=True bundles the compiled code into the artifact itself: loading it
    # needs neither Inductor's cache directory nor an import of compile_fx
    # (about a second of a warm start).
    return standalone_compile(
        gm,
        list(example_inputs),
        dynamic_shapes=dynamic_shapes,  # type: ignore[arg-type]
        options={"config_patches": dict(options or {})},
        aot=True,
    )


@contextlib.contextmanager
def _private_file() -> Iterator[str]:
    fd, path = tempfile.mkstemp(prefix="isocache-", suffix=".bin")
    os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


#: Prefix of a bundled (``aot=True``) artifact in isocache's own framing. The
#: namespace already pins the torch build, so the artifact skips torch's
#: ``torch_key()`` check, which hashes torch's sources (about 0.4 s a process).
_BUNDLED = b"ISOCAOT1"


class Unsupported(Exception):
    """A feature this torch does not have (one warning per process names it and the torch it needs)."""

    def __init__(self, feature: str, needs: str) -> None:
        super().__init__(f"{feature} needs torch >= {needs} (this is {torch.__version__})")
        self.feature = feature


#: Shim, torch 2.11-2.12: AOTAutograd gives a compiled *training* graph no serializer
#: (``compiled_fn.serialize`` is None, and the binary format has no AOTAutograd entry
#: either); torch 2.13 saves them.
TRAINING_GRAPHS_SINCE = (2, 13)

#: Shim, torch 2.11-2.14: their graph pickler cannot send a piece with a view in it to a
#: compile worker (a view's fake-tensor metadata pickles its base's fake mode, which holds a
#: WeakValueDictionary; checked on 2.11-2.15 with a graph that transposes). Every attention
#: piece has one, so compile workers need torch 2.15; older torch compiles in the process.
WORKERS_SINCE = (2, 15)


def workers_supported() -> bool:
    """Whether pieces compiled by compile workers come back as artifacts this torch can save."""
    return release() >= WORKERS_SINCE


def serialize(artifact: Any) -> bytes:
    """The artifact's bytes: bundled artifacts in isocache's framing, others in Inductor's `binary` format.

    Raises `Unsupported` where this torch cannot save the artifact at all.
    """
    bundled = getattr(artifact, "serialize", None)
    if callable(bundled):
        try:
            data = bundled()
        except TypeError as e:
            if release() < TRAINING_GRAPHS_SINCE:
                needs = "{}.{}".format(*TRAINING_GRAPHS_SINCE)
                raise Unsupported("sharing compiled training graphs across processes", needs) from e
            raise
        assert isinstance(data, bytes)
        return _BUNDLED + runtime.lighten(data)
    to_bytes = getattr(artifact, "_to_binary_bytes", None)
    if callable(to_bytes):
        data = to_bytes()
        assert isinstance(data, bytes)
        return data
    with _private_file() as path:
        artifact.save(path=path, format="binary")
        with open(path, "rb") as f:
            return f.read()


def deserialize(data: bytes) -> Any:
    """Loads an artifact from `serialize`'s bytes."""
    if data.startswith(_BUNDLED):
        from torch._inductor.standalone_compile import AOTCompiledArtifact

        with runtime.graph_lowering_deferred():
            return AOTCompiledArtifact.deserialize(data[len(_BUNDLED) :])
    from torch._inductor.standalone_compile import CompiledArtifact

    with _private_file() as path:  # Inductor reads its binary format from a file
        with open(path, "wb") as f:
            f.write(data)
        return CompiledArtifact.load(path=path, format="binary")


def returns_tuple(gm: torch.fx.GraphModule) -> bool:
    """Whether the piece returns a sequence (else one value)."""
    from torch._inductor.compile_fx import graph_returns_tuple

    return bool(graph_returns_tuple(gm))


def piece_callable(artifact: Callable[..., Any], returns_tuple: bool) -> Callable[..., Any]:
    """Adapts an artifact to the piece's calling convention.

    A freshly compiled artifact may return what the graph returns, but a
    loaded one always returns a sequence; a piece with one output gets it unwrapped.
    """
    if returns_tuple:
        return artifact

    def single_output(*args: Any) -> Any:
        out = artifact(*args)
        return out[0] if isinstance(out, (list, tuple)) else out

    return single_output


def plain_inductor(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """Inductor as `torch.compile` would run it, without isocache's store."""
    from torch._inductor.compile_fx import compile_fx

    # compile_fx rewrites the graph module it is given (pytorch#138980); the
    # caller may still need the original, e.g. to run it eagerly.
    compiled: Any = compile_fx(copy.deepcopy(gm), list(example_inputs))
    assert callable(compiled)
    return compiled  # type: ignore[no-any-return]
