"""Recurrent cells with highway connections and the language model around them.

The cell (DARTS section 6), for input ``x`` and previous hidden state ``h``:

    [c0, h0] = [x * mx, h * mh] @ W0,   s0 = h + sigmoid(c0) * (tanh(h0) - h)

and for every searched node ``i`` with its one matrix ``W_i`` (hidden ->
2 hidden), shared by all its incoming edges, along edge ``j -> i`` with
activation ``f``:

    [c, g] = (s_j * mh) @ W_i,          u = s_j + sigmoid(c) * (f(g) - s_j)

the highway connection. A search node sums ``u`` over predecessors and ops
(other than ``none``) weighted by ``softmax(alpha)``; a derived node has one
predecessor and one op (with k > 1, the sum over its edges). The new hidden
state is the mean of nodes 1..N (or node N with ``output: last``). In search,
a BN without affine parameters normalises ``s0`` and every node with the
batch's statistics at each step. Without ``highway`` a node is ``f(s_j @ W_i)``
with ``W_i`` hidden -> hidden, and ``s0 = tanh([x, h] @ W0)``.

``mx`` and ``mh`` are variational dropout masks, fixed over a sequence. The
language model embeds tokens (whole-word dropout on the embedding matrix,
locked dropout on its output), runs the cell over time with ``keras.ops.scan``
(one compiled loop, not a Python loop) and decodes with the embedding matrix
(tied) or its own, to logits over the vocabulary.
"""

import keras
import networkx as nx
from keras import ops

from keras_darts.spec import ZERO_OPERATION, CellGenotype, Edge, derived_from_document

from .graph import _check_and_freeze, incoming_edges, node_order
from .methods import MethodSupernet, search_method
from .ranking import DARTS, rank_edges
from .ops import BN_EPSILON, PACKAGE, cross_replica_moments

ACTIVATIONS = {
    "tanh": ops.tanh,
    "relu": ops.relu,
    "sigmoid": ops.sigmoid,
    "identity": lambda x: x,
}
ALPHA_STDDEV = 1e-3
EMBEDDING_INIT_RANGE = 0.1
CELL_TYPE = "recurrent"
# Dropout masks by name: what each one multiplies.
MASK_NAMES = ("words", "embedding", "cell_input", "hidden", "output")


# -- graphs -----------------------------------------------------------------------
def recurrent_edges(nodes):
    """The searchable edges ``(source, target)`` of a recurrent cell, in alpha-row order."""
    return [(j, i) for i in range(1, nodes + 1) for j in range(i)]


def build_recurrent_cell_graph(operations, nodes):
    """The frozen DAG of the recurrent search cell; node 0 is fixed (from x and h)."""
    graph = nx.DiGraph(operations=tuple(operations), nodes=nodes)
    graph.add_node(0, role="fixed")
    for i in range(1, nodes + 1):
        graph.add_node(i, role="intermediate")
    for index, (j, i) in enumerate(recurrent_edges(nodes)):
        graph.add_edge(j, i, index=index, candidates=tuple(operations))
    return _check_and_freeze(graph)


def build_recurrent_derived_graph(genotype):
    """The frozen DAG of a derived recurrent cell: one edge per chosen (op, input)."""
    graph = nx.MultiDiGraph(nodes=len(genotype.nodes))
    graph.add_node(0, role="fixed")
    for n in range(len(genotype.nodes)):
        graph.add_node(n + 1, role="intermediate")
    for n, node in enumerate(genotype.nodes):
        for order, edge in enumerate(node):
            graph.add_edge(edge.input, n + 1, op=edge.op, order=order)
    return _check_and_freeze(graph)


def derive_recurrent_cell(alpha, operations, nodes, k=1, method=None):
    """The ``CellGenotype`` of a recurrent cell: DARTS' rule with k edges per node (k=1 in the paper)."""
    edges = recurrent_edges(nodes)
    chosen = rank_edges(alpha, operations, edges, range(1, nodes + 1), k, method or DARTS)
    return CellGenotype(nodes=chosen, concat=tuple(range(1, nodes + 1)))


# -- the cell -----------------------------------------------------------------------
def _normalize(x):
    """BN without affine parameters over the batch axis, with the batch's statistics (across replicas)."""
    synced = cross_replica_moments(x, (0,))
    if synced is not None:
        return (x - synced[0]) * ops.rsqrt(synced[1] + BN_EPSILON)
    mean = ops.mean(x, axis=0, keepdims=True)
    variance = ops.mean(ops.square(x - mean), axis=0, keepdims=True)
    return (x - mean) * ops.rsqrt(variance + BN_EPSILON)


def _uniform(init_range, seed):
    return keras.initializers.RandomUniform(-init_range, init_range, seed=seed)


@keras.saving.register_keras_serializable(package=PACKAGE)
class RecurrentCell(keras.layers.Layer):
    """One step of a recurrent search cell (``genotype=None``) or derived cell.

    ``step(x, h, weights, probabilities, masks)`` computes the new hidden
    state from tensors only (the kernels read once per sequence, so the time
    loop closes over them); ``call`` runs a whole time-major sequence.
    """

    def __init__(self, input_size, hidden_size, nodes=8, operations=None, genotype=None, highway=True,
                 output="mean", batch_norm=False, init_range=0.04, seed=None, **kwargs):
        super().__init__(**kwargs)
        if output not in ("mean", "last"):
            raise ValueError(f"output must be 'mean' or 'last'. Received: output={output!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.highway = highway
        self.output_mode = output
        self.batch_norm = batch_norm
        self.init_range = init_range
        self.seed = seed
        if isinstance(genotype, dict):
            genotype = CellGenotype(
                nodes=tuple(tuple(Edge(e["op"], e["input"]) for e in node) for node in genotype["nodes"]),
                concat=tuple(genotype.get("concat", range(1, len(genotype["nodes"]) + 1))),
            )
        self.genotype = genotype
        if genotype is None:
            self.operations = tuple(operations)
            self.nodes = nodes
            self.graph = build_recurrent_cell_graph(self.operations, nodes)
            self.active = [(o, name) for o, name in enumerate(self.operations) if name != ZERO_OPERATION]
        else:
            self.operations = None
            self.nodes = len(genotype.nodes)
            self.graph = build_recurrent_derived_graph(genotype)
        self.order = node_order(self.graph)
        width = 2 * hidden_size if highway else hidden_size
        self.w0 = self.add_weight(shape=(input_size + hidden_size, width), initializer=_uniform(init_range, seed),
                                  name="w0")
        self.node_weights = [
            self.add_weight(shape=(hidden_size, width),
                            initializer=_uniform(init_range, None if seed is None else seed + node),
                            name=f"w{node}")
            for node in self.order
        ]

    def build(self, *args, **kwargs):
        self.built = True

    def kernels(self):
        return [ops.convert_to_tensor(self.w0)] + [ops.convert_to_tensor(w) for w in self.node_weights]

    def _edge(self, state, projection, activation):
        if not self.highway:
            return activation(projection)
        gate, candidate = ops.split(projection, 2, axis=-1)
        return state + ops.sigmoid(gate) * (activation(candidate) - state)

    def _mixed_node(self, states, edges, kernel, probabilities, masks):
        """A search node: every predecessor projected in one matmul, ops mixed by their probabilities.

        ``sum_j sum_o p_jo (s_j + c_j (f_o(g_j) - s_j))`` is computed as
        ``sum_j [(sum_o p_jo) (1 - c_j) s_j + c_j sum_o p_jo f_o(g_j)]``
        over the ops other than ``none`` (highway) or ``sum_j sum_o p_jo f_o(s_j W)``.
        """
        rows = [data["index"] for _, _, data in edges]
        stacked = ops.stack([states[source] for source, _, _ in edges])  # (predecessors, batch, hidden)
        stacked_in = stacked * masks["hidden"] if "hidden" in masks else stacked
        projection = ops.matmul(stacked_in, kernel)
        node_probabilities = ops.take(probabilities, rows, axis=0)  # (predecessors, ops)
        if self.highway:
            gate, candidate = ops.split(projection, 2, axis=-1)
        else:
            candidate = projection
        mixed = None
        weight_sum = None
        for o, name in self.active:
            p = ops.reshape(node_probabilities[:, o], (-1, 1, 1))
            term = p * ACTIVATIONS[name](candidate)
            mixed = term if mixed is None else mixed + term
            weight_sum = p if weight_sum is None else weight_sum + p
        if not self.highway:
            return ops.sum(mixed, axis=0)
        gate = ops.sigmoid(gate)
        return ops.sum(weight_sum * (1.0 - gate) * stacked + gate * mixed, axis=0)

    def step(self, x, h, kernels, probabilities=None, masks=None):
        masks = masks or {}
        x_in = x * masks["cell_input"] if "cell_input" in masks else x
        h_in = h * masks["hidden"] if "hidden" in masks else h
        projection = ops.matmul(ops.concatenate([x_in, h_in], axis=-1), kernels[0])
        if self.highway:
            gate, candidate = ops.split(projection, 2, axis=-1)
            s0 = h + ops.sigmoid(gate) * (ops.tanh(candidate) - h)
        else:
            s0 = ops.tanh(projection)
        if self.batch_norm:
            s0 = _normalize(s0)
        states = {0: s0}
        for node, kernel in zip(self.order, kernels[1:]):
            edges = incoming_edges(self.graph, node)
            if self.genotype is None:
                total = self._mixed_node(states, edges, kernel, probabilities, masks)
            else:
                total = None
                for source, _, data in edges:
                    state = states[source]
                    state_in = state * masks["hidden"] if "hidden" in masks else state
                    term = self._edge(state, ops.matmul(state_in, kernel), ACTIVATIONS[data["op"]])
                    total = term if total is None else total + term
            states[node] = _normalize(total) if self.batch_norm else total
        if self.output_mode == "last":
            return states[self.order[-1]]
        outputs = [states[n] for n in self._averaged()]
        return ops.mean(ops.stack(outputs), axis=0)

    def _averaged(self):
        if self.genotype is not None:
            return self.genotype.concat
        return tuple(range(1, self.nodes + 1))

    def call(self, inputs, initial_state, probabilities=None, masks=None):
        """``inputs`` (time, batch, input_size) -> (outputs (time, batch, hidden), last state)."""
        kernels = self.kernels()

        def advance(h, x):
            h = self.step(x, h, kernels, probabilities, masks)
            return h, h

        last, outputs = ops.scan(advance, initial_state, inputs)
        return outputs, last

    def get_config(self):
        return {
            **super().get_config(),
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "nodes": self.nodes,
            "operations": None if self.operations is None else list(self.operations),
            "genotype": None if self.genotype is None else self.genotype.to_document(),
            "highway": self.highway,
            "output": self.output_mode,
            "batch_norm": self.batch_norm,
            "init_range": self.init_range,
            "seed": self.seed,
        }


# -- the language model --------------------------------------------------------------
class _LanguageModel(keras.Model):
    """Embedding, a recurrent cell over time, tied (or own) decoder.

    ``call(tokens, hidden, masks=None, training=None)`` takes ``tokens``
    (batch, time) int32 and ``hidden`` (batch, hidden_size) and returns
    ``(logits (batch, time, vocabulary), last hidden, outputs, dropped outputs)``:
    the cell outputs before and after output dropout (for activation
    regularisation). ``masks`` (see ``dropout_mask_shapes``) apply dropout;
    training without them draws fresh ones.
    """

    def _build_language_model(self, vocabulary_size, embedding_size, hidden_size, tie_weights, dropouts, seed):
        self.vocabulary_size = vocabulary_size
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.tie_weights = tie_weights
        self.dropouts = dict(dropouts)
        self.embedding = self.add_weight(
            shape=(vocabulary_size, embedding_size), initializer=_uniform(EMBEDDING_INIT_RANGE, seed),
            name="embedding",
        )
        if not tie_weights:
            self.decoder_kernel = self.add_weight(
                shape=(hidden_size, vocabulary_size),
                initializer=_uniform(EMBEDDING_INIT_RANGE, None if seed is None else seed + 1), name="decoder_kernel",
            )
        self.decoder_bias = self.add_weight(shape=(vocabulary_size,), initializer="zeros", name="decoder_bias")
        self.seed_generator = keras.random.SeedGenerator(seed, name="dropout_seed")

    def build(self, *args, **kwargs):
        self.call(ops.zeros((1, 1), "int32"), ops.zeros((1, self.hidden_size)))
        self.built = True

    def dropout_mask_shapes(self, batch_size):
        """Shape of each dropout mask for a batch of ``batch_size`` streams."""
        return {
            "words": (self.vocabulary_size, 1),
            "embedding": (batch_size, self.embedding_size),
            "cell_input": (batch_size, self.embedding_size),
            "hidden": (batch_size, self.hidden_size),
            "output": (batch_size, self.hidden_size),
        }

    def dropout_rates(self):
        return {name: self.dropouts[name] for name in MASK_NAMES}

    def draw_masks(self, batch_size):
        masks = {}
        for name, shape in self.dropout_mask_shapes(batch_size).items():
            rate = self.dropouts[name]
            if rate > 0:
                keep = keras.random.uniform(shape, seed=self.seed_generator) >= rate
                masks[name] = ops.cast(keep, "float32") / (1.0 - rate)
        return masks

    def initial_state(self, batch_size):
        return ops.zeros((batch_size, self.hidden_size))

    def probabilities(self):
        return None

    def call(self, tokens, hidden, masks=None, training=None):
        if training and masks is None:
            masks = self.draw_masks(ops.shape(tokens)[0])
        # In the layer's compute dtype (16 bits under mixed precision): a stateless call reads
        # the variables without autocasting them.
        dtype = self.compute_dtype
        masks = {name: ops.cast(mask, dtype) for name, mask in masks.items()} if training else {}
        embedding = ops.cast(self.embedding, dtype)
        if "words" in masks:
            embedding = embedding * masks["words"]
        x = ops.take(embedding, tokens, axis=0)  # (batch, time, embedding)
        if "embedding" in masks:
            x = x * ops.expand_dims(masks["embedding"], 1)
        outputs, last = self.cell(ops.transpose(x, (1, 0, 2)), hidden, self.probabilities(), masks)
        outputs = ops.transpose(outputs, (1, 0, 2))  # (batch, time, hidden)
        dropped = outputs * ops.expand_dims(masks["output"], 1) if "output" in masks else outputs
        # A tied decoder uses the embedding matrix itself, not its word-dropped copy.
        kernel = ops.cast(ops.transpose(self.embedding) if self.tie_weights else self.decoder_kernel, dtype)
        logits = ops.matmul(dropped, kernel) + ops.cast(self.decoder_bias, dtype)
        return logits, last, outputs, dropped


def _dropouts(config):
    return {
        "words": config.dropout_words,
        "embedding": config.dropout_embedding,
        "cell_input": config.dropout_cell_input,
        "hidden": config.dropout_hidden,
        "output": config.dropout_output,
    }


@keras.saving.register_keras_serializable(package=PACKAGE)
class RecurrentSupernet(MethodSupernet, _LanguageModel):
    """The language model with the recurrent search cell and its alpha (``alpha_recurrent``)."""

    def __init__(self, operations, nodes, vocabulary_size, embedding_size, hidden_size, dropouts,
                 tie_weights=True, highway=True, output="mean", batch_norm=True, init_range=0.04, seed=None,
                 method=None, **kwargs):
        kwargs.setdefault("name", "recurrent_supernet")
        super().__init__(**kwargs)
        self.operations = tuple(operations)
        self.nodes = nodes
        self.highway = highway
        self.output_mode = output
        self.batch_norm = batch_norm
        self.init_range = init_range
        self.seed = seed
        self._build_language_model(vocabulary_size, embedding_size, hidden_size, tie_weights, dropouts, seed)
        self.cell = RecurrentCell(
            embedding_size, hidden_size, nodes, self.operations, highway=highway, output=output,
            batch_norm=batch_norm, init_range=init_range, seed=None if seed is None else seed + 2, name="cell",
        )
        self.alpha = self.add_weight(
            shape=(len(recurrent_edges(nodes)), len(self.operations)),
            initializer=keras.initializers.RandomNormal(stddev=ALPHA_STDDEV, seed=seed), name="alpha_recurrent",
            autocast=False,
        )
        self.alphas = {CELL_TYPE: self.alpha}
        self.use_method(method)
        if self.method.auxiliary_operation is not None:
            raise ValueError(f"A recurrent cell has no auxiliary path. Received: method={self.method.name!r}")

    def probabilities(self):
        return self.mix_alphas(self.alpha)

    def get_config(self):
        return {
            "name": self.name,
            "operations": list(self.operations),
            "nodes": self.nodes,
            "vocabulary_size": self.vocabulary_size,
            "embedding_size": self.embedding_size,
            "hidden_size": self.hidden_size,
            "dropouts": self.dropouts,
            "tie_weights": self.tie_weights,
            "highway": self.highway,
            "output": self.output_mode,
            "batch_norm": self.batch_norm,
            "init_range": self.init_range,
            "seed": self.seed,
            "method": self.method.to_document(),
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class DerivedLanguageModel(_LanguageModel):
    """The language model around a derived recurrent cell (no BN, no alpha)."""

    def __init__(self, derived, seed=None, **kwargs):
        kwargs.setdefault("name", "derived_language_model")
        super().__init__(**kwargs)
        if isinstance(derived, dict):
            derived = derived_from_document(derived)
        network = derived.network
        if network.vocabulary_size is None:
            raise ValueError("The derived spec's network needs a vocabulary_size to build a language model.")
        self.derived = derived
        self.seed = seed
        self._build_language_model(network.vocabulary_size, network.embedding_size, network.hidden_size,
                                   network.tie_weights, _dropouts(network), seed)
        self.cell = RecurrentCell(
            network.embedding_size, network.hidden_size, genotype=derived.cells[CELL_TYPE], highway=network.highway,
            output=network.output, batch_norm=False, init_range=network.init_range,
            seed=None if seed is None else seed + 2, name="cell",
        )

    def get_config(self):
        return {"name": self.name, "derived": self.derived.to_document(), "seed": self.seed}


def build_recurrent_supernet(spec, vocabulary_size, seed=None):
    """Compile a recurrent search-space spec into a built ``RecurrentSupernet``."""
    space = spec.search_space
    network = space.network
    model = RecurrentSupernet(
        operations=space.operations, nodes=space.nodes, vocabulary_size=vocabulary_size,
        embedding_size=network.embedding_size, hidden_size=network.hidden_size, dropouts=_dropouts(network),
        tie_weights=network.tie_weights, highway=space.highway, output=space.output, batch_norm=space.batch_norm,
        init_range=network.init_range, seed=spec.search.seed if seed is None else seed,
        method=search_method(spec).to_document(),
    )
    model.build()
    return model


def build_language_model(derived, seed=None, **overrides):
    """Build the language model of a derived recurrent spec; ``overrides`` replace network settings."""
    from keras_darts.spec import check_derived, derived_with_network

    if isinstance(derived, dict):
        derived = derived_from_document(derived)
    derived = derived_with_network(derived, **overrides) if overrides else check_derived(derived)
    model = DerivedLanguageModel(derived, seed=seed)
    model.build()
    return model
