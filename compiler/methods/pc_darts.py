"""PC-DARTS (Xu et al., "PC-DARTS: Partial Channel Connections for Memory-Efficient Architecture Search", ICLR 2020).

After the official code (yuhuixu1993/PC-DARTS, model_search.py, train_search.py):

* partial channels: an edge's ops see only the first ``C/K`` channels of its
  input (always the first, never sampled); the other channels bypass them
  (unchanged at stride 1, a 2x2 max-pool at stride 2), the two parts are
  concatenated and the channels shuffled in K groups (ShuffleNet's shuffle),
  so the next edge's first ``C/K`` are other channels; the ops are built at
  ``C/K`` channels, which is where the memory goes (``K = 4``);
* edge normalisation: each cell type has one weight ``beta`` per edge,
  initialised ``1e-3 N(0, 1)`` and trained with the alphas by the
  architecture optimiser; node ``i`` sums its edges scaled by the softmax of
  the betas of its incoming edges;
* warm-up: alphas and betas are not updated during the first 15 epochs
  (the arch step is not taken at all; the weights train);
* derivation: DARTS' rule on ``softmax(alpha_edge) * softmax_node(beta)_edge``.

The official search is first order unless ``--unrolled``; so is a spec that
names ``pc_darts`` and says nothing of the order.

Another method takes all of this with ``search.pc_darts`` beside its own
name (``method: beta_darts`` with ``pc_darts: {}`` is beta-DARTS on PC-DARTS'
supernet): the partial channels, edge weights, warm-up and derivation by edge
weight are PC-DARTS', the op weights, losses and perturbations the method's.
Its alpha loss and perturbation act on the op alphas alone; the edge weights
follow the architecture optimiser.
"""

import numpy as np

from keras_darts.spec.model import PcDartsConfig

from .base import SearchMethod


class PcDarts(SearchMethod):
    name = "pc_darts"

    def __init__(self, options=None, epochs=None):
        super().__init__(partial_options(options), epochs)
        self.partial = self.options


def partial_options(options):
    """PC-DARTS' options with their defaults, ``{"partial_channels": K, "warmup_epochs": n}``."""
    config = PcDartsConfig(**dict(options or {}))
    return {"partial_channels": int(config.partial_channels), "warmup_epochs": int(config.warmup_epochs)}


def normalized_edge_weights(betas, edges):
    """Per target node, the softmax of the betas of its incoming ``edges`` (``(source, target)`` per entry)."""
    betas = np.asarray(betas, dtype=np.float64)
    weights = np.empty_like(betas)
    for target in sorted({t for _, t in edges}):
        rows = [row for row, (_, t) in enumerate(edges) if t == target]
        shifted = np.exp(betas[rows] - betas[rows].max())
        weights[rows] = shifted / shifted.sum()
    return weights
