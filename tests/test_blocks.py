"""Repeated blocks: found per model, traced once by Dynamo, cut into the same pieces as a whole trace."""

from __future__ import annotations

import copy
import logging
import types
from typing import Any

import pytest
import torch
import transformers

import isocache
from conftest import MODELS, token_ids
from isocache import blocks, marking
from isocache._torch import fx
from isocache.backend import Backend
from isocache.report import counters


def t5(layers: int = 3) -> torch.nn.Module:
    config = transformers.T5Config(
        d_model=64, d_ff=128, num_layers=layers, num_decoder_layers=layers, num_heads=2, d_kv=32, vocab_size=1024
    )
    torch.manual_seed(0)
    return transformers.T5Model(config).eval()


def without_cache(model: torch.nn.Module) -> torch.nn.Module:
    model.config.use_cache = False
    return model


@pytest.mark.parametrize(
    "name,expected",
    [("llama", ["layers[0..2]"]), ("gpt2", ["h[0..2]"]), ("bert", ["encoder.layer[0..2]"])],
)
def test_stacks_are_found(name: str, expected: list[str]) -> None:
    stacks = blocks.find_blocks(MODELS[name](3))
    assert [label for label, _ in stacks] == expected
    assert all(len(members) == 3 for _, members in stacks)


def test_encoder_and_decoder_stacks_are_separate() -> None:
    stacks = blocks.find_blocks(t5())
    # The first block of each T5 stack alone holds the relative position bias: it stays out.
    assert [(label, len(members)) for label, members in stacks] == [
        ("encoder.block[1..2]", 2),
        ("decoder.block[1..2]", 2),
    ]


def test_blocks_that_differ_in_a_constant_are_not_a_stack() -> None:
    config = transformers.GPT2Config(n_layer=3, n_embd=64, n_head=2, scale_attn_by_inverse_layer_idx=True)
    assert blocks.find_blocks(transformers.GPT2Model(config)) == [], "each layer scales attention by its index"


def test_a_model_without_repeated_blocks_is_left_alone() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    assert blocks.find_blocks(model) == []
    assert isocache.mark_blocks(model) == 0
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_marking_changes_one_instance_and_can_be_undone() -> None:
    model, other = MODELS["llama"](2), MODELS["llama"](2)
    assert isocache.mark_blocks(model) == 2
    assert isocache.mark_blocks(model) == 0, "marking again changes nothing"
    assert all("forward" not in layer.__dict__ for layer in other.layers), "other instances are untouched"
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, other(ids).last_hidden_state)
    assert isocache.unmark_blocks(model) == 2
    assert all("forward" not in layer.__dict__ for layer in model.layers)


def dynamo_graph(model: torch.nn.Module, *args: Any) -> torch.fx.GraphModule:
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=record)(*args)
    (gm,) = graphs
    return gm


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_dynamo_traces_a_marked_block_once_and_pieces_stay_the_same(name: str) -> None:
    model, ids = without_cache(MODELS[name](4)), token_ids()
    whole = Backend(cache_dir=False, compile_workers=0)
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        torch._dynamo.reset()
        unmarked = whole.compile_graph(dynamo_graph(model, ids), [])  # digests only need the graph's metadata
    isocache.mark_blocks(model)
    gm = dynamo_graph(model, ids)
    regions = {
        n.args[0].target for n in gm.graph.nodes if n.op == "call_function" and "invoke_subgraph" in str(n.target)
    }
    assert fx.region_call_count(gm) == 4 and len(regions) == 1, "one traced block, called at 4 sites"
    torch._dynamo.reset()
    # Every piece is already in memory from the whole trace: equal digests make them all REUSE.
    with torch.no_grad(), counters.expect(compiled=0, reused=5, failed=0):
        actual = torch.compile(model, backend=Backend(cache_dir=False, compile_workers=0))(ids).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # grad mode is part of the namespace
        marked = Backend(cache_dir=False, compile_workers=0).compile_graph(dynamo_graph(model, ids), [])
    assert [d for _, d in marked.pieces] == [d for _, d in unmarked.pieces], "the same pieces, the same digests"


def region_reuses(model: torch.nn.Module, *args: Any) -> int:
    """How many calls of a marked block Dynamo answered from an earlier trace of it (not traced again)."""
    reuses = 0

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            nonlocal reuses
            reuses += "reusing subgraph" in record.getMessage()

    handler = Count(logging.DEBUG)
    logger = logging.getLogger("torch._dynamo.variables.invoke_subgraph")
    torch._logging.set_logs(hierarchical_compile=True)
    logger.addHandler(handler)
    try:
        dynamo_graph(model, *args)
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()
    return reuses


def kernel_routed_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose class forward is the ``kernels`` package's routing (transformers 5's attention)."""
    return [m for m in model.modules() if isinstance(m.__dict__.get("_kernel_funcs"), dict)]


@pytest.mark.skipif(
    not hasattr(torch._dynamo.variables, "invoke_subgraph"), reason="this torch traces every region call"
)
def test_dynamo_replays_a_marked_block_instead_of_tracing_it_again() -> None:
    model, ids = without_cache(MODELS["llama"](4)), token_ids()
    if not kernel_routed_modules(model):
        pytest.skip("this transformers routes no kernels")
    isocache.mark_blocks(model)
    assert region_reuses(model, ids) == 3, "blocks 1-3 replay block 0's trace (kernels' routing is no side effect)"


def test_a_kernelized_function_is_routed_as_in_eager_before_and_after_compiling() -> None:
    model, ids = without_cache(MODELS["llama"](3)), token_ids()
    routed = kernel_routed_modules(model)
    if not routed:
        pytest.skip("this transformers routes no kernels")

    def no_rotation(self: Any, q: torch.Tensor, k: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return q, k  # what a kernel could do differently: here, leave out the rotary embedding

    def kernelize(module: torch.nn.Module) -> None:
        for kernel in module.__dict__["_kernel_funcs"].values():
            kernel.forward = types.MethodType(no_rotation, kernel)

    with torch.no_grad():
        plain = model(ids).last_hidden_state
        kernelize(routed[1])  # one block's attention only: the blocks now differ in what they run
        expected = model(ids).last_hidden_state
        assert not torch.allclose(plain, expected)
        isocache.mark_blocks(model)
        compiled = torch.compile(model, backend=Backend(cache_dir=False, compile_workers=0))
        torch.testing.assert_close(compiled(ids).last_hidden_state, expected, rtol=1e-4, atol=1e-4)
        for module in routed:  # after compiling: every block kernelized; the guards see it
            kernelize(module)
        expected = model(ids).last_hidden_state
        torch.testing.assert_close(compiled(ids).last_hidden_state, expected, rtol=1e-4, atol=1e-4)
        for module in routed:  # and undone
            for kernel in module.__dict__["_kernel_funcs"].values():
                del kernel.forward
        torch.testing.assert_close(compiled(ids).last_hidden_state, plain, rtol=1e-4, atol=1e-4)
    isocache.unmark_blocks(model)
    assert all("forward" not in m.__dict__ for m in model.modules()), "unmarking undoes the unrouted forwards"


def test_gradients_through_marked_blocks_equal_eager() -> None:
    model, ids = without_cache(MODELS["llama"](3)).train(), token_ids()
    reference = without_cache(MODELS["llama"](3)).train()
    reference.load_state_dict(model.state_dict())
    isocache.mark_blocks(model)
    compiled = torch.compile(model, backend=Backend(cache_dir=False, compile_workers=0))
    compiled(ids).last_hidden_state.pow(2).mean().backward()
    reference(ids).last_hidden_state.pow(2).mean().backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def cache_tensors(output: Any) -> list[torch.Tensor]:
    cache = output.past_key_values
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_prefill_with_an_empty_kv_cache_traces_a_block_once_and_fills_the_cache_as_eager(name: str) -> None:
    model, ids = MODELS[name](4), token_ids()  # use_cache: the model makes an empty DynamicCache
    with torch.no_grad():
        expected = model(ids)
    isocache.mark_blocks(model)
    gm = dynamo_graph(model, ids)
    assert fx.region_call_count(gm) == 4, "one traced block, called at 4 sites, the cache updated outside it"
    torch._dynamo.reset()
    with torch.no_grad(), counters.expect(failed=0):
        actual = torch.compile(model, backend=Backend(cache_dir=False, compile_workers=0))(ids)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, rtol=1e-4, atol=1e-4)
    got, want = cache_tensors(actual), cache_tensors(expected)
    assert len(got) == len(want) == 8
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_pieces_of_a_prefill_are_flat_in_depth() -> None:
    distinct = []
    for layers in (2, 4):
        model, ids = MODELS["llama"](layers), token_ids()
        isocache.mark_blocks(model)
        with torch.no_grad():
            split = Backend(cache_dir=False, compile_workers=0).compile_graph(dynamo_graph(model, ids), [])
        distinct.append(len({d for _, d in split.pieces}))
    assert distinct == [3, 3], "first block, the repeated block, last block"


def test_a_block_given_a_cache_with_past_tokens_is_traced_in_place_with_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="isocache")
    model, ids = MODELS["llama"](3), token_ids()
    isocache.mark_blocks(model)
    with torch.no_grad():
        past = model(ids[:, :-1]).past_key_values  # a decode step: each layer appends to what it holds
        expected = model(ids[:, -1:], past_key_values=copy.deepcopy(past)).last_hidden_state
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=Backend(cache_dir=False, compile_workers=0))
        actual = compiled(ids[:, -1:], past_key_values=copy.deepcopy(past)).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    lines = [r.getMessage() for r in caplog.records if "traced in place" in r.getMessage()]
    assert len(lines) == 1 and "KV cache" in lines[0], lines


def test_without_nested_regions_nothing_is_marked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.compiler, "nested_compile_region")
    model = MODELS["llama"](2)
    assert isocache.mark_blocks(model) == 0
    assert all("forward" not in layer.__dict__ for layer in model.layers)


def test_isocache_compile_marks_blocks_and_a_later_start_loads(cache_dir: Any) -> None:
    from isocache._torch import dynamo

    if not dynamo.aot_compile_supported():
        pytest.skip("isocache.compile's warm start needs a newer torch (tests/test_torch_versions.py)")
    model, ids = without_cache(MODELS["llama"](3)), token_ids()
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        with counters.expect(compiled=3, models_loaded=0):
            first = isocache.compile(model)(ids).last_hidden_state
    assert all("forward" in layer.__dict__ for layer in model.layers), "isocache.compile marked the blocks"
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-4)
    from support import reset_process_state

    reset_process_state()
    fresh = without_cache(MODELS["llama"](3))
    with torch.no_grad(), counters.expect(compiled=0, loaded=3, models_loaded=1):
        again = isocache.compile(fresh)(ids).last_hidden_state
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-4)


class _AliasingBlock(torch.nn.Module):
    """Returns two outputs that alias each other: a region traced once may not."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.linear(x)
        return y, y.view(-1)


class _AliasingStack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_AliasingBlock() for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x, flat = block(x)
            x = torch.relu(x) + flat.sum()
        return x


@pytest.mark.parametrize("aot", [True, False], ids=["isocache.compile", "fallback backend"])
def test_blocks_that_cannot_be_traced_once_are_traced_in_place_with_one_info_line(
    aot: bool, cache_dir: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from isocache._torch import dynamo

    if not aot:  # the path isocache.compile takes on a torch without ahead-of-time capture
        monkeypatch.setattr(dynamo, "aot_compile_supported", lambda: False)
    caplog.set_level(logging.INFO, logger="isocache")
    torch.manual_seed(0)
    model, x = _AliasingStack().eval(), torch.randn(4, 8)
    with torch.no_grad():
        expected = model(x)
        actual = isocache.compile(model)(x)
    torch.testing.assert_close(actual, expected)
    lines = [r.getMessage() for r in caplog.records if "cannot be traced once" in r.getMessage()]
    assert len(lines) == 1 and "_AliasingStack" in lines[0] and "alias" in lines[0], lines
    assert not marking.is_marked(model)
