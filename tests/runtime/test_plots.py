"""The pictures' geometry: cells drawn as one draws them, heatmaps scaled to their values, whole epochs."""

import itertools
import types

import numpy as np
import pytest

import keras_darts as kd
from keras_darts.runtime import plots
from keras_darts.runtime.figures import heatmap_figure
from keras_darts.runtime.kinds import kind_of


def five_node_cell():
    # Node n (2..6) takes the two nodes before it, so each lies one layer further right.
    edge = types.SimpleNamespace
    nodes = [[edge(op="sep_conv_3x3", input=0), edge(op="dil_conv_5x5", input=1)]]
    for n in range(3, 7):
        nodes.append([edge(op="skip_connect", input=n - 1), edge(op="max_pool_3x3", input=n - 2)])
    return types.SimpleNamespace(nodes=nodes, concat=[2, 3, 4, 5, 6])


CELLS = [(name, cell_type) for name in ("DARTS_V1", "DARTS_V2") for cell_type in ("normal", "reduce")] + [
    ("DARTS_V1_RNN", "recurrent"), ("DARTS_V2_RNN", "recurrent"), ("five nodes", "normal")]


@pytest.mark.parametrize("name, cell_type", CELLS)
def test_a_cell_is_laid_out_left_to_right_with_edges_and_labels_clear_of_everything(name, cell_type):
    if name == "five nodes":
        cell, kind = five_node_cell(), kind_of(kd.load_derived("DARTS_V2"))
    else:
        derived = kd.load_derived(name)
        cell, kind = derived.cells[cell_type], kind_of(derived)
    graph = plots.cell_graph(cell, kind)
    layout = plots.cell_layout(graph)
    x = {node: centre[0] for node, centre in layout.centres.items()}
    inputs = [n for n, d in graph.nodes(data=True) if d["kind"] == "input"]
    inner = [n for n, d in graph.nodes(data=True) if d["kind"] == "node"]
    assert max(x[n] for n in inputs) < min(x[n] for n in inner)
    assert max(x[n] for n in inner) < x["output"]
    for u, v in graph.edges():
        assert x[u] < x[v], (u, v)  # every edge runs left to right: nodes in topological layers
    if name == "five nodes":
        assert len({x[n] for n in inner}) == 5  # a chain: one layer per node
    # No two nodes overlap.
    for a, b in itertools.combinations(graph.nodes, 2):
        box_a = (*layout.centres[a], *layout.half_sizes[a])
        box_b = (*layout.centres[b], *layout.half_sizes[b])
        assert not plots._boxes_overlap(box_a, box_b, margin=0.1), (a, b)
    # Every edge starts and ends at its nodes' centres and passes clear of every other node.
    for (u, v), path in layout.paths.items():
        np.testing.assert_allclose(path[0], layout.centres[u])
        np.testing.assert_allclose(path[-1], layout.centres[v])
        for node in set(graph.nodes) - {u, v}:
            assert not any(layout.inside(point, node, margin=0.05) for point in path), ((u, v), node)
    # Every op has a label on its edge, overlapping no node and no other label.
    labelled = {(u, v) for u, v, d in graph.edges(data=True) if d["label"]}
    assert set(layout.labels) == labelled
    for edge, box in layout.labels.items():
        assert np.min(np.hypot(*(layout.paths[edge] - box[:2]).T)) < 1e-9  # on its own curve
        for node in graph.nodes:
            assert not plots._boxes_overlap(box, (*layout.centres[node], *layout.half_sizes[node]), 0), (edge, node)
    for (a, box_a), (b, box_b) in itertools.combinations(layout.labels.items(), 2):
        assert not plots._boxes_overlap(box_a, box_b, 0), (a, b)
    # Input and output boxes hold their labels.
    for node in inputs + ["output"]:
        width = 2 * layout.half_sizes[node][0]
        assert width >= plots.CHAR_WIDTH * len(graph.nodes[node]["label"])


def test_the_fallback_drawing_writes_png_and_svg(tmp_path, monkeypatch):
    monkeypatch.setattr(plots.shutil, "which", lambda name: None)  # as without graphviz
    derived = kd.load_derived("DARTS_V2")
    written = plots.draw_cell(derived.cells["normal"], str(tmp_path / "cell"), kind_of(derived), "DARTS_V2")
    assert written == [str(tmp_path / "cell.png"), str(tmp_path / "cell.svg")]
    assert (tmp_path / "cell.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / "cell.svg").read_text()[:2000]


def test_the_alpha_heatmap_colour_scale_spans_the_values_shown():
    # Early alphas all lie near 1/8: a scale from 0 would paint them one colour.
    probabilities = 0.125 + np.random.default_rng(0).uniform(-0.004, 0.004, (14, 8))
    figure = heatmap_figure(probabilities, [f"op{i}" for i in range(8)], [f"e{i}" for i in range(14)], "t")
    image = figure.axes[0].images[0]
    assert image.get_clim() == (pytest.approx(probabilities.min()), pytest.approx(probabilities.max()))


def test_the_diagnostics_have_ticks_at_whole_epochs_only():
    history = [{"epoch": e, "skip_connections": e % 2, "parameter_free": 1, "hessian_eigenvalue": 0.1 * e,
                "alpha_softmax": {"normal": []}} for e in (1, 2, 3)]
    figure = plots.diagnostics_figure(history)
    for axes in figure.axes:
        ticks = [t for t in axes.xaxis.get_majorticklocs() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
