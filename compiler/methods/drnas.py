"""DrNAS (Chen et al., "DrNAS: Dirichlet Neural Architecture Search", ICLR 2021).

After the official code (xiangning-chen/DrNAS, DARTS-space/model_search.py,
utils.py ``process_step_vector``, architect.py):

* op weights: a pathwise (reparameterised) sample of
  ``Dirichlet(elu(alpha) + 1)`` per edge, fresh each step: ``g_o ~
  Gamma(c_o, 1)`` with implicit reparameterisation gradients, ``w = g /
  sum(g)``;
* regularisation: ``l2`` is the architecture optimiser's weight decay (the
  official default, ``reg_scale`` 1e-3); ``kl`` adds ``kl_scale * sum over
  edges KL(Dir(c) || Dir(1, ..., 1))``, in closed form:
  ``lnG(c0) - sum lnG(c_o) - lnG(K) + sum (c_o - 1)(psi(c_o) - psi(c0))``;
* derivation: DARTS' rule on ``softmax(alpha)``, but with ``none`` kept in
  the ranking, as the official ``genotype()`` has its exclusion commented
  out (``exclude_none: false``); an edge whose best op is ``none`` computes
  zero and is dropped, and a node left without inputs with it.

Not implemented, so this is the Dirichlet method on DARTS' supernet: the
official DARTS-space search (DARTS-space/train_search.py) is always
progressive, two stages of 25 epochs with the ops on partial channels (K 6,
then 4, no edge weights, the channel shuffle of PC-DARTS), no BN after the
pooling ops, the alphas frozen for the first 10 epochs of each stage, each
edge pruned to its top 4 ops and the ops widened between the stages.
"""

import tensorflow as tf
from keras import ops

from keras_darts.spec.model import DrnasConfig

from .base import SearchMethod


def concentration(alpha):
    """The Dirichlet concentration ``elu(alpha) + 1`` (positive)."""
    return ops.elu(alpha) + 1.0


def dirichlet_kl_to_uniform(c):
    """``KL(Dir(c) || Dir(1, ..., 1))`` of each row of ``c``."""
    total = ops.sum(c, axis=-1)
    k = ops.cast(ops.shape(c)[-1], c.dtype)
    return (tf.math.lgamma(total) - ops.sum(tf.math.lgamma(c), axis=-1) - tf.math.lgamma(k)
            + ops.sum((c - 1.0) * (tf.math.digamma(c) - tf.math.digamma(total)[..., None]), axis=-1))


class Drnas(SearchMethod):
    name = "drnas"
    stochastic = True

    def __init__(self, options=None, epochs=None):
        config = DrnasConfig(**dict(options or {}))
        super().__init__({"regularization": str(config.regularization), "kl_scale": float(config.kl_scale),
                          "exclude_none": bool(config.exclude_none)}, epochs)
        self.derivation_includes_zero = not self.options["exclude_none"]

    def mix(self, alpha, noise=None, schedule=None):
        c = concentration(alpha)
        if noise is None:  # the Dirichlet's mean, for display
            return c / ops.sum(c, axis=-1, keepdims=True)
        g = tf.random.stateless_gamma(ops.shape(c), seed=noise.seed, alpha=c, dtype=c.dtype)
        return g / ops.sum(g, axis=-1, keepdims=True)

    def alpha_loss(self, alphas, schedule):
        if self.options["regularization"] != "kl":
            return None
        return self.options["kl_scale"] * sum(ops.sum(dirichlet_kl_to_uniform(concentration(a))) for a in alphas)
