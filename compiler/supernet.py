"""The search supernet: stem, stacked search cells, pooling and classifier.

All normal cells share one architecture matrix and all reduction cells share
another; both are Keras weights of the model, named ``alpha_normal`` and
``alpha_reduce``, initialised ``1e-3 * N(0, 1)``, and kept apart from the
network weights (``arch_variables`` vs ``weight_variables``, by identity).
The search method (``method``, a ``{"name": ..., **options}`` mapping) turns
alphas into op weights and may give every mixed op an auxiliary path; the
scalars it schedules over epochs are non-trainable weights (``schedule``).
"""

import keras
import numpy as np
from keras import ops

from .cells import SearchCell
from .graph import cell_edges, cell_schedule
from .methods import MethodSupernet, search_method
from .ops import PACKAGE, batch_normalize

CELL_TYPES = ("normal", "reduce")
ALPHA_STDDEV = 1e-3


@keras.saving.register_keras_serializable(package=PACKAGE)
class Supernet(MethodSupernet, keras.Model):
    def __init__(
        self,
        operations,
        nodes,
        init_channels,
        layers,
        reduction_positions,
        num_classes,
        input_shape,
        stem_multiplier=3,
        seed=None,
        recompute_cells=False,
        method=None,
        **kwargs,
    ):
        kwargs.setdefault("name", "supernet")
        super().__init__(**kwargs)
        self.operations = tuple(operations)
        self.nodes = nodes
        self.init_channels = init_channels
        self.num_layers = layers
        self.reduction_positions = tuple(reduction_positions)
        self.num_classes = num_classes
        self.image_shape = tuple(input_shape)
        self.stem_multiplier = stem_multiplier
        self.seed = seed
        self.recompute_cells = bool(recompute_cells)
        self.num_edges = len(cell_edges(nodes))
        self.use_method(method)
        auxiliary = self.method.auxiliary_operation

        self.stem_conv = keras.layers.Conv2D(
            stem_multiplier * init_channels, 3, padding="same", use_bias=False, name="stem__conv"
        )
        # The stem BN is the search network's one affine BN. Like every BN
        # in search it normalises with batch statistics in every pass, so it
        # keeps no running averages: the supernet has no state but weights.
        stem_channels = stem_multiplier * init_channels
        self.stem_gamma = self.add_weight(shape=(stem_channels,), initializer="ones", name="stem__bn_gamma")
        self.stem_beta = self.add_weight(shape=(stem_channels,), initializer="zeros", name="stem__bn_beta")
        self.cells = [
            SearchCell(self.operations, nodes, channels, reduction, reduction_prev, auxiliary,
                       sampled=self.method.sampled_op, partial_channels=self.method.partial_channels,
                       edge_scaled=self.method.edge_normalization,
                       stage_partial_channels=self.method.stage_partial_channels, name=f"cell_{position:02d}")
            for position, channels, reduction, reduction_prev in cell_schedule(
                layers, self.reduction_positions, init_channels
            )
        ]
        self.global_pool = keras.layers.GlobalAveragePooling2D(name="global_pool")
        self.classifier = keras.layers.Dense(num_classes, name="classifier")
        self.alphas = {}
        for i, cell_type in enumerate(CELL_TYPES):
            init_seed = None if seed is None else seed + i
            self.alphas[cell_type] = self.add_weight(
                shape=(self.num_edges, len(self.operations)),
                initializer=keras.initializers.RandomNormal(stddev=ALPHA_STDDEV, seed=init_seed),
                name=f"alpha_{cell_type}", autocast=False,
            )
        if self.method.edge_normalization:
            # PC-DARTS' edge weights, one per edge, initialised as the alphas are.
            self.edge_betas = {
                cell_type: self.add_weight(
                    shape=(self.num_edges,),
                    initializer=keras.initializers.RandomNormal(stddev=ALPHA_STDDEV,
                                                                seed=None if seed is None else seed + 2 + i),
                    name=f"beta_{cell_type}", autocast=False,
                )
                for i, cell_type in enumerate(CELL_TYPES)
            }
        self.use_selection()
        # A search in stages (DrNAS' progressive search): the stage and each cell type's kept ops
        # (1 per searched (edge, op)) as weights, so checkpoints keep them; ``self.stage`` is what
        # the traced steps compute (``sync_stage`` reads it from the weights).
        self.stage = 0
        if self.method.stages > 1:
            self.stage_index = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False,
                                               name="stage__index", autocast=False)
            self.kept_masks = {t: self.add_weight(shape=(self.num_edges, len(self.operations)), initializer="ones",
                                                  trainable=False, name=f"stage__kept_{t}", autocast=False)
                               for t in CELL_TYPES}

    def build(self, input_shape):
        # Sublayers create their weights on first use: run one forward pass on
        # zeros so that every weight exists (Keras builds before loading weights);
        # one per stage, each stage's ops having their own weights.
        for stage in reversed(range(self.method.stages)):
            for cell in self.cells:
                for mixed_op in cell.mixed_ops:
                    mixed_op.use_stage(stage)
            self.call(ops.zeros((1, *tuple(input_shape)[1:])), training=False)
        self.stage = 0
        self.built = True

    # -- a search in stages ----------------------------------------------------------
    def sync_stage(self):
        """Make the computation the stage and kept ops the weights hold; whether it changed (steps must retrace)."""
        if self.method.stages == 1:
            return False
        stage = int(self.stage_index.numpy())
        masks = {t: self.kept_masks[t].numpy() > 0 for t in CELL_TYPES}
        changed = stage != self.stage
        for cell in self.cells:
            mask = masks["reduce" if cell.reduction else "normal"]
            for row, mixed_op in zip(cell.mixed_op_rows, cell.mixed_ops):
                kept = None if stage == 0 else frozenset(np.flatnonzero(mask[row]).tolist())
                if mixed_op.stage != stage or mixed_op.kept != kept:
                    mixed_op.use_stage(stage, kept)
                    changed = True
        self.stage = stage
        return changed

    def enter_stage(self, stage, momentum=None):
        """Prune each edge to the method's kept ops and widen the ops into stage ``stage`` (the next one).

        ``momentum`` maps ``id(variable)`` to the weights optimiser's momentum
        buffer of that variable, widened with it. The widening draws from the
        search's seed and the stage, so a resumed search draws the same.
        """
        from .methods.drnas import prune, widen, widening_indices

        if stage != self.stage + 1:
            raise ValueError(f"A search enters its stages in order. Received: stage={stage} after {self.stage}")
        keep = self.method.kept_ops(stage)
        for t in CELL_TYPES:
            alpha, mask = prune(self.alphas[t].numpy(), self.kept_masks[t].numpy(), keep)
            self.alphas[t].assign(alpha.astype(self.alphas[t].dtype))
            self.kept_masks[t].assign(mask)
        rng = np.random.default_rng([0 if self.seed is None else int(self.seed), stage])
        momentum = momentum or {}
        for cell in self.cells:
            for mixed_op in cell.mixed_ops:
                for narrow_op, wide_op in zip(mixed_op.stage_candidates[stage - 1], mixed_op.stage_candidates[stage]):
                    narrow, wide = list(narrow_op.trainable_weights), list(wide_op.trainable_weights)
                    kinds = ["depthwise" if "depthwise" in v.name else "conv" for v in narrow]
                    if any(len(v.shape) != 4 for v in narrow):
                        raise ValueError(f"Only convolution kernels can be widened. Received: "
                                         f"{[(v.path, tuple(v.shape)) for v in narrow]}")
                    plans = widening_indices([tuple(v.shape) for v in narrow], kinds,
                                             [tuple(v.shape) for v in wide], rng)
                    for source, target, plan in zip(narrow, wide, plans):
                        target.assign(widen(source.numpy(), plan))
                        if id(source) in momentum and id(target) in momentum:
                            momentum[id(target)].assign(widen(momentum[id(source)].numpy(), plan))
        self.stage_index.assign(stage)
        self.sync_stage()

    def searched_alphas(self, alphas):
        """``alphas`` ({cell type: array}) with the ops a staged search pruned at -inf, so every softmax skips them."""
        if self.method.stages == 1 or self.stage == 0:
            return alphas
        return {t: np.where(self.kept_masks[t].numpy() > 0, a, -np.inf) for t, a in alphas.items()}

    def arch_probabilities(self, mixing=None):
        """The op weights of each cell type, (edges x ops), from the method's mixing of the alphas.

        ``mixing="given"`` takes the alpha values as the op weights themselves
        (SDARTS' weight step substitutes perturbed probabilities for them); a
        mapping ``{cell type: matrix}`` gives the op weights outright (DARTS-PT
        measures the supernet with one op or edge masked). Otherwise the rows
        DARTS-PT's selection has fixed take their chosen weights.
        """
        if isinstance(mixing, dict):
            return dict(mixing)
        if mixing == "given":
            return self.projected_matrices(dict(self.alphas))
        return self.projected_matrices({t: self.kept_share(t, self.mix_alphas(self.alphas[t], stream=i))
                                        for i, t in enumerate(CELL_TYPES)})

    def kept_share(self, cell_type, weights):
        """Op ``weights`` of ``cell_type`` restricted to the ops a staged search still searches, renormalised."""
        if self.stage == 0:
            return weights
        kept = weights * ops.cast(self.kept_masks[cell_type], weights.dtype)
        return kept / ops.sum(kept, axis=-1, keepdims=True)

    def normalized_edge_betas(self):
        """PC-DARTS' edge weights: per node, the softmax of the betas of its incoming edges (edges x 1)."""
        normalized = {}
        for cell_type, beta in self.edge_betas.items():
            parts, start = [], 0
            for count in range(2, 2 + self.nodes):  # node i has 2 + i inputs; its edges are contiguous
                parts.append(ops.softmax(beta[start:start + count]))
                start += count
            normalized[cell_type] = ops.expand_dims(ops.concatenate(parts, axis=0), -1)
        return normalized

    def edge_weights(self, mixing=None):
        """What the cells take: the op weights, then the auxiliary path's weight and the edge's weight if any."""
        matrices = self.arch_probabilities(mixing)
        columns = {t: [] for t in matrices}
        if self.method.auxiliary_operation is not None:
            beta = self.schedule["auxiliary_weight"]
            for t in matrices:
                columns[t].append(ops.ones((self.num_edges, 1), dtype=beta.dtype) * beta)
        if self.method.edge_normalization:
            for t, column in self.normalized_edge_betas().items():
                columns[t].append(column)
        if not any(columns.values()):
            return matrices
        return {t: ops.concatenate([m, *[ops.cast(c, m.dtype) for c in columns[t]]], axis=-1)
                for t, m in matrices.items()}

    def call(self, inputs, training=None, mixing=None, cell_weights=None):
        """Logits; ``cell_weights`` (one op-weight matrix per cell, Lambda-DARTS) replaces the shared ones."""
        # Split each matrix into per-edge, per-op scalars once, shared by all
        # cells of the type (slicing inside every MixedOp costs graph size);
        # a recomputed cell splits its own, inside the recomputation.
        matrices = self.edge_weights(mixing)
        recompute = self.recompute_cells and training and cell_weights is None
        probabilities = {} if recompute else {t: split_rows(p) for t, p in matrices.items()}
        s0 = s1 = batch_normalize(self.stem_conv(inputs), self.stem_gamma, self.stem_beta)[0]
        for index, cell in enumerate(self.cells):
            cell_type = "reduce" if cell.reduction else "normal"
            if cell_weights is not None:
                output = cell(s0, s1, split_rows(cell_weights[index]), training=training)
            elif recompute:
                output = recomputed(cell, s0, s1, matrices[cell_type], training=training)
            else:
                output = cell(s0, s1, probabilities[cell_type], training=training)
            s0, s1 = s1, output
        return self.classifier(self.global_pool(s1))

    def get_config(self):
        return {
            "name": self.name,
            "operations": list(self.operations),
            "nodes": self.nodes,
            "init_channels": self.init_channels,
            "layers": self.num_layers,
            "reduction_positions": list(self.reduction_positions),
            "num_classes": self.num_classes,
            "input_shape": list(self.image_shape),
            "stem_multiplier": self.stem_multiplier,
            "seed": self.seed,
            "recompute_cells": self.recompute_cells,
            "method": self.method.to_document(),
        }


def split_rows(matrix):
    """An (edges x ops) matrix as per-edge lists of per-op scalars."""
    return [ops.unstack(row) for row in ops.unstack(matrix, axis=0)]


def recomputed(cell, s0, s1, probabilities, training):
    """``cell(s0, s1, rows of probabilities)``, keeping only its inputs for the backward pass.

    The cell runs once forward, and again inside its gradient, so its
    intermediate activations need not live from the forward to the backward
    pass: activation memory falls from the whole network's to the cell inputs
    plus one cell's, for one more forward pass of time. The gradients are the
    stored-activation ones: the cell is a function of its inputs, its weights
    (read from the stateless scope of the pass, or the variables) and the
    probabilities, and gradients flow to all of them (equal up to rounding:
    the tests find 1e-9 relative in float64). Keras exposes no
    public reader of the current stateless scope, hence the private import
    (Keras is pinned).
    """
    import tensorflow as tf
    from keras.src.backend.common.stateless_scope import get_stateless_scope, in_stateless_scope

    variables = list(cell.variables)
    scope = get_stateless_scope() if in_stateless_scope() else None
    values = [scope.get_current_value(v) if scope is not None else None for v in variables]
    values = [v.value if value is None else value for v, value in zip(variables, values)]

    def compute(s0, s1, probabilities, *values):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return cell(s0, s1, split_rows(probabilities), training=training)

    @tf.custom_gradient
    def run(*inputs):
        def gradient(upstream):
            # The recomputation waits for the upstream gradient, so graph
            # optimisation cannot merge it with the forward pass.
            with tf.control_dependencies([upstream]):
                again = [tf.identity(t) for t in inputs]
            with tf.GradientTape() as tape:
                tape.watch(again)
                output = compute(*again)
            grads = tape.gradient(output, again, output_gradients=upstream)
            return [tf.zeros_like(t) if g is None else g for g, t in zip(grads, again)]

        return compute(*inputs), gradient

    return run(s0, s1, probabilities, *values)


def build_supernet(spec, seed=None):
    """Compile a search-space spec into a built ``Supernet``."""
    space = spec.search_space
    network = space.network
    model = Supernet(
        operations=space.operations,
        nodes=space.nodes,
        init_channels=network.init_channels,
        layers=network.layers,
        reduction_positions=space.reduction_positions,
        num_classes=network.num_classes,
        input_shape=network.input_shape,
        stem_multiplier=network.stem_multiplier,
        seed=spec.search.seed if seed is None else seed,
        recompute_cells=spec.search.recompute_cells,
        method=search_method(spec).to_document(),
    )
    model.build((None, *network.input_shape))
    return model
