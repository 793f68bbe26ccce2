"""FairDARTS (Chu et al., "Fair DARTS: Eliminating Unfair Advantages in Differentiable Architecture Search", ECCV 2020).

Three changes to DARTS, after the official code (xiaomi-automl/FairDARTS, fairdarts/):

* mixing: each op weighs ``sigmoid(alpha_o)`` on its own, with no softmax
  competition, so the weights of an edge need not sum to 1
  (model_search.py);
* the alpha step's loss adds the zero-one loss
  ``-w01 * mean((sigmoid(alpha) - 0.5)^2)``, the mean over both cell types'
  alphas together (separate_loss.py ``ConvSeparateLoss``, architect.py;
  ``--aux_loss_weight 10``), which pushes every weight towards 0 or 1;
* derivation (``--parse_method threshold_sparse --op_threshold 0.85``,
  utils.py): of each node's k strongest incoming edges (by their largest
  sigmoid), keep those whose best op reaches the threshold. A node may keep
  fewer than k edges; a node left without inputs is dropped from the cell,
  with the edges it fed (``derive.prune_isolated``).

Its op set has no ``none`` (the spec validator refuses one).
"""

from keras import ops

from keras_darts.spec.model import FairDartsConfig

from .base import SearchMethod, sigmoid


class FairDarts(SearchMethod):
    name = "fair_darts"

    def __init__(self, options=None, epochs=None):
        config = FairDartsConfig(**dict(options or {}))
        super().__init__({"zero_one_weight": float(config.zero_one_weight), "threshold": float(config.threshold)},
                         epochs)
        self.derivation_threshold = self.options["threshold"]

    def mix(self, alpha, noise=None, schedule=None):
        return ops.sigmoid(alpha)

    def alpha_loss(self, alphas, schedule):
        weights = ops.concatenate([ops.reshape(ops.sigmoid(a), (-1,)) for a in alphas], axis=0)
        return -self.options["zero_one_weight"] * ops.mean(ops.square(weights - 0.5))

    def derivation_weights(self, alpha):
        return sigmoid(alpha)
