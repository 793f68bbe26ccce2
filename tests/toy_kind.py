"""A third search-space kind, written outside the package: cells of dense layers on flattened images.

``mlp_cell`` specs are laid out as ``conv_cell`` ones. Its cells work on
vectors: each cell maps both inputs to the cell's width with a dense layer,
every intermediate node sums mixed ops over its predecessors, and the cell
outputs the mean of its intermediate nodes; reduction cells double the width.
Its ops are ``none``, ``skip_connect`` and two dense ops it registers. Imported
by a spec (``plugins: [tests.toy_kind]``), it runs through compile-and-search
to a SavedModel without any change to the runtime.
"""

import keras
from keras import ops

from keras_darts.compiler import build_op, register_op
from keras_darts.compiler.cells import MixedOp
from keras_darts.compiler.graph import cell_edges, cell_schedule
from keras_darts.compiler.methods import MethodSupernet, search_method
from keras_darts.compiler.supernet import split_rows
from keras_darts.runtime.kinds import ConvCellKind, register_kind
from keras_darts.spec import check_derived, derived_from_document

PACKAGE = "toy_kind"
CELL_TYPES = ("normal", "reduce")


@keras.saving.register_keras_serializable(package=PACKAGE)
class DenseOp(keras.layers.Layer):
    def __init__(self, units, activation, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.activation = activation
        self.dense = keras.layers.Dense(units, activation=activation, name=f"{self.name}__dense")

    def call(self, x, training=None):
        return self.dense(x)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "activation": self.activation}


for _activation in ("relu", "tanh"):
    register_op(f"dense_{_activation}", lambda c, s, a, n, f=_activation: DenseOp(c, f, name=n))


@keras.saving.register_keras_serializable(package=PACKAGE)
class VectorCell(keras.layers.Layer):
    """Search cell (``genotype=None``: mixed ops on every edge) or derived cell (the genotype's ops)."""

    def __init__(self, operations, nodes, width, genotype=None, **kwargs):
        super().__init__(**kwargs)
        self.operations = tuple(operations)
        self.nodes = nodes
        self.width = width
        self.genotype = genotype
        self.pre0 = keras.layers.Dense(width, activation="relu", name=f"{self.name}__pre0")
        self.pre1 = keras.layers.Dense(width, activation="relu", name=f"{self.name}__pre1")
        self.edges = cell_edges(nodes)
        if genotype is None:
            self.edge_ops = [MixedOp(self.operations, width, 1, name=f"{self.name}__edge_{i}_{j}")
                             for i, j in self.edges]
        else:
            self.edge_ops = [build_op(edge["op"], width, 1, affine=True, layer_name=f"{self.name}__node{n + 2}_{e}")
                             for n, node in enumerate(genotype["nodes"]) for e, edge in enumerate(node)]

    def build(self, *args, **kwargs):
        self.built = True

    def call(self, s0, s1, weights=None, training=None):
        states = [self.pre0(s0), self.pre1(s1)]
        if self.genotype is None:
            for j in range(2, 2 + self.nodes):
                states.append(sum(self.edge_ops[row](states[i], weights[row], training=training)
                                  for row, (i, target) in enumerate(self.edges) if target == j))
        else:
            layers = iter(self.edge_ops)
            for node in self.genotype["nodes"]:
                states.append(sum(next(layers)(states[edge["input"]], training=training) for edge in node))
        return ops.mean(ops.stack(states[2:]), axis=0)

    def get_config(self):
        return {**super().get_config(), "operations": list(self.operations), "nodes": self.nodes,
                "width": self.width, "genotype": self.genotype}


def _cells(operations, nodes, width, layers, positions, genotypes=None):
    return [VectorCell(operations, nodes, cell_width,
                       None if genotypes is None else genotypes["reduce" if reduction else "normal"],
                       name=f"cell_{position:02d}")
            for position, cell_width, reduction, _ in cell_schedule(layers, positions, width)]


@keras.saving.register_keras_serializable(package=PACKAGE)
class VectorSupernet(MethodSupernet, keras.Model):
    def __init__(self, operations, nodes, width, layers, reduction_positions, num_classes, input_shape, method=None,
                 seed=None, **kwargs):
        super().__init__(**kwargs)
        self.operations, self.nodes, self.width, self.layers_count = tuple(operations), nodes, width, layers
        self.reduction_positions, self.num_classes = tuple(reduction_positions), num_classes
        self.image_shape = tuple(input_shape)
        self.seed = seed
        self.stem = keras.layers.Dense(width, activation="relu", name="stem")
        self.cells = _cells(self.operations, nodes, width, layers, self.reduction_positions)
        self.classifier = keras.layers.Dense(num_classes, name="classifier")
        self.alphas = {t: self.add_weight(shape=(len(cell_edges(nodes)), len(self.operations)), name=f"alpha_{t}",
                                          initializer=keras.initializers.RandomNormal(stddev=1e-3, seed=seed))
                       for t in CELL_TYPES}
        self.use_method(method)

    def build(self, input_shape):
        self.call(ops.zeros((1, *self.image_shape)))
        self.built = True

    def call(self, inputs, training=None):
        rows = {t: split_rows(self.method.mix(self.alphas[t])) for t in CELL_TYPES}
        s0 = s1 = self.stem(ops.reshape(inputs, (ops.shape(inputs)[0], -1)))
        for position, cell in enumerate(self.cells):
            cell_type = "reduce" if position in self.reduction_positions else "normal"
            s0, s1 = s1, cell(s0, s1, rows[cell_type], training=training)
        return self.classifier(s1)

    def get_config(self):
        return {"operations": list(self.operations), "nodes": self.nodes, "width": self.width,
                "layers": self.layers_count, "reduction_positions": list(self.reduction_positions),
                "num_classes": self.num_classes, "input_shape": list(self.image_shape),
                "method": self.method.to_document(), "seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class VectorNetwork(keras.Model):
    def __init__(self, derived, seed=None, synchronized=False, **kwargs):
        super().__init__(**kwargs)
        self.derived = derived if not isinstance(derived, dict) else derived_from_document(derived)
        network = self.derived.network
        genotypes = {t: c.to_document() for t, c in self.derived.cells.items()}
        self.seed, self.synchronized = seed, synchronized
        self.stem = keras.layers.Dense(network.init_channels, activation="relu", name="stem")
        self.cells = _cells(self.derived.operations, len(genotypes["normal"]["nodes"]), network.init_channels,
                            network.layers, network.reduction_positions, genotypes)
        self.classifier = keras.layers.Dense(network.num_classes, name="classifier")
        # Retraining ramps a drop-path rate; these cells have no paths to drop.
        self.drop_path_rate = self.add_weight(shape=(), initializer="zeros", trainable=False, name="drop_path_rate")

    def build(self, input_shape):
        self.call(ops.zeros((1, *self.derived.network.input_shape)))
        self.built = True

    def call(self, inputs, training=None):
        s0 = s1 = self.stem(ops.reshape(inputs, (ops.shape(inputs)[0], -1)))
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, training=training)
        return self.classifier(s1)

    def get_config(self):
        return {"derived": self.derived.to_document(), "seed": self.seed, "synchronized": self.synchronized}


class MlpCellKind(ConvCellKind):
    name = "mlp_cell"
    spec_layout = "conv_cell"
    cell_inputs = {0: "h_{k-2}", 1: "h_{k-1}"}
    output_rule = "mean of"
    output_label = "h_k (mean)"
    parameter_free = ("skip_connect",)

    def build_supernet(self, spec):
        space = spec.search_space
        network = space.network
        model = VectorSupernet(space.operations, space.nodes, network.init_channels, network.layers,
                               space.reduction_positions, network.num_classes, network.input_shape,
                               method=search_method(spec).to_document(), seed=spec.search.seed)
        model.build((None, *network.input_shape))
        return model

    def build_network(self, derived, seed=None, synchronized=False):
        model = VectorNetwork(check_derived(derived), seed=seed, synchronized=synchronized)
        model.build((None, *derived.network.input_shape))
        return model

    def describe_space(self, spec):
        space = spec.search_space
        return f"dense cells: {space.nodes} nodes, k: {space.k}, width {space.network.init_channels}"


register_kind(MlpCellKind())
