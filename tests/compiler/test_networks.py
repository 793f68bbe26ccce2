"""Supernet and derived network: structure, parameter counts, names, save and reload."""

import os

import keras
import numpy as np
import pytest

import keras_darts as kd
from keras_darts.compiler import SearchCell, build_network, build_supernet, count_parameters
from tests.conftest import tiny_spec_document

OPS = ["none", "avg_pool_3x3", "skip_connect", "sep_conv_3x3"]


def trainable(layer):
    return sum(int(np.prod(v.shape)) for v in layer.trainable_variables)


@pytest.mark.parametrize("reduction_prev, reduction", [(False, False), (True, True)])
def test_search_cell_parameters_by_hand(reduction_prev, reduction):
    cell = SearchCell(OPS, nodes=2, channels=4, reduction=reduction, reduction_prev=reduction_prev, name="cell")
    # After a reduction cell, input 0 (two cells back) is twice the size of input 1.
    s0 = np.zeros((2, 16, 16, 6) if reduction_prev else (2, 8, 8, 6), "float32")
    s1 = np.zeros((2, 8, 8, 6), "float32")
    weights = np.full((5, 4), 0.25, "float32")
    out = cell(s0, s1, weights, training=True)
    # Preprocessing: two 1x1 convs 6->4 (the first a factorized reduce 6->2+2 after a reduction cell).
    expected = 6 * 4 + 6 * 4
    # Five edges each hold a non-affine sep_conv_3x3 on 4 channels: 2 * (3*3*4 + 4*4).
    expected += 5 * 2 * (3 * 3 * 4 + 4 * 4)
    if reduction:
        # The four edges leaving the inputs reduce; their skip_connect is a factorized reduce 4->2+2.
        expected += 4 * 2 * (4 * 2)
    assert trainable(cell) == expected
    size = 4 if reduction else 8
    assert tuple(out.shape) == (2, size, size, 2 * 4)


def test_supernet_and_evaluation_networks_have_the_papers_sizes():
    spec = kd.load_spec({"version": 1, "name": "paper", "search_space": {"kind": "conv_cell"}})
    supernet = build_supernet(spec)
    weights = sum(int(np.prod(v.shape)) for v in supernet.weight_variables)
    # Exact counts of the reference implementation's networks ("about 1.9M", 3.3M and 4.7M in the paper).
    assert weights == 1_930_618  # alphas excluded
    assert [tuple(v.shape) for v in supernet.arch_variables] == [(14, 8), (14, 8)]
    v2 = kd.load_derived("DARTS_V2")
    assert count_parameters(build_network(v2)) == 3_349_342
    imagenet = build_network(v2, init_channels=48, layers=14, stem="imagenet", input_shape=[224, 224, 3],
                             num_classes=1000)
    assert count_parameters(imagenet) == 4_718_752
    with_head = count_parameters(imagenet, exclude_auxiliary=False)
    # ImageNet head: conv1x1 C_aux->128 + BN(128), conv2x2 128->768 (no BN), linear 768->1000.
    c_aux = 4 * 48 * 4  # four nodes concatenated at 4C channels after the second reduction
    assert with_head - count_parameters(imagenet) == c_aux * 128 + 2 * 128 + 2 * 2 * 128 * 768 + 768 * 1000 + 1000


def test_alphas_are_apart_from_weights():
    supernet = build_supernet(kd.load_spec(tiny_spec_document()))
    arch = {id(v) for v in supernet.arch_variables}
    assert [v.path for v in supernet.arch_variables] == ["supernet/alpha_normal", "supernet/alpha_reduce"]
    assert not arch & {id(v) for v in supernet.weight_variables}
    assert len(supernet.weight_variables) + 2 == len(supernet.trainable_variables)
    alphas = np.concatenate([np.asarray(v).ravel() for v in supernet.arch_variables])
    assert 0 < np.std(alphas) < 1e-2  # 1e-3 * N(0, 1)


def darts_rule_by_hand(alpha, operations, nodes, k):
    """DARTS' derivation written out again: per node the k inputs with the largest non-none softmax, best op each."""
    probabilities = np.exp(alpha) / np.exp(alpha).sum(axis=1, keepdims=True)
    usable = [o for o, name in enumerate(operations) if name != "none"]
    rows = {}
    for j in range(2, 2 + nodes):
        for i in range(j):
            rows[(i, j)] = len(rows)
    cell = []
    for j in range(2, 2 + nodes):
        strength = {i: max(probabilities[rows[(i, j)], o] for o in usable) for i in range(j)}
        chosen = sorted(range(j), key=lambda i: (-strength[i], i))[:k]
        cell.append([(operations[max(usable, key=lambda o: (probabilities[rows[(i, j)], o], -o))], i)
                     for i in chosen])
    return cell


@pytest.mark.parametrize(
    "change",
    [
        {"operations": ["none", "max_pool_3x3", "sep_conv_5x5", "dil_conv_3x3"], "nodes": 3, "k": 1},
        {"operations": ["skip_connect", "avg_pool_3x3", "sep_conv_3x3"], "nodes": 5, "k": 3,
         "reduction_cells": [0, 2], "network": {"init_channels": 4, "layers": 4, "input_shape": [8, 8, 1],
                                                "num_classes": 10}},
    ],
)
def test_other_search_spaces_run_forward_and_derive_by_darts_rule(change):
    spec = kd.load_spec(tiny_spec_document(**change))
    space = spec.search_space
    supernet = build_supernet(spec)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype("float32")
    logits = np.asarray(supernet(x, training=True))
    assert logits.shape == (2, 10) and not np.allclose(logits[0], logits[1])
    rng = np.random.default_rng(1)
    alphas = {t: rng.normal(size=(len(a.numpy()), len(space.operations))) for t, a in supernet.alphas.items()}
    derived = kd.derived_spec_from_search(spec, alphas)
    for cell_type, alpha in alphas.items():
        got = [[(e.op, e.input) for e in node] for node in derived.cells[cell_type].nodes]
        assert got == darts_rule_by_hand(alpha, space.operations, space.nodes, space.k)
    network = build_network(derived)
    assert tuple(network(x).shape) == (2, 10)


def test_layer_names_are_the_same_across_compilations():
    spec = kd.load_spec(tiny_spec_document())
    first = [v.path for v in build_supernet(spec).variables]
    second = [v.path for v in build_supernet(spec).variables]
    assert first == second
    assert "supernet/cell_01/cell_01__edge_0_2/cell_01__edge_0_2__sep_conv_3x3/depthwise_1" in first


def test_supernet_keras_round_trip(tmp_path):
    spec = kd.load_spec(tiny_spec_document())
    supernet = build_supernet(spec)
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")
    path = os.path.join(tmp_path, "supernet.keras")
    supernet.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded(x, training=True)), np.asarray(supernet(x, training=True)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(loaded.alphas["normal"]), np.asarray(supernet.alphas["normal"]))


def test_derived_network_keras_round_trip_with_auxiliary_head(tmp_path):
    derived = kd.load_derived("DARTS_V2")
    network = build_network(derived, init_channels=4, layers=5, num_classes=3, input_shape=[32, 32, 3], seed=1)
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    logits, aux = network(x, training=True)  # also moves BN running statistics
    assert tuple(aux.shape) == (2, 3)
    path = os.path.join(tmp_path, "derived.keras")
    network.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(network(x)), rtol=1e-5, atol=1e-5)
    assert count_parameters(loaded, exclude_auxiliary=False) == count_parameters(network, exclude_auxiliary=False)


def test_drop_path_drops_whole_examples_but_not_identity():
    from keras_darts.compiler import DerivedCell
    from keras_darts.spec import CellGenotype, Edge

    # Node 2 is the identity of input 1; node 3 a sep_conv_3x3 of input 0. Both are concatenated.
    genotype = CellGenotype(nodes=((Edge("skip_connect", 1),), (Edge("sep_conv_3x3", 0),)), concat=(2, 3))
    cell = DerivedCell(genotype, channels=4, reduction=False, reduction_prev=False, seed=5, name="drop_cell")
    rng = np.random.default_rng(2)
    s0, s1 = (rng.normal(size=(64, 6, 6, 4)).astype("float32") for _ in range(2))
    plain = np.asarray(cell(s0, s1, drop_path_rate=None, training=True))
    rate = 0.5
    dropped = np.asarray(cell(s0, s1, drop_path_rate=rate, training=True))
    # The identity path is never dropped.
    np.testing.assert_allclose(dropped[..., :4], plain[..., :4], rtol=1e-6, atol=1e-6)
    # The conv path of each example is either dropped whole or kept and scaled by 1 / (1 - rate).
    conv, reference = dropped[..., 4:], plain[..., 4:]
    zero = np.all(conv == 0.0, axis=(1, 2, 3))
    np.testing.assert_allclose(conv[~zero], reference[~zero] / (1 - rate), rtol=1e-5, atol=1e-5)
    assert 0 < zero.sum() < len(zero)  # both happen (all 64 alike has probability 2^-63)
    # Outside training nothing is dropped.
    np.testing.assert_allclose(np.asarray(cell(s0, s1, drop_path_rate=rate, training=False)),
                               np.asarray(cell(s0, s1, drop_path_rate=None, training=False)), rtol=1e-6)
