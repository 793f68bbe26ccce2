"""What a derived network's latency is made of: each block it runs, at the shape it sees there.

A derived network runs blocks of two sorts. The stem (behind the input
normalisation an exported network starts with), each cell's two
preprocessing layers and the head (global pool, classifier, softmax) are the
same whatever the cells hold; the ops on the cells' edges are what the
architecture chooses. ``LatencyPlan`` names every block by a key holding the
block and its exact input and output shapes, in ProxylessNAS' form
``sep_conv_3x3-input:14x14x16-output:7x7x16``, since an op's latency depends
on resolution and width as well as on the op. Given a table of latencies by
key it gives the fixed part, the cost of each (edge, op) of each cell type
summed over the network's cells of that type, and the table's latency of a
derived network. The zero op and the identity cost nothing and need no entry.
"""

import numpy as np

from keras_darts.spec import ZERO_OPERATION, reduction_positions

from .graph import cell_edges, cell_schedule
from .ops import build_op
from .supernet import CELL_TYPES


def block_key(name, input_shape, output_shape):
    """``name-input:HxWxC-output:HxWxC`` (the head's output is its class count)."""
    return f"{name}-input:{'x'.join(map(str, input_shape))}-output:{'x'.join(map(str, output_shape))}"


def halved(size):
    """A stride-2 block's output size: the convolutions pad so that it is ``ceil(size / 2)``."""
    return (size + 1) // 2


def free_operation(operation, channels, stride):
    """Whether ``operation`` costs nothing at run time: the zero op, or an op that is the identity."""
    if operation == ZERO_OPERATION:
        return True
    return bool(getattr(build_op(operation, channels, stride, affine=True, layer_name="probe"), "is_identity", False))


class LatencyPlan:
    """The blocks of a derived network with ``network`` settings (a derived spec's ``network``) and ``nodes``.

    ``blocks`` maps each key to what builds it (a JSON-able description the
    measuring process reads); ``fixed`` lists the keys every architecture
    runs; ``cells`` holds, per cell, its type and each edge's key per op
    (``None`` for a free op).
    """

    def __init__(self, network, operations, nodes):
        self.operations = tuple(operations)
        self.nodes = int(nodes)
        self.edges = cell_edges(self.nodes)
        self.blocks, self.fixed, self.cells = {}, [], []
        self._free = {}  # (op, channels, stride) -> whether it is free: each op is built once to ask
        height, width, depth = network.input_shape
        channels = network.init_channels
        if network.stem == "cifar":
            s1 = (height, width, network.stem_multiplier * channels)
            self._fixed("stem_cifar", (height, width, depth), s1, block="stem", part=0, stem="cifar",
                        channels=channels, stem_multiplier=network.stem_multiplier)
            s0, reduction_prev = s1, False
        else:
            s0 = (halved(halved(height)), halved(halved(width)), channels)
            s1 = (halved(s0[0]), halved(s0[1]), channels)
            common = dict(block="stem", stem=network.stem, channels=channels, stem_multiplier=network.stem_multiplier)
            self._fixed("stem_imagenet0", (height, width, depth), s0, part=0, **common)
            self._fixed("stem_imagenet1", s0, s1, part=1, **common)
            reduction_prev = True
        positions = reduction_positions(network.reduction_cells, network.layers)
        for _, cell_channels, reduction, cell_reduction_prev in cell_schedule(
                network.layers, positions, channels, reduction_prev):
            s0, s1 = s1, self._cell(s0, s1, cell_channels, reduction, cell_reduction_prev)
        self._fixed("head", s1, (network.num_classes,), block="head", classes=network.num_classes)

    def _fixed(self, name, input_shape, output_shape, **description):
        key = block_key(name, input_shape, output_shape)
        self.blocks[key] = {"input": list(input_shape), **description}
        self.fixed.append(key)

    def _cell(self, s0, s1, channels, reduction, reduction_prev):
        inside = (s1[0], s1[1], channels)
        name = "preprocess_reduce" if reduction_prev else "preprocess_conv1x1"
        self._fixed(name, s0, inside, block="preprocess", part=0, reduction_prev=reduction_prev, channels=channels)
        self._fixed("preprocess_conv1x1", s1, inside, block="preprocess", part=1, reduction_prev=reduction_prev,
                    channels=channels)
        out = (halved(s1[0]), halved(s1[1]), channels) if reduction else inside
        keys = []
        for source, _ in self.edges:
            stride = 2 if reduction and source < 2 else 1
            seen = inside if source < 2 else out
            row = []
            for op in self.operations:
                if (op, channels, stride) not in self._free:
                    self._free[op, channels, stride] = free_operation(op, channels, stride)
                if self._free[op, channels, stride]:
                    row.append(None)
                    continue
                key = block_key(op, seen, out)
                self.blocks[key] = {"input": list(seen), "block": "op", "op": op, "stride": stride,
                                    "channels": channels}
                row.append(key)
            keys.append(row)
        self.cells.append(("reduce" if reduction else "normal", keys))
        return out[0], out[1], self.nodes * channels

    # -- with a table ------------------------------------------------------------------
    def missing(self, table):
        """The keys of ``blocks`` that ``table`` lacks, in plan order."""
        return [key for key in self.blocks if key not in table]

    def fixed_cost(self, table):
        """Milliseconds of the blocks every architecture runs."""
        return float(sum(table[key] for key in self.fixed))

    def edge_costs(self, table):
        """``{cell type: (edges x ops) array}``: each (edge, op)'s milliseconds, summed over the cells of the type."""
        costs = {t: np.zeros((len(self.edges), len(self.operations))) for t in CELL_TYPES}
        for cell_type, keys in self.cells:
            costs[cell_type] += [[0.0 if key is None else table[key] for key in row] for row in keys]
        return costs

    def genotype_cost(self, table, cells):
        """The table's milliseconds for the derived network whose cells are ``cells`` ({type: CellGenotype})."""
        total = self.fixed_cost(table)
        rows = {edge: index for index, edge in enumerate(self.edges)}
        columns = {op: index for index, op in enumerate(self.operations)}
        for cell_type, keys in self.cells:
            for offset, node in enumerate(cells[cell_type].nodes):
                for edge in node:
                    key = keys[rows[(edge.input, offset + 2)]][columns[edge.op]]
                    total += 0.0 if key is None else table[key]
        return total
