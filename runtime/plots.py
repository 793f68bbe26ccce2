"""Pictures of a search: derived cells, alpha heatmaps, each edge's op weights over time, diagnostics.

``make_plots(run_dir)`` reads a run's ``derived.yaml`` and
``search/history.json`` and writes PNG and SVG files into ``run_dir/plots``.
Cells are drawn by graphviz's ``dot`` when it is installed, otherwise with
matplotlib and networkx.
"""

import dataclasses
import os
import shutil
import subprocess

import matplotlib.path as mpath
import networkx as nx
import numpy as np
from matplotlib.ticker import MaxNLocator

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


# The fallback drawing's geometry, in data units; one unit is INCH inches on the page.
INCH = 0.9
LAYER_GAP, ROW_GAP, RADIUS = 3.2, 1.5, 0.3
CHAR_WIDTH, LABEL_HEIGHT = 0.075, 0.24  # 7-point text at INCH inches per unit
BOX_HEIGHT = 0.5


@dataclasses.dataclass
class CellLayout:
    """Where everything of a drawn cell goes: node centres and half sizes, edge paths, edge label boxes."""

    centres: dict
    half_sizes: dict  # node -> (half width, half height); circles have both equal to their radius
    paths: dict  # (source, target) -> (samples, 2) points from centre to centre
    labels: dict  # (source, target) -> (x, y, half width, half height) of the label's box

    def inside(self, point, node, margin=0.0):
        (x, y), (hw, hh) = self.centres[node], self.half_sizes[node]
        if hw == hh and self.half_sizes[node] == (RADIUS, RADIUS):
            return np.hypot(point[0] - x, point[1] - y) < RADIUS + margin
        return abs(point[0] - x) < hw + margin and abs(point[1] - y) < hh + margin


def _bezier(start, control, end, samples=80):
    t = np.linspace(0.0, 1.0, samples)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t ** 2 * end


def _through(points, samples=24):
    """A smooth curve through ``points`` (Catmull-Rom); a straight line between two."""
    points = [np.asarray(p, float) for p in points]
    if len(points) == 2:
        return _bezier(points[0], (points[0] + points[1]) / 2, points[1])
    padded = [2 * points[0] - points[1], *points, 2 * points[-1] - points[-2]]
    t = np.linspace(0.0, 1.0, samples, endpoint=False)[:, None]
    pieces = []
    for p0, p1, p2, p3 in zip(padded, padded[1:], padded[2:], padded[3:]):
        pieces.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                             + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3))
    return np.concatenate([*pieces, points[-1][None]])


def _boxes_overlap(a, b, margin=0.02):
    return abs(a[0] - b[0]) < a[2] + b[2] + margin and abs(a[1] - b[1]) < a[3] + b[3] + margin


def cell_layout(graph):
    """Lay out a cell as one draws it: inputs left, output right, nodes in topological layers.

    A node's layer is one more than its deepest input's. An edge that spans
    several layers passes each through the gap between that layer's nodes
    nearest its straight line (as graphviz routes through virtual nodes), on
    a smooth curve; where that curve would touch a node, a curve bent clear
    of every node replaces it. Labels sit on their curves where they overlap
    no node and as few other labels as can be.
    """
    layer = {}
    for node in nx.topological_sort(graph):
        kind = graph.nodes[node]["kind"]
        layer[node] = 0 if kind == "input" else 1 + max(layer[p] for p in graph.predecessors(node))
    last = max(layer.values())
    for node in graph.nodes:
        if graph.nodes[node]["kind"] == "output":
            layer[node] = last
    columns = {}
    for node in graph.nodes:
        columns.setdefault(layer[node], []).append(node)
    centres, half_sizes = {}, {}
    for column, nodes in columns.items():
        nodes.sort(key=str)
        for row, node in enumerate(nodes):
            centres[node] = np.array([column * LAYER_GAP, ((len(nodes) - 1) / 2 - row) * ROW_GAP])
            data = graph.nodes[node]
            if data["kind"] == "node":
                half_sizes[node] = (RADIUS, RADIUS)
            else:
                half_sizes[node] = (CHAR_WIDTH * len(data["label"]) / 2 + 0.15, BOX_HEIGHT / 2)
    layout = CellLayout(centres, half_sizes, {}, {})
    others = {(u, v): [n for n in graph.nodes if n not in (u, v)] for u, v in graph.edges()}

    def clear(path, edge):
        return not any(layout.inside(point, n, margin=0.12) for point in path for n in others[edge])

    used = {}  # (layer, slot) -> edges through it, so that edges sharing a gap lie side by side
    for u, v in sorted({(u, v) for u, v in graph.edges()}, key=lambda e: (layer[e[1]] - layer[e[0]], str(e))):
        start, end = centres[u], centres[v]
        # Through each layer it crosses, an edge passes a gap between that layer's
        # nodes (or above or below them): the one nearest its straight line.
        waypoints = [start]
        for crossed in range(layer[u] + 1, layer[v]):
            ys = sorted(centres[n][1] for n in columns[crossed])
            slots = [(a + b) / 2 for a, b in zip(ys, ys[1:])] + [ys[0] - ROW_GAP / 2, ys[-1] + ROW_GAP / 2]
            straight = start[1] + (end[1] - start[1]) * (crossed - layer[u]) / (layer[v] - layer[u])
            slot = min(slots, key=lambda y: abs(y - straight))
            count = used.get((crossed, slot), 0)
            used[(crossed, slot)] = count + 1
            room = ROW_GAP / 2 - RADIUS - 0.15  # an edge in a gap stays this far from its middle at most
            offset = float(np.clip(0.15 * ((count + 1) // 2) * (1 if count % 2 else -1), -room, room))
            waypoints.append(np.array([crossed * LAYER_GAP, slot + offset]))
        waypoints.append(end)
        path = _through(waypoints)
        if not clear(path, (u, v)):
            direction = end - start
            normal = np.array([-direction[1], direction[0]]) / np.linalg.norm(direction)
            for bend in [sign * step * 0.45 for step in range(1, 12) for sign in (1, -1)]:
                bent = _bezier(start, (start + end) / 2 + bend * normal, end)
                if clear(bent, (u, v)):
                    path = bent
                    break
        layout.paths[(u, v)] = path
    # Labels: the candidate spots on each curve, nearest its middle first; a few
    # rounds in which each label moves to the spot with the fewest overlaps.
    candidates = {}
    for (u, v), path in layout.paths.items():
        text = graph.edges[u, v, 0]["label"]
        if text:
            size = (CHAR_WIDTH * len(text) / 2 + 0.04, LABEL_HEIGHT / 2)
            order = np.argsort(np.abs(np.linspace(0, 1, len(path)) - 0.5), kind="stable")
            candidates[(u, v)] = [(*path[i], *size) for i in order if 0.12 <= i / (len(path) - 1) <= 0.88]
    node_boxes = [(*centres[n], *half_sizes[n]) for n in graph.nodes]
    for _ in range(4):
        for edge, spots in candidates.items():
            others = [box for other, box in layout.labels.items() if other != edge]

            def clashes(box):
                return sum(_boxes_overlap(box, other) for other in others + node_boxes)

            layout.labels[edge] = min(spots, key=clashes)  # the first (most central) of the best
    return layout


def draw_cell(cell, base, kind, title=""):
    """Write ``base.png`` and ``base.svg`` of one derived cell of ``kind``.

    graphviz's ``dot`` draws it where it is installed (``apt-get install
    graphviz``); otherwise matplotlib draws ``cell_layout``.
    """
    graph = cell_graph(cell, kind)
    dot = shutil.which("dot")
    if dot:
        source = _dot_source(graph)
        for extension in FORMATS:
            subprocess.run([dot, f"-T{extension}", "-o", f"{base}.{extension}"], input=source, text=True,
                           check=True, capture_output=True)
        return [f"{base}.{extension}" for extension in FORMATS]
    from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

    layout = cell_layout(graph)
    points = np.array([p for path in layout.paths.values() for p in path] + list(layout.centres.values()))
    low = points.min(axis=0) - 0.9
    high = points.max(axis=0) + 0.9
    figure, axes = subplots(figsize=tuple((high - low) * INCH))
    axes.set_xlim(low[0], high[0])
    axes.set_ylim(low[1], high[1])
    axes.set_aspect("equal")
    colours = {"input": "#a6cee3", "node": "#dddddd", "output": "#fdbf6f"}
    for (u, v), path in layout.paths.items():
        outside = [p for p in path if not layout.inside(p, u) and not layout.inside(p, v)]
        axes.add_patch(FancyArrowPatch(path=mpath.Path(np.array(outside)), arrowstyle="-|>", mutation_scale=10,
                                       color="#555555", linewidth=1.0, zorder=1))
    for node, (x, y) in layout.centres.items():
        data = graph.nodes[node]
        hw, hh = layout.half_sizes[node]
        if data["kind"] == "node":
            axes.add_patch(Circle((x, y), RADIUS, facecolor=colours["node"], edgecolor="#333333", zorder=2))
        else:
            axes.add_patch(FancyBboxPatch((x - hw, y - hh), 2 * hw, 2 * hh, boxstyle="round,pad=0,rounding_size=0.1",
                                          facecolor=colours[data["kind"]], edgecolor="#333333", zorder=2))
        axes.text(x, y, data["label"], ha="center", va="center", fontsize=8, zorder=3)
    for (u, v), (x, y, _, _) in layout.labels.items():
        axes.text(x, y, graph.edges[u, v, 0]["label"], ha="center", va="center", fontsize=7, zorder=4,
                  bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.9})
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
    axes[0][0].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by every panel
    figure.supxlabel("epoch")
    figure.supylabel(f"softmax(alpha_{cell_type})")
    return save(figure, base)


def _diagnostics(history, base):
    return save(diagnostics_figure(history), base)


def diagnostics_figure(history):
    """Skip connections and parameter-free ops of the derived cell, and the Hessian eigenvalue, per epoch."""
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
    for axes in (left, right):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    return figure
