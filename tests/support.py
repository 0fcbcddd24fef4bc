"""What tests and benchmarks share: models built from configs, inputs, Dynamo capture, process reset.

Models have random weights from a fixed seed and are built from `transformers`
configs; nothing is downloaded. Tests import this module directly (the tests
folder is on ``sys.path``: see conftest.py), benchmarks through
``benches/_common.py``, and subprocess scripts after inserting the folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "DEVICES",
    "HAS_CUDA",
    "MODELS",
    "TESTS",
    "VALIDITY_MODEL",
    "bert",
    "capture",
    "gpt2",
    "llama",
    "reset_process_state",
    "run_python",
    "token_ids",
    "validity_model",
]

TESTS = Path(__file__).resolve().parent
HAS_CUDA = torch.cuda.is_available()
#: Devices the model tests run on; the "cuda" cases are marked and skipped without a GPU (conftest).
DEVICES = ["cpu", "cuda"]


def llama(
    layers: int = 2,
    hidden: int = 64,
    *,
    vocab: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 256,
    lm: bool = False,
) -> torch.nn.Module:
    """A Llama from a config (random weights, fixed seed); `lm`: with its language-model head
    (``LlamaForCausalLM``, which generates)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return (LlamaForCausalLM if lm else LlamaModel)(cfg).eval()


def gpt2(layers: int = 2, hidden: int = 64) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        vocab_size=128,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return GPT2Model(cfg).eval()


def bert(layers: int = 2, hidden: int = 64) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        vocab_size=128,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return BertModel(cfg).eval()


MODELS: dict[str, Callable[..., torch.nn.Module]] = {"llama": llama, "gpt2": gpt2, "bert": bert}

#: A two-block model in two files (``helpers.py``, ``valmodel.py``), for what invalidates a saved entry:
#: a helper in another file, a module global, a plain attribute, a branch on ``training``.
VALIDITY_HELPERS = "import torch\n\ndef helper(x):\n    return torch.relu(x) * {factor}\n"
VALIDITY_MODEL = """
import torch
import helpers

SCALE = 1.0

class Block(torch.nn.Module):
    def __init__(self, alpha=0.5):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.alpha = alpha

    def forward(self, x):
        h = helpers.helper(self.lin(x)) * SCALE * self.alpha
        if self.training:
            h = h + 1
        return h

class Tiny(torch.nn.Module):
    def __init__(self, alpha=0.5):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([Block(alpha) for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x
"""


def validity_model(folder: Path, factor: int = 2) -> Path:
    """Writes the two-block model's source into `folder` (made if needed); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "helpers.py").write_text(VALIDITY_HELPERS.format(factor=factor))
    (folder / "valmodel.py").write_text(VALIDITY_MODEL)
    return folder


def token_ids(batch: int = 1, seq: int = 16, device: str = "cpu", *, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def run_python(
    code: str, cache: Path, *, env: dict[str, str] | None = None, timeout: float = 900, cwd: Path | None = None
) -> dict[str, Any]:
    """Runs `code` in a fresh interpreter with the store at `cache` (``ISOCACHE_DIR``), in `cwd`: the
    JSON object its last line of output prints. Fails the test with the process's stderr when it fails."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {}), "ISOCACHE_DIR": str(cache)},
        timeout=timeout,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return data


def compile_llama(cache: Path, layers: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A Llama compiled with isocache's backend on store `cache`: (its output, eager's output)."""
    import isocache

    model, ids = MODELS["llama"](layers), token_ids()
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        actual = torch.compile(model, backend=isocache.Backend(cache_dir=cache))(ids).last_hidden_state
    return actual, expected


def capture(
    model: torch.nn.Module, *args: Any, dynamic: bool | None = False
) -> list[tuple[torch.fx.GraphModule, list[Any]]]:
    """The Dynamo graphs (and example inputs) of one call of `model`, without compiling."""
    graphs: list[tuple[torch.fx.GraphModule, list[Any]]] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=record, dynamic=dynamic)(*args)
    return graphs


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m isocache ARGS`` in a fresh interpreter, with `env` added to this one's environment."""
    return subprocess.run(
        [sys.executable, "-m", "isocache", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under `root` (links not followed) with its mode, size and modification time (ns): equal
    before and after means nothing there was written."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath, name)
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def read_only(root: Path) -> None:
    """Makes a tree read-only as an image layer or a read-only volume ships it (directories 0555, files
    0444); root can still write it, so a test that must prove nothing is written compares `tree`s too."""
    for folder, _, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
        os.chmod(folder, 0o555)


def reset_process_state() -> None:
    """As a new process would start: Dynamo's caches, isocache's index, counters and warnings."""
    import isocache
    from isocache import _once, compile_workers
    from isocache.tiers.memory import process_index

    torch._dynamo.reset()
    process_index().clear()
    isocache.reset_stats()
    _once.forget()
    compile_workers.shutdown()


class RedisServer:
    """A `redis-server` on a random loopback port."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        tmp.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        password = extra[extra.index("--requirepass") + 1] if "--requirepass" in extra else None
        self.client = redis.Redis(host="127.0.0.1", port=self.port, password=password)
        deadline = time.time() + 10
        while True:
            try:
                self.client.ping()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)

    def connections(self) -> int:
        """Connections the server has accepted so far (this client's included)."""
        return int(self.client.info("stats")["total_connections_received"])

    def values(self) -> dict[bytes, bytes]:
        """Every artifact value isocache could read (leases left out)."""
        return {k: self.client.get(k) for k in self.client.keys("isocache:v1:*") if b":lease:" not in k}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
