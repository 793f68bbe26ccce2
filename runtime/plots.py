"""Pictures of a search: derived cells, alpha heatmaps, each edge's op weights over time, diagnostics.

``make_plots(run_dir)`` reads a run's ``derived.yaml`` and
``search/history.json`` and writes PNG and SVG files into ``run_dir/plots``.
Cells are drawn by graphviz's ``dot`` when it is installed, otherwise with
matplotlib and networkx.
"""

import os
import shutil
import subprocess

import networkx as nx
import numpy as np

from keras_darts.spec import load_derived

from . import rundir
from .figures import FORMATS, heatmap_figure, save, subplots
from .kinds import kind_of


def cell_graph(cell, kind):
    """The derived cell as a labelled networkx graph (inputs, nodes, output), as ``kind`` labels them."""
    graph = nx.MultiDiGraph()
    first = kind.first_node
    for node, label in kind.cell_inputs.items():
        graph.add_node(node, label=label, kind="input")
    for n, edges in enumerate(cell.nodes):
        graph.add_node(n + first, label=str(n + first), kind="node")
        for edge in edges:
            graph.add_edge(edge.input, n + first, label=edge.op)
    graph.add_node("output", label=kind.output_label, kind="output")
    for index in cell.concat:
        graph.add_edge(index, "output", label="")
    return graph


def _dot_source(graph):
    lines = ["digraph cell {", "  rankdir=LR;", '  node [fontname="Helvetica"];']
    colours = {"input": "lightblue", "node": "lightgrey", "output": "palegoldenrod"}
    for node, data in graph.nodes(data=True):
        shape = "box" if data["kind"] != "node" else "circle"
        lines.append(f'  "{node}" [label="{data["label"]}", shape={shape}, style=filled, '
                     f'fillcolor={colours[data["kind"]]}];')
    for u, v, data in graph.edges(data=True):
        lines.append(f'  "{u}" -> "{v}" [label="{data["label"]}"];')
    lines.append("}")
    return "\n".join(lines)


def draw_cell(cell, base, kind, title=""):
    """Write ``base.png`` and ``base.svg`` of one derived cell of ``kind``."""
    graph = cell_graph(cell, kind)
    dot = shutil.which("dot")
    if dot:
        source = _dot_source(graph)
        for extension in FORMATS:
            subprocess.run([dot, f"-T{extension}", "-o", f"{base}.{extension}"], input=source, text=True,
                           check=True, capture_output=True)
        return [f"{base}.{extension}" for extension in FORMATS]
    for layer, nodes in enumerate(nx.topological_generations(graph)):
        for node in nodes:
            graph.nodes[node]["layer"] = layer
    positions = nx.multipartite_layout(graph, subset_key="layer")
    figure, axes = subplots(figsize=(2 + 1.4 * graph.number_of_nodes(), 4))
    colours = {"input": "#a6cee3", "node": "#dddddd", "output": "#fdbf6f"}
    nx.draw_networkx_nodes(graph, positions, ax=axes, node_size=900,
                           node_color=[colours[d["kind"]] for _, d in graph.nodes(data=True)])
    nx.draw_networkx_labels(graph, positions, ax=axes, labels=nx.get_node_attributes(graph, "label"), font_size=8)
    nx.draw_networkx_edges(graph, positions, ax=axes, arrows=True, node_size=900, connectionstyle="arc3,rad=0.1")
    labels = {(u, v): d["label"] for u, v, d in graph.edges(data=True) if d["label"]}
    nx.draw_networkx_edge_labels(graph, positions, edge_labels=labels, ax=axes, font_size=7)
    axes.set_title(title)
    axes.axis("off")
    return save(figure, base)


def edge_labels(kind, nodes):
    """``source->target`` for each alpha row of a cell of ``kind`` with ``nodes`` intermediate nodes."""
    return [f"{i}->{j}" for i, j in kind.alpha_edges(nodes)]


def make_plots(run_dir):
    """All pictures of a finished (or stopped) search; returns the written paths."""
    history = rundir.read_json(os.path.join(run_dir, "search", "history.json"))
    derived = load_derived(os.path.join(run_dir, "derived.yaml"))
    kind = kind_of(derived)
    folder = os.path.join(run_dir, "plots")
    os.makedirs(folder, exist_ok=True)
    written = []
    for cell_type, cell in derived.cells.items():
        written += draw_cell(cell, os.path.join(folder, f"cell_{cell_type}"), kind, f"{derived.name}: {cell_type}")
    operations = list(derived.operations)
    last = history[-1]["alpha_softmax"]
    for cell_type, probabilities in last.items():
        labels = edge_labels(kind, len(derived.cells[cell_type].nodes))
        figure = heatmap_figure(probabilities, operations, labels,
                                f"softmax(alpha_{cell_type}) after epoch {history[-1]['epoch']}")
        written += save(figure, os.path.join(folder, f"alphas_{cell_type}"))
        written += _evolution(history, cell_type, operations, labels, os.path.join(folder, f"alpha_evolution_{cell_type}"))
    written += _diagnostics(history, os.path.join(folder, "diagnostics"))
    return written


def _evolution(history, cell_type, operations, labels, base):
    series = np.array([record["alpha_softmax"][cell_type] for record in history])  # (epochs, edges, ops)
    epochs = [record["epoch"] for record in history]
    columns = min(7, len(labels))
    rows = -(-len(labels) // columns)
    figure, axes = subplots(rows, columns, figsize=(2.2 * columns, 1.8 * rows), sharex=True, sharey=True,
                                squeeze=False)
    for index, label in enumerate(labels):
        ax = axes[index // columns][index % columns]
        for o, name in enumerate(operations):
            ax.plot(epochs, series[:, index, o], label=name, marker="." if len(epochs) < 12 else None)
        ax.set_title(label, fontsize=8)
    for index in range(len(labels), rows * columns):
        axes[index // columns][index % columns].axis("off")
    handles, names = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, names, loc="upper center", ncol=len(operations), fontsize=7)
    figure.supxlabel("epoch")
    figure.supylabel(f"softmax(alpha_{cell_type})")
    return save(figure, base)


def _diagnostics(history, base):
    epochs = [record["epoch"] for record in history]
    figure, (left, right) = subplots(1, 2, figsize=(9, 3))
    left.plot(epochs, [record.get("skip_connections", np.nan) for record in history], marker="o",
              label="skip connections")
    left.plot(epochs, [record.get("parameter_free", np.nan) for record in history], marker="s",
              label="parameter-free ops")
    left.set_xlabel("epoch")
    left.set_title("derived normal cell" if "normal" in history[-1]["alpha_softmax"] else "derived cell", fontsize=9)
    left.legend(fontsize=7)
    right.plot(epochs, [record.get("hessian_eigenvalue", np.nan) for record in history], marker="o", color="C3")
    right.set_xlabel("epoch")
    right.set_title("dominant eigenvalue of the alpha Hessian", fontsize=9)
    return save(figure, base)
