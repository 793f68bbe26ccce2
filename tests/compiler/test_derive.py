"""Derivation (DARTS section 4) on hand-computed alphas."""

import numpy as np
import pytest

from keras_darts.compiler import cell_edges, derive_cell, derive_genotype

OPS = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")


def cell_pairs(cell):
    return [[(e.op, e.input) for e in node] for node in cell.nodes]


def test_edges_are_ordered_by_target_then_source():
    assert cell_edges(3) == [(0, 2), (1, 2), (0, 3), (1, 3), (2, 3), (0, 4), (1, 4), (2, 4), (3, 4)]


def test_none_is_never_chosen_and_edges_rank_by_their_best_other_op():
    alpha = np.zeros((5, 4))  # 2 nodes: edges (0,2) (1,2) (0,3) (1,3) (2,3)
    alpha[0] = [9.0, 1.0, 0.0, 0.0]  # none dominates, best other op max_pool (p small)
    alpha[1] = [0.0, 0.0, 0.0, 2.0]  # sep_conv strong
    alpha[2] = [0.0, 0.0, 3.0, 0.0]  # skip strong
    alpha[3] = [5.0, 0.0, 0.0, 0.1]  # none dominates
    alpha[4] = [0.0, 0.0, 0.0, 1.0]
    cell = derive_cell(alpha, OPS, nodes=2, k=2)
    # Node 2 keeps both inputs, the stronger (input 1) first; input 0 takes max_pool, not none.
    # Node 3: edge (0,3) p(skip)=e^3/(e^3+3), edge (2,3) p(sep)=e/(e+3), edge (1,3) weakest.
    assert cell_pairs(cell) == [
        [("sep_conv_3x3", 1), ("max_pool_3x3", 0)],
        [("skip_connect", 0), ("sep_conv_3x3", 2)],
    ]
    assert cell.concat == (2, 3)


def test_ties_go_to_the_earlier_op_and_the_earlier_input():
    alpha = np.zeros((5, 4))
    cell = derive_cell(alpha, OPS, nodes=2, k=1)
    # All equal: the first non-none op, and the earliest input.
    assert cell_pairs(cell) == [[("max_pool_3x3", 0)], [("max_pool_3x3", 0)]]


def test_k1_and_k3_on_five_nodes():
    rng = np.random.default_rng(0)
    alpha = rng.normal(size=(len(cell_edges(5)), 4))
    edges = cell_edges(5)
    probabilities = np.exp(alpha) / np.exp(alpha).sum(axis=1, keepdims=True)
    for k in (1, 3):
        cell = derive_cell(alpha, OPS, nodes=5, k=k)
        for n, node in enumerate(cell.nodes):
            target = n + 2
            rows = [r for r, (_, t) in enumerate(edges) if t == target]
            strength = {edges[r][0]: probabilities[r, 1:].max() for r in rows}
            expected_inputs = sorted(strength, key=lambda s: -strength[s])[: min(k, len(rows))]
            assert [e.input for e in node] == expected_inputs
            for edge in node:
                row = rows[edge.input]
                assert edge.op == OPS[1 + int(np.argmax(probabilities[row, 1:]))]
        assert [len(node) for node in cell.nodes] == [min(k, n + 2) for n in range(5)]


def test_three_nodes_without_none_in_the_op_set():
    ops = ("avg_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")
    alpha = np.zeros((9, 4))
    alpha[:, 3] = 1.0
    alpha[4, 0] = 5.0  # edge (2,3): avg_pool strongest anywhere
    genotype = derive_genotype({"normal": alpha, "reduce": alpha}, ops, nodes=3, k=2)
    assert cell_pairs(genotype["normal"])[1] == [("avg_pool_3x3", 2), ("dil_conv_3x3", 0)]
    assert set(genotype) == {"normal", "reduce"}


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"alpha must have shape \(edges, ops\) = \(5, 4\)"):
        derive_cell(np.zeros((4, 4)), OPS, nodes=2, k=2)
