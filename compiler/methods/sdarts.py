"""SDARTS (Chen and Hsieh, "Stabilizing Differentiable Architecture Search via Perturbation-based
Regularization", ICML 2020).

After the official code (xiangning-chen/SmoothDARTS, sota/cnn/train_search.py,
attacker/perturb.py, sota/cnn/model_search.py): the architecture step is
DARTS'; the weight step runs on perturbed op probabilities, used directly
as mixing weights (no softmax):

* ``p = softmax(alpha)``;
* ``rs``: ``p + U[-epsilon, epsilon]`` elementwise, fresh each step;
  ``adv``: ``pgd_steps`` steps of L-infinity PGD ascending the training loss
  of the step's batch, step ``2 epsilon / pgd_steps``, from a random start,
  each step projected back into the epsilon box around ``p``; if the loss at
  the end is lower than at ``p``, ``p`` itself is used;
* after every perturbation (and PGD step) the probabilities are clipped to
  [0, 1] and each edge renormalised to sum 1 (an edge clipped to all zeros
  gets 1 at its argmax): the official ``clip``;
* ``epsilon(e) = 0.03 + (0.3 - 0.03) e / E`` for the 0-based epoch of E.

The official attack puts the network in evaluation mode (BN running
statistics); the search networks here keep no running statistics, so every
pass normalises with the batch's. Derivation is DARTS'. The official search
is first order (so is a spec naming ``sdarts`` without an order).
"""

import tensorflow as tf

from keras_darts.spec.model import SdartsConfig

from .base import SearchMethod


def clip_to_simplex(p):
    """The official ``clip``: clamp to [0, 1], an all-zero row gets 1 at its argmax, rows renormalised."""
    best = tf.one_hot(tf.argmax(p, axis=-1), tf.shape(p)[-1], dtype=p.dtype)
    clamped = tf.clip_by_value(p, 0.0, 1.0)
    total = tf.reduce_sum(clamped, axis=-1, keepdims=True)
    clamped = tf.where(total > 0, clamped, best)
    return clamped / tf.reduce_sum(clamped, axis=-1, keepdims=True)


class Sdarts(SearchMethod):
    name = "sdarts"
    schedule_names = ("epsilon",)
    stochastic = True  # its draws: the random perturbation and the PGD start
    perturbs_weight_step = True

    def __init__(self, options=None, epochs=None):
        config = SdartsConfig(**dict(options or {}))
        super().__init__({"perturbation": str(config.perturbation), "epsilon_start": float(config.epsilon_start),
                          "epsilon_max": float(config.epsilon_max), "pgd_steps": int(config.pgd_steps),
                          "anneal_epochs": self.anneal_epochs(config.anneal_epochs, epochs)}, epochs)

    def schedule(self, epoch):
        o = self.options
        span = o["epsilon_max"] - o["epsilon_start"]
        return {"epsilon": o["epsilon_start"] + span * epoch / o["anneal_epochs"]}

    def mix(self, alpha, noise=None, schedule=None):
        return tf.nn.softmax(alpha, axis=-1)
