"""Digests of pieces of real `transformers` models captured by Dynamo."""

from __future__ import annotations

import pytest
import torch

import isocache
from conftest import MODELS, capture, token_ids
from isocache import _core
from isocache.split import normalize_splitting_ops, split_graph
from reference_encoder import reference_encode


def compiled_piece_digests(name: str, layers: int, dynamic: bool) -> list[str]:
    graphs = capture(MODELS[name](layers), token_ids(), dynamic=dynamic)
    assert len(graphs) == 1, "these models trace to one graph"
    gm, example_inputs = graphs[0]
    split = split_graph(gm, normalize_splitting_ops(None))
    attention = [p for p in split.pieces if p.is_splitting_op]
    assert len(attention) == layers, "one cut per attention call"
    pieces = split.compiled_pieces
    assert len(pieces) == layers + 1
    for p in pieces:
        # The Rust encoder and the Python reference agree on real graphs too.
        assert _core.encode(p.module).data == reference_encode(p.module)
    assert _core.encode(gm, example_inputs).data == reference_encode(gm, example_inputs)
    return [isocache.graph_digest(p.module) for p in pieces]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_middle_pieces_are_isometric(name: str) -> None:
    digests = compiled_piece_digests(name, layers=4, dynamic=False)
    first, middle, last = digests[0], digests[1:-1], digests[-1]
    assert len(set(middle)) == 1, f"layers of {name} should share one digest"
    assert first not in middle
    assert last not in middle
    assert first != last
    for d in digests:
        assert len(d) == 64 and d == d.lower() and int(d, 16) >= 0


def test_dynamic_llama_pieces_are_isometric_and_differ_from_static() -> None:
    dynamic = compiled_piece_digests("llama", layers=3, dynamic=True)
    static = compiled_piece_digests("llama", layers=3, dynamic=False)
    assert len(set(dynamic[1:-1])) == 1
    assert set(dynamic).isdisjoint(static), "symbolic sizes are part of the digest"


def test_whole_graphs_of_different_depth_differ() -> None:
    ((gm2, ex2),) = capture(MODELS["llama"](2), token_ids())
    ((gm3, ex3),) = capture(MODELS["llama"](3), token_ids())
    assert isocache.graph_digest(gm2, ex2) != isocache.graph_digest(gm3, ex3)
    why = isocache.explain(gm2, gm3, ex2, ex3)
    assert why is not None and "node" in why


def test_same_model_twice_gives_the_same_digest() -> None:
    ((gm_a, ex_a),) = capture(MODELS["gpt2"](2), token_ids())
    ((gm_b, ex_b),) = capture(MODELS["gpt2"](2), token_ids())
    assert isocache.graph_digest(gm_a, ex_a) == isocache.graph_digest(gm_b, ex_b)
    assert isocache.explain(gm_a, gm_b, ex_a, ex_b) is None


def test_sequence_length_changes_static_digest() -> None:
    ((gm_a, ex_a),) = capture(MODELS["llama"](2), token_ids(seq=16))
    ((gm_b, ex_b),) = capture(MODELS["llama"](2), token_ids(seq=24))
    assert isocache.graph_digest(gm_a, ex_a) != isocache.graph_digest(gm_b, ex_b)
    why = isocache.explain(gm_a, gm_b, ex_a, ex_b)
    assert why is not None


def test_pieces_of_a_model_and_explain_in_two_lines() -> None:
    model = MODELS["llama"](3)
    with torch.no_grad():
        pieces = isocache.pieces(model, token_ids())
    assert [p.index for p in pieces] == [0, 1, 2, 3], "4 compiled pieces around 3 attention ops"
    assert pieces[1].shared_with == (2,) and pieces[2].shared_with == (1,), "the two middle pieces share"
    assert not pieces[0].shared and not pieces[3].shared
    assert pieces[1].digest == pieces[2].digest != pieces[0].digest
    assert isocache.explain(pieces[1], pieces[2]) is None
    assert isocache.explain(pieces[0], pieces[1]) is not None
