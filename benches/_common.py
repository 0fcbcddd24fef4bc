"""Helpers shared by the benchmarks: models from configs, capture, results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import support


def llama(layers: int, hidden: int = 256, *, lm: bool = False) -> torch.nn.Module:
    """The benchmarks' Llama: heads of 64, vocabulary 1024 (random weights, fixed seed); `lm`: with its
    language-model head, for generation."""
    return support.llama(
        layers,
        hidden,
        vocab=1024,
        heads=max(1, hidden // 64),
        kv_heads=max(1, hidden // 128),
        max_positions=512,
        lm=lm,
    )


def qwen2(layers: int, hidden: int = 256) -> torch.nn.Module:
    """A Qwen2 of the same size as `llama` (random weights, fixed seed): the second model family."""
    from transformers import Qwen2Config, Qwen2Model

    cfg = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        vocab_size=1024,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return Qwen2Model(cfg).eval()


#: Model families the startup benchmark builds (``--family``).
FAMILIES: dict[str, Callable[[int, int], torch.nn.Module]] = {"llama": llama, "qwen2": qwen2}


def tokens(seq: int = 64, batch: int = 1) -> torch.Tensor:
    return support.token_ids(batch, seq, vocab=1024, seed=0)


def capture(model: torch.nn.Module, *args: Any) -> list[tuple[torch.fx.GraphModule, list[Any]]]:
    return support.capture(model, *args, dynamic=None)


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    folder = out or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    payload = {"machine": machine(), "argv": sys.argv, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path.write_text(relative_paths(json.dumps(payload, indent=2, default=str)) + "\n")
    return path


ROOT = Path(__file__).resolve().parents[1]


def relative_paths(text: str) -> str:
    """Results name files relative to the repository, never by this machine's paths."""
    return text.replace(str(ROOT) + "/", "")
