"""DARTS-PT's selection steps on a search's supernet (``compiler/methods/darts_pt.py`` states the rule).

The search runs its own epochs, then ``SupernetSelection.epochs`` tuning
epochs; at the start of every ``tune_epochs``-th one, ``begin`` takes the
selection steps that are due: for the normal cell and then the reduction
cell, an op for a random edge not yet selected, or, once every edge has its
op, the inputs of a random node. It measures the supernet on the search's
validation split (the alpha half) with one op, or one edge, masked, through
one ``tf.function`` that takes the op weights as inputs (over the whole
split, or its first ``measure_examples``). The state it writes
lives in the supernet's non-trainable weights, so a checkpoint keeps it, and
the random choices come from ``(seed, step)``: a resumed search selects what
an uninterrupted one would.
"""

import logging

import numpy as np
import tensorflow as tf

from keras_darts.compiler import cell_edges
from keras_darts.compiler.methods.darts_pt import topology_nodes

from .graph_build import built_as_the_process_runs
from .metrics import correct_count, evaluate, summed_cross_entropy

log = logging.getLogger(__name__)


class SupernetSelection:
    """DARTS-PT's selection on the supernet of an image search ``task`` (``ImageSearchTask``)."""

    def __init__(self, spec, task):
        self.spec = spec
        self.task = task
        self.model = task.bilevel.model
        self.selection = self.model.method.selection
        self.seed = spec.search.seed
        self.k = spec.search_space.k
        self.operations = list(spec.search_space.operations)
        self.edges = cell_edges(spec.search_space.nodes)
        self.nodes = topology_nodes(self.edges, self.k)
        self.epochs = self.selection.tuning_epochs(self.edges, self.k)
        self._batch_figures = None

    def describe(self):
        """What the selection will cost, for the search's first line."""
        count = measurement_count(self.spec, self.model)
        limit = self.selection.options["measure_examples"]
        split = (f"the first {limit} validation examples" if limit is not None and limit < self.task.eval_data.count
                 else "the validation split")
        return f"DARTS-PT's selection over {self.epochs} tuning epochs, measuring the supernet {count} times on {split}"

    def matrices(self):
        """``{cell type: projected op weights}`` now (numpy float64), the method's noise-free mixing."""
        model = self.model
        mixed = {t: model.method.mix(alpha) for t, alpha in model.alphas.items()}
        return {t: np.asarray(m, dtype=np.float64) for t, m in model.projected_matrices(mixed).items()}

    def measure(self, matrices):
        """The supernet's validation figure (the criterion's: accuracy or loss) with op weights ``matrices``."""
        if self._batch_figures is None:
            self._batch_figures = built_as_the_process_runs(
                measurement_function(self.model, *self.task.bilevel.objective.batch_signature()), "measurement step")
        weights = {t: tf.constant(m, tf.float32) for t, m in matrices.items()}
        loss, accuracy = evaluate(lambda x, y: self._batch_figures(x, y, weights), self.examples())
        return accuracy if self.selection.options["criterion"] == "accuracy" else loss

    def examples(self):
        """The validation batches a measurement covers: the whole split, or its first ``measure_examples``."""
        limit = self.selection.options["measure_examples"]
        if limit is None:
            return self.task.eval_data

        def first():
            left = limit
            for x, y in self.task.eval_data:  # in order, unshuffled: the same examples every time
                if left <= 0:
                    return
                yield x[:left], y[:left]
                left -= int(y.shape[0])

        return first()

    def begin(self, tune_epoch, restart_optimizer):
        """Take the selection steps due once 0-based tuning epoch ``tune_epoch`` begins.

        ``restart_optimizer()`` clears the weights' optimiser before the first step.
        """
        done = int(self.model.projection_steps.numpy())
        due = self.selection.steps_by(tune_epoch)
        while done < due:
            if done == 0:
                restart_optimizer()
            rng = np.random.default_rng([self.seed, done])
            for cell_type in self.model.alphas:  # normal, then reduce: as the official code
                self.take_step(done, cell_type, rng)
            done += 1
            self.model.projection_steps.assign(done)

    def take_step(self, index, cell_type, rng):
        state = self.model.projection[cell_type]
        chosen, fixed = state["chosen"].numpy(), state["fixed"].numpy()
        current = self.matrices()  # the other cell type's weights stay as they are while this one is measured
        weights = current[cell_type]

        def measured(masked):
            return self.measure({**current, cell_type: masked})
        if self.selection.step_kind(index, self.edges) == "op":
            row = int(rng.choice(np.flatnonzero(fixed == 0)))
            op = self.selection.select_op(weights, row, measured)
            chosen[row] = np.eye(len(self.operations))[op]
            fixed[row] = 1.0
            source, target = self.edges[row]
            log.info("DARTS-PT step %d, %s cell: edge %d->%d keeps %s", index + 1, cell_type, source, target,
                     self.operations[op])
        else:
            # A node whose inputs are selected has a dropped edge (fixed, weighing zero on every op).
            dropped = {self.edges[r][1] for r in range(len(self.edges)) if fixed[r] and not chosen[r].any()}
            node = int(rng.choice([n for n in self.nodes if n not in dropped]))
            rows = [r for r, (_, target) in enumerate(self.edges) if target == node]
            kept = self.selection.select_inputs(weights, rows, self.k, measured)
            for row in rows:
                if row not in kept:
                    chosen[row] = 0.0
                    fixed[row] = 1.0
            log.info("DARTS-PT step %d, %s cell: node %d keeps inputs %s", index + 1, cell_type, node,
                     ", ".join(str(self.edges[r][0]) for r in kept))
        state["chosen"].assign(chosen)
        state["fixed"].assign(fixed)
        if index + 1 == self.selection.steps(self.edges, self.k):
            kept_none = [f"{s}->{t}" for (s, t), op in zip(self.edges, edge_ops(chosen, fixed, self.operations))
                         if op == "none"]
            if kept_none:
                log.info("DARTS-PT: the %s cell's selection keeps none on %s, which a derived cell cannot hold; it "
                         "is derived by DARTS' rule on the projected weights, as in the official code, where every "
                         "other op weighs zero on such an edge (and on a dropped one): ties decide",
                         cell_type, ", ".join(kept_none))


def measurement_count(spec, model):
    """How many times a selection on ``model`` (a DARTS-PT supernet of ``spec``) measures it, both cell types."""
    space = spec.search_space
    return len(model.alphas) * model.method.selection.measurements(cell_edges(space.nodes), space.k,
                                                                    len(space.operations))


def measurement_function(model, x_spec, y_spec):
    """One batch of a measurement, compiled once: ``(x, y, {cell type: op weights})`` to the summed
    cross-entropy and the number correct, the weights taken as inputs so no mask traces again."""
    specs = {t: tf.TensorSpec(v.shape, tf.float32) for t, v in model.alphas.items()}

    @tf.function(input_signature=[x_spec, y_spec, specs], autograph=False)
    def batch_figures(x, y, weights):
        logits = model(x, training=False, mixing=weights)
        return summed_cross_entropy(y, logits), correct_count(y, logits)

    return batch_figures


def projection_state(model):
    """``{cell type: (chosen, fixed)}`` of a supernet's DARTS-PT selection (numpy), or ``None`` without one."""
    if getattr(model, "projection", None) is None:
        return None
    return {t: (s["chosen"].numpy(), s["fixed"].numpy()) for t, s in model.projection.items()}


def projection_record(model, operations):
    """What a derived spec's origin records: the steps taken and each edge's selected op per cell type.

    An edge reads ``null`` while not selected, its op once selected, and
    ``dropped`` when its node kept other inputs.
    """
    out = {t: edge_ops(chosen, fixed, operations) for t, (chosen, fixed) in projection_state(model).items()}
    return {"steps": int(model.projection_steps.numpy()), "edges": out}


def edge_ops(chosen, fixed, operations):
    """Each edge's selection of one cell type: ``None`` while open, its op's name, or ``dropped``."""
    return [None if not fixed[row] else operations[int(np.argmax(chosen[row]))] if chosen[row].any()
            else "dropped" for row in range(len(chosen))]
