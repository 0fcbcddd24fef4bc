"""Generation: ``generate()`` through isocache's compiled forwards, cold and in a fresh process."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from isocache._torch import dynamo
from support import run_python

TESTS = Path(__file__).resolve().parent

# isocache.compile's warm start rests on torch's ahead-of-time capture (see isocache._torch.dynamo).
needs_saved_entries = pytest.mark.skipif(
    not dynamo.aot_compile_supported(),
    reason="isocache.compile's warm start needs torch >= {}.{} (tests/test_torch_versions.py covers the fallback)".format(
        *dynamo.AOT_COMPILE_SINCE
    ),
)

SCRIPT = textwrap.dedent(
    """
    import json, logging, sys, torch, transformers
    import isocache
    from torch._dynamo.utils import counters
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append((record.levelname, record.getMessage()))
    logging.getLogger("isocache").addHandler(Keep())
    logging.getLogger("isocache").setLevel(logging.INFO)
    common = dict(vocab_size=128, max_position_embeddings=256, attn_implementation="sdpa")
    configs = {{
        "llama": lambda: transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                                  num_attention_heads=4, num_key_value_heads=2, **common),
        # One KV head: size-1 dimensions in the cache, whose strides is_contiguous() ignores and guards do not.
        "mixtral": lambda: transformers.MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                                                      num_attention_heads=4, num_key_value_heads=1,
                                                      num_local_experts=4, num_experts_per_tok=2, **common),
        "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=128, n_positions=256,
                                                attn_implementation="sdpa"),
    }}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[{name!r}]()).eval()
    mode = {mode!r}
    if mode == "model":
        generate = isocache.compile(model).generate
    else:  # as transformers' documentation compiles a model: its forward
        eager_forward = model.forward
        compiled_forward = isocache.compile(model.forward)
        generate = model.generate
    results = []
    for prompt, new, extra in {runs!r}:
        ids = torch.randint(0, 128, (1, prompt), generator=torch.Generator().manual_seed(prompt))
        options = dict(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0, **extra)
        expected = model.generate(ids, **options)
        if mode == "forward":
            model.forward = compiled_forward
        frames = counters["stats"]["unique_graphs"]
        actual = generate(ids, **options)
        if mode == "forward":
            model.forward = eager_forward
        expected = getattr(expected, "sequences", expected)
        actual = getattr(actual, "sequences", actual)
        results.append({{"equal": torch.equal(actual, expected), "new": actual.shape[1] - prompt,
                         "graphs": counters["stats"]["unique_graphs"] - frames}})
    print(json.dumps(dict(isocache.stats(), results=results, log=records)))
    """
)


def run(cache: Path, name: str, runs: list[tuple[int, int, dict[str, Any]]], mode: str = "model") -> dict[str, Any]:
    return run_python(SCRIPT.format(name=name, mode=mode, runs=runs), cache)


def messages(r: dict[str, Any], level: str) -> list[str]:
    return [m for lvl, m in r["log"] if lvl == level]


@needs_saved_entries
@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral"])
def test_generate_equals_eager_cold_and_in_a_fresh_process_without_tracing(name: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cold = run(cache, name, [(16, 6, {}), (23, 12, {})])
    assert cold["results"] == [
        {"equal": True, "new": 6, "graphs": 2},  # prefill and one decode graph for every step
        {"equal": True, "new": 12, "graphs": 0},  # and for every prompt
    ]
    assert cold["compiled"] > 0 and cold["models_loaded"] == 0

    # A later process: the same request, then a longer prompt and more new tokens than were ever traced.
    warm = run(cache, name, [(16, 6, {}), (23, 12, {})])
    assert [r["equal"] for r in warm["results"]] == [True, True], "tokens equal eager's"
    assert [r["new"] for r in warm["results"]] == [6, 12]
    assert [r["graphs"] for r in warm["results"]] == [0, 0], "no Dynamo tracing, no recompile"
    assert (warm["compiled"], warm["models_loaded"], warm["trace_seconds"]) == (0, 2, 0.0)
    loads = [m for m in messages(warm, "INFO") if m.startswith("isocache: loaded compiled model")]
    assert len(loads) == 2
    assert "(prefill)" in loads[0] and "(decode)" in loads[1], "the INFO lines name the entry"
    assert all("tracing skipped in" in m for m in loads), "and how long each took"
    assert not messages(warm, "WARNING")


@needs_saved_entries
def test_compiled_forward_in_generate_and_a_changed_generation_config(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cold = run(cache, "llama", [(16, 4, {})], mode="forward")
    assert cold["results"] == [{"equal": True, "new": 4, "graphs": 2}]
    # A later process: another prompt, then a generation option the entries were not traced for
    # (it changes what the forward returns): the plain backend runs those calls, with one warning.
    changed = {"output_hidden_states": True, "return_dict_in_generate": True}
    warm = run(cache, "llama", [(9, 5, {}), (9, 5, changed)], mode="forward")
    assert warm["results"][0] == {"equal": True, "new": 5, "graphs": 0}
    assert warm["results"][1]["equal"] and warm["models_loaded"] == 2
    warnings = messages(warm, "WARNING")
    assert len(warnings) == 1 and "differs from what its saved entry was compiled for" in warnings[0], warnings


def test_compile_takes_a_function_and_a_bound_method(tmp_path: Path) -> None:
    import torch

    import isocache
    from support import MODELS, token_ids

    def scaled_relu(x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        return torch.relu(x) * scale

    x = torch.randn(4, 8)
    compiled = isocache.compile(scaled_relu, cache_dir=tmp_path / "cache")
    assert torch.equal(compiled(x), scaled_relu(x))
    assert "scaled_relu" in repr(compiled)

    model = MODELS["llama"](2)
    forward = isocache.compile(model.forward, cache_dir=tmp_path / "cache")
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        assert torch.allclose(forward(ids).last_hidden_state, expected, atol=1e-5)
        assert torch.allclose(forward(input_ids=ids).last_hidden_state, expected, atol=1e-5)
    with pytest.raises(TypeError, match="a module, a function or a bound method"):
        isocache.compile(42)  # type: ignore[arg-type]
    with pytest.raises(AttributeError, match="no generate"):
        isocache.compile(model, cache_dir=tmp_path / "cache").generate(ids)


@pytest.mark.skipif(dynamo.aot_compile_supported(), reason="this torch saves entries: tested above, cold and warm")
def test_generate_without_saved_entries_traces_prefill_and_decode_once(tmp_path: Path) -> None:
    # Where torch cannot save entries (2.11), the phases run through the plain backend: still one
    # prefill and one decode graph, for a second prompt of another length too.
    result = run(tmp_path / "cache", "llama", [(16, 5, {}), (21, 9, {})])
    assert result["results"] == [{"equal": True, "new": 5, "graphs": 2}, {"equal": True, "new": 9, "graphs": 0}]
