"""Shared fixtures: tiny `transformers` models from configs, Dynamo capture."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Keep compiles on the two CI cores predictable and quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def tiny_llama(layers: int = 2, hidden: int = 64) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaModel(cfg).eval()


def tiny_gpt2(layers: int = 2, hidden: int = 64) -> torch.nn.Module:
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


def tiny_bert(layers: int = 2, hidden: int = 64) -> torch.nn.Module:
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


MODELS: dict[str, Callable[..., torch.nn.Module]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
}


def token_ids(batch: int = 1, seq: int = 16, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (batch, seq), generator=g).to(device)


def capture(
    model: torch.nn.Module, *args: Any, dynamic: bool | None = False
) -> list[tuple[torch.fx.GraphModule, list[Any]]]:
    """The Dynamo graphs (and example inputs) of one call of `model`."""
    graphs: list[tuple[torch.fx.GraphModule, list[Any]]] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=record, dynamic=dynamic)(*args)
    return graphs


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh private ISOCACHE_DIR for the test."""
    d = tmp_path / "isocache"
    monkeypatch.setenv("ISOCACHE_DIR", str(d))
    return d


@pytest.fixture
def caplog_isocache(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="isocache")
    return caplog
