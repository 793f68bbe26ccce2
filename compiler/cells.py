"""MixedOp, the search cell and the derived cell, built by walking cell DAGs."""

import keras
from keras import ops

from keras_darts.spec import CellGenotype, Edge

from .graph import build_cell_graph, build_derived_graph, concat_nodes, incoming_edges, node_order
from .ops import (
    PACKAGE,
    FactorizedReduce,
    Identity,
    IdentityConv1x1,
    ReLUConvBN,
    build_op,
    recorded,
    replica_uniform,
    separately,
    sum_all,
)

AUXILIARY_OPERATIONS = ("skip", "conv1")


def auxiliary_op(operation, channels, stride, name):
    """The auxiliary path of a mixed op (DARTS-): FactorizedReduce at stride 2, else the identity or a 1x1 conv."""
    if operation not in AUXILIARY_OPERATIONS:
        raise ValueError(f"Unknown auxiliary operation. Expected one of {AUXILIARY_OPERATIONS}. "
                         f"Received: operation={operation!r}")
    if stride == 2:
        return FactorizedReduce(channels, 2, affine=False, name=name)
    if operation == "conv1":
        return IdentityConv1x1(channels, 1, affine=False, name=name)
    return Identity(channels, 1, affine=False, name=name)


@keras.saving.register_keras_serializable(package=PACKAGE)
class MixedOp(keras.layers.Layer):
    """``sum_o p_o * o(x)`` over the candidate ops of one edge, plus ``beta * aux(x)`` with an auxiliary path.

    ``call(x, weights)`` takes the op weights of this edge (the softmax row
    in DARTS), followed by ``beta`` when ``auxiliary`` names an auxiliary
    path. Ops whose output is identically zero (``none``) contribute nothing
    and are not computed; their probability still takes its share of the
    softmax, so alpha gradients are unchanged.
    """

    def __init__(self, operations, channels, stride, auxiliary=None, sampled=False, partial_channels=1,
                 edge_scaled=False, stage_partial_channels=None, **kwargs):
        super().__init__(**kwargs)
        self.operations = tuple(operations)
        self.channels = channels
        self.stride = stride
        self.auxiliary = auxiliary
        self.sampled = bool(sampled)
        self.edge_scaled = bool(edge_scaled)
        self.partial_channels = int(partial_channels)
        # DrNAS' progressive search: one set of ops per stage, each on its own C/K channels (stage 0's
        # named as without stages); ``use_stage`` switches between them and leaves out pruned ops.
        self.stage_partial_channels = (None if stage_partial_channels is None
                                       else tuple(int(k) for k in stage_partial_channels))
        stages = self.stage_partial_channels or (int(partial_channels),)
        self.stage_candidates = [
            [build_op(name, channels // k, stride, affine=False,
                      layer_name=f"{self.name}__{name}" if s == 0 else f"{self.name}__stage_{s}__{name}",
                      search=True)
             for name in self.operations]
            for s, k in enumerate(stages)
        ]
        self.use_stage(0)
        self.auxiliary_path = (None if auxiliary is None
                               else auxiliary_op(auxiliary, self.op_channels, stride, f"{self.name}__auxiliary"))
        # PC-DARTS: the channels the ops do not see pass by, max-pooled at stride 2.
        self.bypass_pool = (keras.layers.MaxPooling2D(2, 2, name=f"{self.name}__bypass_pool")
                            if max(stages) > 1 and stride == 2 else None)

    def use_stage(self, stage, kept=None):
        """Compute stage ``stage``'s ops (on its C/K channels), only those in ``kept`` (op indices) if given."""
        self.stage = int(stage)
        if self.stage_partial_channels:
            self.partial_channels = self.stage_partial_channels[self.stage]
        self.op_channels = self.channels // self.partial_channels
        self.candidates = self.stage_candidates[self.stage]
        self.kept = None if kept is None else frozenset(int(i) for i in kept)
        self.active = [i for i, op in enumerate(self.candidates)
                       if not getattr(op, "is_zero", False) and (self.kept is None or i in self.kept)]

    def build(self, *args, **kwargs):
        self.built = True

    def call(self, x, weights, training=None):
        if self.partial_channels > 1:
            x, bypass = x[..., : self.op_channels], x[..., self.op_channels:]
        y = self._mixed(x, weights, training)
        if self.partial_channels > 1:
            if self.bypass_pool is not None:
                bypass = self.bypass_pool(bypass)
            y = channel_shuffle(ops.concatenate([y, bypass], axis=-1), self.partial_channels)
        if self.edge_scaled:
            y = ops.cast(weights[-1], y.dtype) * y
        return y

    def _mixed(self, x, weights, training):
        if self.sampled and training:
            return self._sampled(x, weights, training)
        scalars = [weights[i] for i in self.active]
        terms = [self.candidates[i](x, training=training) for i in self.active]
        if self.auxiliary_path is not None:
            scalars.append(weights[len(self.operations)])
            terms.append(self.auxiliary_path(x, training=training))
        return weighted_sum(scalars, terms)

    def _sampled(self, x, weights, training):
        """``h_k o_k(x)`` for the op ``k`` that the one-hot valued weights ``h`` select: no other op runs.

        ``tf.switch_case`` runs (and differentiates) one branch, so the other
        ops cost nothing forward or backward (GDAS); ``h_k`` carries the
        straight-through gradient to the alphas.
        """
        import tensorflow as tf

        selected = ops.argmax(ops.stack(weights[: len(self.operations)]))

        def branch(i):
            return lambda: ops.cast(weights[i], x.dtype) * self.candidates[i](x, training=training)

        return tf.switch_case(ops.cast(selected, "int32"), [branch(i) for i in range(len(self.operations))])

    def get_config(self):
        return {
            **super().get_config(),
            "operations": list(self.operations),
            "channels": self.channels,
            "stride": self.stride,
            "auxiliary": self.auxiliary,
            "sampled": self.sampled,
            "partial_channels": self.partial_channels,
            "edge_scaled": self.edge_scaled,
            "stage_partial_channels": (None if self.stage_partial_channels is None
                                       else list(self.stage_partial_channels)),
        }


def channel_shuffle(x, groups):
    """ShuffleNet's channel shuffle, channels last: channel ``g * (C / groups) + j`` moves to ``j * groups + g``."""
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    x = ops.reshape(x, (-1, height, width, groups, channels // groups))
    x = ops.transpose(x, (0, 1, 2, 4, 3))
    return ops.reshape(x, (-1, height, width, channels))


def weighted_sum(scalars, tensors):
    """``sum_i scalars[i] * tensors[i]``, with a lean gradient on the TensorFlow backend.

    Differentiating the plain expression broadcasts every scalar against its
    tensor, and TensorFlow's gradient for that holds about a dozen graph
    nodes per term (shapes, broadcast arguments, reductions, reshapes), over a
    third of a supernet's backward graph. The gradient here is the same
    mathematics in two nodes per input: ``d/ds_i = sum(upstream * t_i)`` and
    ``d/dt_i = s_i * upstream``. Its own ops are ordinary and differentiable,
    so exact second order differentiates through it.

    The sum is recorded on the gradient tapes as one operation with one
    output, as ``tf.custom_gradient`` records it when executing eagerly.
    Inside a traced function ``tf.custom_gradient`` instead passes the
    result and every input through one ``IdentityN`` and records that, so
    each backward pass builds a tensor of zeros for each input passed
    through, which the gradient never reads: at SMALL 14 per edge, 1,960
    nodes of each pass body.
    """
    if len(tensors) == 1 or keras.backend.backend() != "tensorflow":
        total = None
        for scalar, tensor in zip(scalars, tensors):
            total = scalar * tensor if total is None else total + scalar * tensor
        return total
    import tensorflow as tf

    inputs = [tf.convert_to_tensor(t) for t in (*scalars, *tensors)]
    scalars, tensors = inputs[:len(scalars)], inputs[len(scalars):]

    def forward():
        return tf.add_n([tf.cast(s, t.dtype) * t for s, t in zip(scalars, tensors)])

    by_scalar = [lambda upstream, t=t: sum_all(upstream * t) for t in tensors]
    by_tensor = [lambda upstream, s=s: tf.cast(s, upstream.dtype) * upstream for s in scalars]
    return recorded("WeightedSum", inputs, forward, separately(by_scalar + by_tensor))


class _Wiring:
    """Which layer feeds which node, kept out of Keras/TF attribute tracking.

    ``steps`` is ``[(node, [(source, layer index, extra), ...]), ...]`` in
    evaluation order; the layers themselves live in a tracked list.
    """

    def __init__(self, steps):
        self.steps = steps


class _Cell(keras.layers.Layer):
    """What both cells share: two preprocessed inputs, nodes summed in the
    wiring's order, the output concatenating ``self.concat``."""

    def build(self, *args, **kwargs):
        self.built = True

    def evaluate(self, s0, s1, training, edge):
        """Run the cell; ``edge(state, layer index, extra)`` gives one edge's term."""
        states = {0: self.preprocess0(s0, training=training), 1: self.preprocess1(s1, training=training)}
        for node, inputs in self.wiring.steps:
            total = None
            for source, layer, extra in inputs:
                term = edge(states[source], layer, extra)
                total = term if total is None else total + term
            states[node] = total
        return ops.concatenate([states[n] for n in self.concat], axis=-1)


def _preprocessing(channels, reduction_prev, affine, prefix):
    if reduction_prev:
        pre0 = FactorizedReduce(channels, 2, affine, name=f"{prefix}__preprocess0")
    else:
        pre0 = ReLUConvBN(channels, 1, affine, kernel_size=1, name=f"{prefix}__preprocess0")
    pre1 = ReLUConvBN(channels, 1, affine, kernel_size=1, name=f"{prefix}__preprocess1")
    return pre0, pre1


@keras.saving.register_keras_serializable(package=PACKAGE)
class SearchCell(_Cell):
    """A search cell: every intermediate node sums MixedOps over all predecessors.

    ``call(s0, s1, weights)`` takes the outputs of the previous two cells and
    the cell type's op weights, one row of scalars per edge (with the
    auxiliary path's weight last when ``auxiliary`` is set).
    """

    def __init__(self, operations, nodes, channels, reduction, reduction_prev, auxiliary=None, sampled=False,
                 partial_channels=1, edge_scaled=False, stage_partial_channels=None, **kwargs):
        super().__init__(**kwargs)
        self.operations = tuple(operations)
        self.nodes = nodes
        self.channels = channels
        self.reduction = bool(reduction)
        self.reduction_prev = bool(reduction_prev)
        self.auxiliary = auxiliary
        self.sampled = bool(sampled)
        self.partial_channels = int(partial_channels)
        self.edge_scaled = bool(edge_scaled)
        self.stage_partial_channels = (None if stage_partial_channels is None
                                       else tuple(int(k) for k in stage_partial_channels))
        self.graph = build_cell_graph(self.operations, nodes, self.reduction)
        self.preprocess0, self.preprocess1 = _preprocessing(channels, self.reduction_prev, False, self.name)
        self.mixed_ops = []
        self.mixed_op_rows = []  # the alpha row of each mixed op
        steps = []
        for node in node_order(self.graph):
            inputs = []
            for source, target, data in incoming_edges(self.graph, node):
                inputs.append((source, len(self.mixed_ops), data["index"]))
                self.mixed_op_rows.append(data["index"])
                self.mixed_ops.append(
                    MixedOp(self.operations, channels, data["stride"], auxiliary, sampled, self.partial_channels,
                            self.edge_scaled, self.stage_partial_channels,
                            name=f"{self.name}__edge_{source}_{target}")
                )
            steps.append((node, inputs))
        self.wiring = _Wiring(steps)
        self.concat = tuple(concat_nodes(self.graph))

    def call(self, s0, s1, weights, training=None):
        return self.evaluate(
            s0, s1, training, lambda x, layer, row: self.mixed_ops[layer](x, weights[row], training=training)
        )

    def get_config(self):
        return {
            **super().get_config(),
            "operations": list(self.operations),
            "nodes": self.nodes,
            "channels": self.channels,
            "reduction": self.reduction,
            "reduction_prev": self.reduction_prev,
            "auxiliary": self.auxiliary,
            "sampled": self.sampled,
            "partial_channels": self.partial_channels,
            "edge_scaled": self.edge_scaled,
            "stage_partial_channels": (None if self.stage_partial_channels is None
                                       else list(self.stage_partial_channels)),
        }


def genotype_from_config(config):
    nodes = tuple(tuple(Edge(e["op"], e["input"]) for e in node) for node in config["nodes"])
    return CellGenotype(nodes=nodes, concat=tuple(config["concat"]))


@keras.saving.register_keras_serializable(package=PACKAGE)
class DerivedCell(_Cell):
    """A derived cell: each node sums its chosen ops; affine BN, no BN after pools.

    In training, with ``drop_path_rate > 0``, each op output except the
    identity is dropped per example with that probability and rescaled.
    """

    def __init__(self, genotype, channels, reduction, reduction_prev, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.genotype = genotype if isinstance(genotype, CellGenotype) else genotype_from_config(genotype)
        self.channels = channels
        self.reduction = bool(reduction)
        self.reduction_prev = bool(reduction_prev)
        self.seed = seed
        self.graph = build_derived_graph(self.genotype, self.reduction)
        self.preprocess0, self.preprocess1 = _preprocessing(channels, self.reduction_prev, True, self.name)
        self.all_ops = []
        steps = []
        for node in node_order(self.graph):
            inputs = []
            for source, _, data in incoming_edges(self.graph, node):
                layer = build_op(
                    data["op"], channels, data["stride"], affine=True,
                    layer_name=f"{self.name}__node{node}_{data['order']}_{data['op']}",
                )
                inputs.append((source, len(self.all_ops), getattr(layer, "is_identity", False)))
                self.all_ops.append(layer)
            steps.append((node, inputs))
        self.wiring = _Wiring(steps)
        self.concat = tuple(concat_nodes(self.graph))
        self.seed_generator = keras.random.SeedGenerator(seed, name=f"{self.name}__drop_path_seed")

    def _drop_path(self, x, rate):
        keep = 1.0 - ops.cast(rate, "float32")
        batch = ops.shape(x)[0]
        mask = ops.cast(replica_uniform((batch, 1, 1, 1), self.seed_generator, "float32") < keep, x.dtype)
        return x / ops.cast(keep, x.dtype) * mask

    def call(self, s0, s1, drop_path_rate=None, training=None):
        drop = training and drop_path_rate is not None

        def edge(x, layer, is_identity):
            h = self.all_ops[layer](x, training=training)
            return self._drop_path(h, drop_path_rate) if drop and not is_identity else h

        return self.evaluate(s0, s1, training, edge)

    def get_config(self):
        return {
            **super().get_config(),
            "genotype": self.genotype.to_document(),
            "channels": self.channels,
            "reduction": self.reduction,
            "reduction_prev": self.reduction_prev,
            "seed": self.seed,
        }
