"""DARTS-PT's selection against hand-made measurements and hand-derived cells: its schedule, the op it
keeps, the inputs it keeps, the derivation on projected weights, and the supernet's projected mixing."""

import keras
import numpy as np
import pytest

import keras_darts as kd
from keras_darts.compiler import cell_edges
from keras_darts.compiler.derive import derive_cell
from keras_darts.compiler.methods import PerturbationSelection, method_from_document, search_method
from keras_darts.compiler.methods.base import softmax
from keras_darts.compiler.methods.darts_pt import topology_nodes
from keras_darts.spec import Edge
from tests.conftest import tiny_spec_document

OPS = ["none", "avg_pool_3x3", "skip_connect", "sep_conv_3x3"]


def test_the_schedule_of_the_darts_space_is_the_official_81_epochs_with_17_steps():
    # 4 nodes, k = 2: 14 edges; the nodes with 3, 4 and 5 inputs have inputs to select (official nid2eids).
    edges = cell_edges(4)
    assert len(edges) == 14 and topology_nodes(edges, 2) == [3, 4, 5]
    selection = PerturbationSelection({"tune_epochs": 5})
    assert selection.tuning_epochs(edges, 2) == 5 * (14 + 3 - 1) + 1 == 81
    # A step at tuning epochs 0, 5, ..., 80: ops at 0..65 (epoch < 5 * 14), inputs at 70, 75 and 80.
    assert [selection.steps_by(e) for e in (0, 4, 5, 69, 70, 79, 80)] == [1, 1, 2, 14, 15, 16, 17]
    assert [selection.step_kind(i, edges) for i in range(17)] == ["op"] * 14 + ["inputs"] * 3
    # k = 1 on two nodes: node 2 (2 inputs) and node 3 (3 inputs) both choose.
    assert topology_nodes(cell_edges(2), 1) == [2, 3]
    assert PerturbationSelection({"tune_epochs": 2}).tuning_epochs(cell_edges(2), 1) == 2 * (5 + 2 - 1) + 1


@pytest.mark.parametrize("nodes,k,operations", [(4, 2, 8), (2, 1, 4), (3, 2, 5)])
def test_the_measurement_count_is_the_number_of_evaluations_a_whole_selection_makes(nodes, k, operations):
    # Drive one cell type's whole selection (every edge's op, then every node's inputs) with a counting
    # evaluation, as the supernet's selection does, and compare with the count the benchmark reports.
    edges = cell_edges(nodes)
    selection = PerturbationSelection({})
    weights = softmax(np.random.default_rng(2).normal(size=(len(edges), operations)))
    count = [0]

    def evaluate(masked):
        count[0] += 1
        return float(masked.sum())

    for row in range(len(edges)):
        selection.select_op(weights, row, evaluate)
    for node in topology_nodes(edges, k):
        selection.select_inputs(weights, [r for r, (_, t) in enumerate(edges) if t == node], k, evaluate)
    assert selection.measurements(edges, k, operations) == count[0]
    if (nodes, k, operations) == (4, 2, 8):  # the DARTS space: 14 x 8 op measurements, 3 + (4 + 3) + (5 + 4 + 3)
        assert count[0] == 112 + 22


def recording(values_by_masked, weights):
    """An ``evaluate`` that returns ``values_by_masked[i]`` for the matrix with entry (or row) ``i`` zeroed."""
    calls = []

    def evaluate(masked):
        changed = np.argwhere(masked != weights)
        calls.append(changed)
        key = tuple(changed[0]) if len(changed) == 1 else int(changed[0][0])
        return values_by_masked[key]

    return evaluate, calls


@pytest.mark.parametrize("criterion,values,expected", [
    # Accuracy after removing each op of edge 1: the lowest hurts most; the first among ties.
    ("accuracy", [0.5, 0.3, 0.3, 0.6], 1),
    # Loss: the highest hurts most.
    ("loss", [1.0, 2.0, 2.0, 0.5], 1),
    ("accuracy", [0.2, 0.3, 0.3, 0.6], 0),  # 'none' is a candidate too, as in the official code
])
def test_the_op_kept_is_the_one_whose_removal_hurts_most(criterion, values, expected):
    rng = np.random.default_rng(0)
    weights = softmax(rng.normal(size=(5, 4)))
    evaluate, calls = recording({(1, op): v for op, v in enumerate(values)}, weights)
    selection = PerturbationSelection({"criterion": criterion})
    assert selection.select_op(weights, 1, evaluate) == expected
    # Each op of the edge was masked alone, in order, in a copy: the weights themselves are untouched.
    assert [tuple(c[0]) for c in calls] == [(1, op) for op in range(4)]
    assert (weights > 0).all()


@pytest.mark.parametrize("criterion,after", [
    ("accuracy", {0: 0.9, 1: 0.7, 2: 0.9, 3: 0.6}),
    ("loss", {0: 0.1, 1: 0.3, 2: 0.1, 3: 0.4}),
])
def test_the_inputs_kept_are_found_by_dropping_the_least_hurtful_edge_until_k_are_left(criterion, after):
    # Rows 0-3 are one node's four inputs; the figure after removing a row depends on that row
    # alone. The least hurtful goes first, the last among ties: row 2 (tied with row 0), then row 0.
    weights = softmax(np.random.default_rng(1).normal(size=(4, 4)))
    evaluate, calls = recording(after, weights)
    selection = PerturbationSelection({"criterion": criterion})
    assert selection.select_inputs(weights, [0, 1, 2, 3], 2, evaluate) == [1, 3]
    # Four removals measured, then three; every measurement masks one whole row of the unmasked
    # weights (a dropped row is not masked in the next round, as in the official code).
    assert [int(c[0][0]) for c in calls] == [0, 1, 2, 3, 0, 1, 3]
    assert all(len(c) == 4 and len({int(r) for r, _ in c}) == 1 for c in calls)


def test_the_cell_is_darts_rule_on_the_projected_weights():
    # Two nodes: edges (0,2) (1,2) (0,3) (1,3) (2,3). Rows 0, 2 and 4 have selected ops (skip,
    # sep, avg), row 3 was dropped by its node, row 1 is still open: its softmax decides its op.
    alpha = np.zeros((5, 4))
    alpha[1] = [5.0, 0.0, 3.0, 0.0]  # 'none' strongest, but never chosen: skip_connect
    chosen = np.zeros((5, 4))
    chosen[0, 2] = chosen[2, 3] = chosen[4, 1] = 1.0
    fixed = np.array([1.0, 0.0, 1.0, 1.0, 1.0])
    cell = derive_cell(alpha, OPS, 2, 2, projection=(chosen, fixed))
    assert cell.nodes == ((Edge("skip_connect", 0), Edge("skip_connect", 1)),
                          (Edge("sep_conv_3x3", 0), Edge("avg_pool_3x3", 2)))
    # Without the projection the same alphas give another cell (all rows but 1 are uniform).
    assert derive_cell(alpha, OPS, 2, 2).nodes != cell.nodes


def test_darts_pt_follows_another_method_named_by_its_options_and_is_recorded_with_it():
    document = tiny_spec_document(operations=OPS)
    document["search"].update(method="sdarts", darts_pt={"tune_epochs": 2, "criterion": "loss", "measure_examples": 50})
    method = search_method(kd.load_spec(document))
    assert method.name == "sdarts" and method.selection.options == {
        "tune_epochs": 2, "criterion": "loss", "learning_rate_factor": 0.1, "measure_examples": 50}
    document_written = method.to_document()
    assert document_written["darts_pt"] == method.selection.options
    again = method_from_document(document_written, epochs=None)
    assert again.name == "sdarts" and again.selection.options == method.selection.options
    # darts_pt on its own is DARTS' supernet with the selection, first order by default.
    alone = tiny_spec_document(operations=OPS)
    alone["search"] = {"method": "darts_pt", "epochs": 1}
    spec = kd.load_spec(alone)
    assert spec.search.order == "first" and search_method(spec).selection.options["tune_epochs"] == 5
    assert search_method(spec).selection.options["measure_examples"] is None  # the whole split, as the official code
    # No selection without darts_pt.
    assert search_method(kd.load_spec(tiny_spec_document(operations=OPS))).selection is None


def test_the_supernet_mixes_with_the_selected_rows_and_takes_op_weights_outright():
    document = tiny_spec_document(operations=OPS)
    document["search"].update(method="darts_pt")
    keras.utils.set_random_seed(0)
    model = kd.build_supernet(kd.load_spec(document))
    x = np.random.default_rng(2).normal(size=(4, 8, 8, 1)).astype("float32")
    plain = {t: softmax(a.numpy()).astype("float32") for t, a in model.alphas.items()}
    before = model(x, training=True).numpy()
    # Op weights given outright: the softmax itself gives the same logits.
    np.testing.assert_allclose(model(x, training=True, mixing=plain).numpy(), before, rtol=1e-5, atol=1e-6)
    # Select sep_conv_3x3 on normal edge 1 and drop reduce edge 3.
    state = model.projection
    chosen = np.zeros((5, 4), "float32")
    chosen[1, 3] = 1.0
    state["normal"]["chosen"].assign(chosen)
    state["normal"]["fixed"].assign([0, 1, 0, 0, 0])
    state["reduce"]["fixed"].assign([0, 0, 0, 1, 0])
    expected = {t: m.copy() for t, m in plain.items()}
    expected["normal"][1] = [0, 0, 0, 1]
    expected["reduce"][3] = 0
    after = model(x, training=True).numpy()
    np.testing.assert_allclose(after, model(x, training=True, mixing=expected).numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(after - before).max() > 1e-3  # the selection changed the network, so the check could fail
