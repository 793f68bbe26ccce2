"""Cells as networkx DAGs.

A cell has two input nodes (0 and 1: the outputs of the previous two cells),
``nodes`` intermediate nodes (2 ..) and one output node, ``"output"``, which
concatenates the intermediate nodes. Every intermediate node ``j`` takes an
edge from every node ``i < j``; an edge carries its candidate operations,
its stride (2 on edges leaving an input node of a reduction cell) and
``index``, its row in the cell type's architecture matrix. Rows are ordered
by target node, then source node, as in the reference implementation.
"""

import networkx as nx

from keras_darts.spec import SpecError

INPUT_NODES = (0, 1)
OUTPUT_NODE = "output"


def cell_edges(nodes):
    """The searchable edges ``(source, target)`` of a cell, in alpha-row order."""
    return [(i, j) for j in range(2, 2 + nodes) for i in range(j)]


def build_cell_graph(operations, nodes, reduction):
    """The frozen DAG of one search cell type."""
    graph = nx.DiGraph(operations=tuple(operations), nodes=nodes, reduction=bool(reduction))
    for i in INPUT_NODES:
        graph.add_node(i, role="input")
    for j in range(2, 2 + nodes):
        graph.add_node(j, role="intermediate")
    graph.add_node(OUTPUT_NODE, role="output")
    for index, (i, j) in enumerate(cell_edges(nodes)):
        stride = 2 if reduction and i in INPUT_NODES else 1
        graph.add_edge(i, j, index=index, candidates=tuple(operations), stride=stride)
    for j in range(2, 2 + nodes):
        graph.add_edge(j, OUTPUT_NODE, concat=True)
    return _check_and_freeze(graph)


def build_derived_graph(genotype, reduction):
    """The frozen DAG of one derived cell type: one edge per chosen (op, input).

    Two chosen edges may join the same pair of nodes (the same input twice with
    different ops), so this is a ``MultiDiGraph``; ``order`` keeps the
    genotype's listing order within a node.
    """
    graph = nx.MultiDiGraph(nodes=len(genotype.nodes), reduction=bool(reduction))
    for i in INPUT_NODES:
        graph.add_node(i, role="input")
    for n in range(len(genotype.nodes)):
        graph.add_node(n + 2, role="intermediate")
    graph.add_node(OUTPUT_NODE, role="output")
    for n, node in enumerate(genotype.nodes):
        for order, edge in enumerate(node):
            stride = 2 if reduction and edge.input in INPUT_NODES else 1
            graph.add_edge(edge.input, n + 2, op=edge.op, stride=stride, order=order)
    for index in genotype.concat:
        graph.add_edge(index, OUTPUT_NODE, concat=True)
    return _check_and_freeze(graph)


def _check_and_freeze(graph):
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        raise SpecError.single("<cell graph>", "$", f"the cell graph has a cycle: {cycle}")
    return nx.freeze(graph)


def node_order(graph):
    """Intermediate nodes in a stable topological order."""
    order = nx.lexicographical_topological_sort(graph, key=str)
    return [n for n in order if graph.nodes[n]["role"] == "intermediate"]


def incoming_edges(graph, node):
    """Edges into ``node``, sorted by their ``index`` (search) or ``order`` (derived)."""
    key = "order" if graph.is_multigraph() else "index"
    return sorted(graph.in_edges(node, data=True), key=lambda edge: edge[2][key])


def cell_schedule(layers, reduction_positions, init_channels, reduction_prev=False):
    """``(position, channels, reduction, reduction_prev)`` for each cell of a network.

    Channels double at every reduction cell; ``reduction_prev`` tells a cell
    that its first input comes from a reduction (or a stem that reduces).
    """
    channels = init_channels
    for position in range(layers):
        reduction = position in reduction_positions
        if reduction:
            channels *= 2
        yield position, channels, reduction, reduction_prev
        reduction_prev = reduction


def concat_nodes(graph):
    """The nodes the cell output concatenates, in node order."""
    return sorted(u for u, _ in graph.in_edges(OUTPUT_NODE))
