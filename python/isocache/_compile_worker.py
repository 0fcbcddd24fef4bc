"""A compile worker process: `main` (``<device> --reply-fd N``).

Started by `compile_workers.CompileWorkers` with the parent's import path. It warms Inductor up (imports,
the vector-ISA probe, the precompiled header: the fixed cost of a process's
first compile) while its parent traces, then compiles the pieces it is sent
and hands the artifacts back as bytes. It never touches the store: the parent
publishes under its leases.

The protocol is length-prefixed pickles on a pipe of its own (Inductor and
torch may print to stdout): the parent writes requests to the worker's stdin,
the worker writes replies to the descriptor named by ``--reply-fd``. Stdin
reaching its end means the parent is gone: the worker exits, so it never
outlives the process that started it.
"""

from __future__ import annotations

import argparse
import os
import pickle
import struct
import sys
import time
from typing import Any, BinaryIO

_LENGTH = struct.Struct("<Q")
#: A worker yields the CPU to its parent, whose tracing is the critical path of a cold start.
_NICENESS = 10

#: Replies: ("ready", warm-up seconds, None) once, then ("ok", payload, seconds) or ("error", message, seconds).
Reply = tuple[str, Any, float]


def write_frame(stream: BinaryIO, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: BinaryIO) -> Any:
    """The next frame, or raises EOFError when the other end closed."""
    header = _read_exactly(stream, _LENGTH.size)
    (length,) = _LENGTH.unpack(header)
    return pickle.loads(_read_exactly(stream, length))  # our own parent or child, over a private pipe


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    chunks = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            raise EOFError("the other end closed the pipe")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _warm_up(device: str) -> None:
    """One tiny compile: pays the imports, the ISA probe and the precompiled header before real pieces arrive."""
    import torch

    from isocache._torch import inductor

    def tiny(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = x @ w
        return torch.nn.functional.silu(h) * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)

    gm = torch.fx.symbolic_trace(tiny)
    inputs = [torch.randn(4, 8, device=device), torch.randn(8, 8, device=device)]
    with torch.no_grad():
        inductor.compile_piece(gm, inputs)


def _compile(blob: bytes, grad_enabled: bool, options: dict[str, Any], where: tuple[str, int, int] | None) -> bytes:
    import torch

    from isocache._torch import fx, inductor, inductor_dir

    if where is not None:  # the parent's checked directory, still the same one: compile there
        inductor_dir.use_held(where)
    gm = fx.unpickle_graph(blob)
    inputs = inductor.fake_inputs(gm)
    if inputs is None:
        raise ValueError("the piece's inputs carry no example values")
    with torch.set_grad_enabled(grad_enabled):
        artifact = inductor.compile_piece(gm, inputs, options)
    return inductor.serialize(artifact)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("device")
    parser.add_argument("--reply-fd", type=int, required=True)
    args = parser.parse_args()
    replies = os.fdopen(args.reply_fd, "wb")
    requests = sys.stdin.buffer
    os.dup2(2, 1)  # whatever torch prints goes to stderr, never into the protocol
    # The parent's tracing is the critical path while this warms up: on a busy machine, it goes first.
    os.nice(_NICENESS)

    start = time.perf_counter()
    try:
        _warm_up(args.device)
        write_frame(replies, ("ready", None, time.perf_counter() - start))
    except Exception as e:  # a worker that cannot compile says so and stops
        write_frame(replies, ("error", f"warm-up failed: {type(e).__name__}: {e}", time.perf_counter() - start))
        return 1
    while True:
        try:
            blob, grad_enabled, options, where = read_frame(requests)
        except EOFError:
            return 0  # the parent is gone
        start = time.perf_counter()
        try:
            reply: Reply = ("ok", _compile(blob, grad_enabled, options, where), 0.0)
        except Exception as e:
            reply = ("error", f"{type(e).__name__}: {e}", 0.0)
        write_frame(replies, (reply[0], reply[1], time.perf_counter() - start))


if __name__ == "__main__":
    sys.exit(main())
