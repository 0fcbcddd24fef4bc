"""A model zoo: each architecture built from a small config (random weights, no downloads), compiled with
isocache at 2 and then 4 repeated blocks on one store.

For each: outputs equal eager, and the 4-block model compiles nothing new
(its pieces are the 2-block model's: flat in depth). Models without an
attention op in their blocks (Gemma-2's hand-written attention, Mamba, ResNet)
are cut at their repeated blocks (``split="auto"``) and reuse pieces.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import transformers

from isocache.backend import Backend
from isocache.report import counters
from isocache.split import SPLIT_MODES, split_graph
from support import MODELS, capture, token_ids

Inputs = dict[str, Any]
Zoo = Callable[[int], tuple[torch.nn.Module, Inputs]]


def mixtral(blocks: int) -> tuple[torch.nn.Module, Inputs]:
    config = transformers.MixtralConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=blocks,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=128,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.MixtralModel(config).eval(), {"input_ids": token_ids()}


def gemma2(blocks: int) -> tuple[torch.nn.Module, Inputs]:
    config = transformers.Gemma2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=blocks,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        max_position_embeddings=256,
        sliding_window=8,
        attn_implementation="eager",  # soft-capped attention, written out: no SDPA call
    )
    torch.manual_seed(0)
    # Without a cache: Gemma-2's cache makes a window-size tensor per sliding layer before the first block,
    # so the piece before the blocks grows with depth whatever the cut.
    return transformers.Gemma2Model(config).eval(), {"input_ids": token_ids(), "use_cache": False}


def t5(blocks: int) -> tuple[torch.nn.Module, Inputs]:
    config = transformers.T5Config(
        d_model=64, d_ff=128, num_layers=blocks, num_decoder_layers=blocks, num_heads=2, d_kv=32, vocab_size=128
    )
    torch.manual_seed(0)
    ids = token_ids()
    return transformers.T5Model(config).eval(), {"input_ids": ids, "decoder_input_ids": ids[:, :8]}


def vit(blocks: int) -> tuple[torch.nn.Module, Inputs]:
    config = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=blocks,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.ViTModel(config).eval(), {"pixel_values": torch.randn(1, 3, 32, 32)}


def whisper(blocks: int) -> tuple[torch.nn.Module, Inputs]:
    config = transformers.WhisperConfig(
        d_model=64,
        encoder_layers=blocks,
        decoder_layers=blocks,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=16,
        max_source_positions=16,
        max_target_positions=32,
        vocab_size=128,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    features = torch.randn(1, 16, 32)  # 32 frames -> 16 positions after the strided convolution
    return transformers.WhisperModel(config).eval(), {"input_features": features, "decoder_input_ids": token_ids()}


def mamba(blocks: int) -> tuple[torch.nn.Module, Inputs]:
    config = transformers.MambaConfig(hidden_size=64, state_size=8, num_hidden_layers=blocks, vocab_size=128)
    torch.manual_seed(0)
    return transformers.MambaModel(config).eval(), {"input_ids": token_ids(), "use_cache": False}


def resnet(blocks: int) -> tuple[torch.nn.Module, Inputs]:
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[blocks, blocks], layer_type="basic"
    )
    torch.manual_seed(0)
    return transformers.ResNetModel(config).eval(), {"pixel_values": torch.randn(1, 3, 32, 32)}


def unet(blocks: int) -> tuple[torch.nn.Module, Inputs]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=blocks,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    inputs = {
        "sample": torch.randn(1, 4, 8, 8),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(1, 4, 16),
        "return_dict": False,
    }
    return model.eval(), inputs


def _support_model(name: str) -> Zoo:
    """A model of `support.MODELS` (Llama, GPT-2, BERT) with its token inputs."""
    return lambda blocks: (MODELS[name](blocks), {"input_ids": token_ids()})


ZOO: dict[str, Zoo] = {
    "unet": unet,
    **{name: _support_model(name) for name in MODELS},
    "mixtral": mixtral,
    "gemma2": gemma2,
    "t5": t5,
    "vit": vit,
    "whisper": whisper,
    "mamba": mamba,
    "resnet": resnet,
}

#: Models whose blocks have no attention op: cut at the blocks, and reuse.
NO_ATTENTION_OP = {"gemma2", "mamba", "resnet"}


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    tensor: torch.Tensor = output[0]
    return tensor


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_equals_eager_and_is_flat_in_depth(name: str, tmp_path: Path) -> None:
    store = tmp_path / "store"
    for blocks in (2, 4):
        model, inputs = ZOO[name](blocks)
        torch._dynamo.reset()
        with torch.no_grad():
            expected = _first_tensor(model(**inputs))
            before = counters.snapshot()
            compiled = torch.compile(model, backend=Backend(cache_dir=store, compile_workers=0))
            actual = _first_tensor(compiled(**inputs))
            change = counters.snapshot().minus(before)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4, msg=f"{name} with {blocks} blocks")
        assert change.failed == 0, name
        if blocks == 2:
            assert change.compiled > 0, name
        else:
            assert change.compiled == 0, f"{name}: 4 blocks compile nothing the 2-block model did not"
            if name in NO_ATTENTION_OP:
                assert change.reused > 0, f"{name}: its repeated blocks share pieces"


class _IndexedBlock(torch.nn.Module):
    """A block that adds its own index to the hidden state: a per-layer constant."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.linear = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x)) + self.index


class _IndexedStack(torch.nn.Module):
    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_IndexedBlock(i) for i in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_per_layer_constant_is_named_in_one_info_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="isocache")
    torch.manual_seed(0)
    model, x = _IndexedStack(5).eval(), torch.randn(2, 16)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(x)
        actual = torch.compile(model, backend=Backend(cache_dir=False, compile_workers=0))(x)
    torch.testing.assert_close(actual, expected)
    lines = [r.getMessage() for r in caplog.records if "line up as repeated blocks" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "constant 1" in lines[0] and "2" in lines[0], lines[0]


def test_split_modes_choose_where_a_graph_is_cut() -> None:
    model, inputs = ZOO["llama"](3)
    ((gm, _),) = capture(model, inputs["input_ids"])
    counts = {}
    for mode in SPLIT_MODES:
        backend = Backend(cache_dir=False, compile_workers=0, split=mode)
        counts[mode] = len(split_graph(gm, backend.splitting_ops, mode).pieces)
    assert counts["attention"] == counts["auto"] == 7, "3 attention ops: 3 pieces of their own and 4 between"
    assert counts["blocks"] == 5, "before the blocks, 3 blocks, after them"
    with pytest.raises(ValueError, match="split='rows'"):
        Backend(split="rows")


def test_a_vmap_inside_a_block_stays_in_one_piece() -> None:
    # Mamba's scan runs torch.vmap; Dynamo records no module path for the node that pops the
    # vmap level. Cutting before it left a level pushed by one piece and popped by another
    # (Dynamo's guard check failed on an empty Inductor cache).
    model, inputs = ZOO["mamba"](2)
    model.config.use_cache = False
    ((gm, _),) = capture(model, inputs["input_ids"])
    backend = Backend(cache_dir=False, compile_workers=0)
    pieces = split_graph(gm, backend.splitting_ops, "auto").pieces
    levels = []
    for piece in pieces:
        names = [getattr(n.target, "__name__", "") for n in piece.module.graph.nodes]
        levels.append(names.count("_vmap_increment_nesting") - names.count("_vmap_decrement_nesting"))
    assert levels == [0] * len(pieces), levels
    with_vmap = sum("_vmap_increment_nesting" in str(p.module.code) for p in pieces)
    if with_vmap == 0:
        pytest.skip("this torch's Dynamo traces Mamba's torch.vmap without vmap-level nodes")
    assert with_vmap == 2, "one piece per block"
