"""DARTS-PT (Wang et al., "Rethinking Architecture Selection in Differentiable NAS", ICLR 2021).

Perturbation-based selection replaces reading the cell off the alphas. After
the supernet's training (by any method that mixes every op of an edge), after
the official code (ruocwang/darts-pt, sota/cnn/projection.py and
model_search_darts_proj.py):

* The projected weights of a cell type are the method's op weights, except
  that an edge whose op was selected weighs one-hot on it, and an edge a
  node dropped weighs zero on every op.
* Op selection: take an edge not yet selected, at random; for each op in turn
  (``none`` too), zero that op's weight on the edge and measure the supernet
  on the whole validation split; keep the op whose removal hurts most (the
  lowest accuracy, the first among ties; with ``criterion: loss`` the highest
  loss).
* Topology selection, once every edge has its op: take a node with more than
  k inputs not yet selected, at random; while it has more than k inputs, zero
  each input edge in turn and drop the one whose removal hurts least (the
  highest accuracy, the last among ties).
* Each selection step does the normal cell, then the reduction cell. Between
  steps the supernet is tuned (weights and alphas, as in the search) for
  ``tune_epochs``; a step falls on every ``tune_epochs``-th tuning epoch,
  starting with the first, so with E edges and N nodes to select the tuning
  takes ``tune_epochs * (E + N - 1) + 1`` epochs and the last step is at its
  last epoch (14 edges and 3 nodes at 5: 81 epochs).
* The weights' optimiser is restarted for the tuning (its momentum cleared)
  at ``learning_rate_factor`` times the search's learning rate, annealed by a
  cosine to the search's minimum over the tuning epochs (official: the
  learning rate / 10).
* The derived cell is DARTS' rule on the projected weights, which after the
  last step holds the selected ops and inputs. As in the official parse, an
  edge kept with ``none`` selected weighs zero on every other op, as a
  dropped edge does: the rule ranks the two alike (the earlier edge first)
  and gives such an edge the first op other than ``none``.
* Not in the official code: ``measure_examples`` limits every measurement to
  the validation split's first that many examples. A selection measures
  ``2 * measurements(...)`` times (268 in the DARTS space), so on a CPU the
  whole split can cost more than the search; by default it is the whole split.

The measurement runs the network with batch statistics, as the official
``infer(..., _eval=False)`` does (the search networks here have no others).
"""

import numpy as np

from keras_darts.spec.model import DartsPtConfig

from .base import SearchMethod


def topology_nodes(edges, k):
    """The target nodes with more than ``k`` inputs, in order: those topology selection decides."""
    targets = sorted({target for _, target in edges})
    return [t for t in targets if sum(1 for _, target in edges if target == t) > k]


class PerturbationSelection:
    """DARTS-PT's schedule and choices; the caller measures the supernet (``evaluate``)."""

    def __init__(self, options=None):
        config = DartsPtConfig(**dict(options or {}))
        examples = config.measure_examples
        self.options = {"tune_epochs": int(config.tune_epochs), "criterion": str(config.criterion),
                        "learning_rate_factor": float(config.learning_rate_factor),
                        "measure_examples": None if examples is None else int(examples)}

    @property
    def interval(self):
        return self.options["tune_epochs"]

    @staticmethod
    def steps(edges, k):
        """How many selection steps one cell type takes: one per edge, then one per node with more than k inputs."""
        return len(edges) + len(topology_nodes(edges, k))

    def tuning_epochs(self, edges, k):
        """How many epochs the selection tunes the supernet for, its steps included."""
        return self.interval * (self.steps(edges, k) - 1) + 1

    @staticmethod
    def measurements(edges, k, operations):
        """How many times one cell type's selection measures the supernet on the validation split.

        Every edge measures each of its ``operations`` masked; a node with n > k
        inputs measures its remaining inputs once per dropped one: n + (n - 1)
        + ... + (k + 1) (14 edges, 8 ops and k = 2 in the DARTS space: 112 + 22).
        """
        inputs = [sum(1 for _, target in edges if target == node) for node in topology_nodes(edges, k)]
        return len(edges) * operations + sum(sum(range(k + 1, n + 1)) for n in inputs)

    def steps_by(self, tune_epoch):
        """How many selection steps have been taken once 0-based tuning epoch ``tune_epoch`` has begun."""
        return tune_epoch // self.interval + 1

    @staticmethod
    def step_kind(index, edges):
        """``"op"`` for selection step ``index`` (0-based) while edges remain, then ``"inputs"``."""
        return "op" if index < len(edges) else "inputs"

    def hurts_more(self, value, than):
        """Whether a measurement ``value`` after a removal is worse than ``than`` (strictly)."""
        return value < than if self.options["criterion"] == "accuracy" else value > than

    def select_op(self, weights, row, evaluate):
        """The op of edge ``row`` whose removal from ``weights`` hurts ``evaluate(weights)`` most."""
        best, extreme = 0, None
        for op in range(weights.shape[1]):
            masked = np.array(weights, dtype=np.float64, copy=True)
            masked[row, op] = 0.0
            value = evaluate(masked)
            if extreme is None or self.hurts_more(value, extreme):
                best, extreme = op, value
        return best

    def select_inputs(self, weights, rows, k, evaluate):
        """Of a node's input edges ``rows``, the ``k`` kept: the least hurtful to remove goes, until k are left."""
        rows = list(rows)
        while len(rows) > k:
            dropped, extreme = None, None
            for row in rows:
                masked = np.array(weights, dtype=np.float64, copy=True)
                masked[row, :] = 0.0
                value = evaluate(masked)
                if extreme is None or not self.hurts_more(value, extreme):
                    dropped, extreme = row, value
            rows.remove(dropped)
        return rows


def projected(weights, chosen, fixed):
    """``weights`` (edges x ops) with each ``fixed`` row replaced by its row of ``chosen``."""
    fixed = np.asarray(fixed, dtype=bool)
    return np.where(fixed[:, None], np.asarray(chosen, dtype=np.float64), np.asarray(weights, dtype=np.float64))


class DartsPt(SearchMethod):
    """DARTS' supernet training, then DARTS-PT's selection (``search.method: darts_pt``)."""

    name = "darts_pt"

    def __init__(self, options=None, epochs=None):
        super().__init__(options, epochs)
        self.selection = PerturbationSelection(options)
        self.options = dict(self.selection.options)
