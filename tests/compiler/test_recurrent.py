"""The recurrent cell against a hand computation, its derivation, the language model's size and saving."""

import keras
import numpy as np
import pytest

from keras_darts.compiler import build_language_model, count_parameters, derive_recurrent_cell
from keras_darts.compiler.recurrent import RecurrentCell, recurrent_edges
from keras_darts.spec import DARTS_RECURRENT_OPERATIONS, Edge, load_derived

OPS = DARTS_RECURRENT_OPERATIONS
FUNCTIONS = {
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0.0),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "identity": lambda z: z,
}


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def normalize(s):
    return (s - s.mean(axis=0)) / np.sqrt(s.var(axis=0) + 1e-5)


def numpy_step(x, h, w0, ws, edges_into, batch_norm, output, masks):
    """One step written out from DARTS section 6; ``edges_into[i]`` = [(source, op, weight), ...]."""
    x_in = x * masks.get("cell_input", 1.0)
    h_in = h * masks.get("hidden", 1.0)
    c0, g0 = np.split(np.concatenate([x_in, h_in], axis=1) @ w0, 2, axis=1)
    states = [h + sigmoid(c0) * (np.tanh(g0) - h)]
    if batch_norm:
        states[0] = normalize(states[0])
    for i, w in enumerate(ws, start=1):
        total = 0.0
        for source, op, weight in edges_into[i]:
            s = states[source]
            c, g = np.split((s * masks.get("hidden", 1.0)) @ w, 2, axis=1)
            total = total + weight * (s + sigmoid(c) * (FUNCTIONS[op](g) - s))
        states.append(normalize(total) if batch_norm else total)
    return states[-1] if output == "last" else np.mean(states[1:], axis=0)


def run_numpy(cell, xs, h, edges_into, batch_norm, output="mean", masks=None):
    w0 = cell.w0.numpy()
    ws = [w.numpy() for w in cell.node_weights]
    outputs = []
    for x in xs:
        h = numpy_step(x, h, w0, ws, edges_into, batch_norm, output, masks or {})
        outputs.append(h)
    return np.stack(outputs)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_search_cell_is_the_softmax_weighted_highway_sum(batch_norm):
    rng = np.random.default_rng(0)
    nodes, batch, inputs, hidden = 3, 5, 3, 4
    cell = RecurrentCell(inputs, hidden, nodes, OPS, batch_norm=batch_norm, init_range=0.5, seed=1)
    alpha = rng.normal(0, 1, (len(recurrent_edges(nodes)), len(OPS)))
    p = np.exp(alpha) / np.exp(alpha).sum(axis=1, keepdims=True)
    xs = rng.normal(size=(4, batch, inputs)).astype("float32")
    h0 = rng.normal(size=(batch, hidden)).astype("float32")
    masks = {"hidden": (rng.random((batch, hidden)) > 0.3) / 0.7, "cell_input": (rng.random((batch, inputs)) > 0.3) / 0.7}
    outputs, last = cell(xs, h0, keras.ops.convert_to_tensor(p.astype("float32")),
                         {k: keras.ops.convert_to_tensor(v.astype("float32")) for k, v in masks.items()})

    edges_into = {i: [] for i in range(1, nodes + 1)}
    for row, (j, i) in enumerate(recurrent_edges(nodes)):
        for o, op in enumerate(OPS):
            if op != "none":  # none adds nothing but keeps its share of the softmax
                edges_into[i].append((j, op, p[row, o]))
    expected = run_numpy(cell, xs, h0, edges_into, batch_norm, masks=masks)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(outputs), expected, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(last), expected[-1], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("output", ["mean", "last"])
def test_derived_cell_follows_its_genotype(output):
    rng = np.random.default_rng(1)
    genotype = {"nodes": [[{"op": "sigmoid", "input": 0}], [{"op": "relu", "input": 1}],
                          [{"op": "identity", "input": 0}, {"op": "tanh", "input": 2}]]}
    cell = RecurrentCell(2, 3, genotype=genotype, output=output, init_range=0.5, seed=2)
    xs = rng.normal(size=(3, 4, 2)).astype("float32")
    h0 = rng.normal(size=(4, 3)).astype("float32")
    outputs, _ = cell(xs, h0)
    edges_into = {1: [(0, "sigmoid", 1.0)], 2: [(1, "relu", 1.0)], 3: [(0, "identity", 1.0), (2, "tanh", 1.0)]}
    expected = run_numpy(cell, xs, h0, edges_into, False, output)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(outputs), expected, rtol=2e-4, atol=2e-5)


def test_recurrent_derivation_keeps_the_strongest_edge_per_node():
    ops = ("none", "tanh", "relu", "sigmoid", "identity")
    alpha = np.zeros((6, 5))  # 3 nodes: rows (0->1), (0->2), (1->2), (0->3), (1->3), (2->3)
    alpha[0] = [5, 1, 0, 0, 0]  # none is strongest but never chosen: tanh
    alpha[1] = [0, 0, 2, 0, 0]
    alpha[2] = [0, 0, 0, 3, 0]  # node 2: edge from 1 (sigmoid) beats edge from 0 (relu)
    alpha[3] = [0, 0, 0, 0, 1]
    alpha[4] = [0, 0, 0, 0, 1]  # tie between 0 and 1 on node 3: earlier input wins
    alpha[5] = [0, 0.5, 0, 0, 0]
    genotype = derive_recurrent_cell(alpha, ops, 3, k=1)
    assert genotype.nodes == ((Edge("tanh", 0),), (Edge("sigmoid", 1),), (Edge("identity", 0),))
    assert genotype.concat == (1, 2, 3)
    two = derive_recurrent_cell(alpha, ops, 3, k=2)
    assert two.nodes[1] == (Edge("sigmoid", 1), Edge("relu", 0))


def test_published_recurrent_genotype_has_the_papers_23m_parameters():
    derived = load_derived("DARTS_V2_RNN")
    assert [(e.op, e.input) for (e,) in derived.cells["recurrent"].nodes] == [
        ("sigmoid", 0), ("relu", 1), ("relu", 1), ("identity", 1), ("tanh", 2), ("sigmoid", 5), ("tanh", 3),
        ("relu", 5)]
    model = build_language_model(derived)
    vocabulary, units = 10000, 850
    # tied embedding/decoder + decoder bias + W0 (x and h -> 2 h) + 8 node matrices (h -> 2 h)
    expected = vocabulary * units + vocabulary + (units + units) * 2 * units + 8 * units * 2 * units
    assert count_parameters(model) == expected == 22_960_000


def test_language_model_round_trips_through_keras_file(tmp_path):
    derived = load_derived("DARTS_V1_RNN")
    model = build_language_model(derived, seed=0, embedding_size=6, hidden_size=6, vocabulary_size=20)
    path = tmp_path / "lm.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    tokens = np.random.default_rng(0).integers(0, 20, (3, 7)).astype("int32")
    hidden = np.zeros((3, 6), "float32")
    for got, want in zip(loaded(tokens, hidden)[:2], model(tokens, hidden)[:2]):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(want), atol=1e-6)


def test_untied_decoder_and_plain_cell_build():
    derived = load_derived("DARTS_V2_RNN")
    model = build_language_model(derived, embedding_size=5, hidden_size=7, tie_weights=False, highway=False,
                                 vocabulary_size=11)
    logits, last, _, _ = model(np.zeros((2, 4), "int32"), np.zeros((2, 7), "float32"), training=True)
    assert tuple(logits.shape) == (2, 4, 11) and tuple(last.shape) == (2, 7)
    # embedding 11x5, decoder 7x11 + 11, W0 (5+7)x7, 8 nodes 7x7
    assert count_parameters(model) == 55 + 77 + 11 + 12 * 7 + 8 * 49
