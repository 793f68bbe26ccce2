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

Without ``progressive`` this is the Dirichlet method on DARTS' supernet.
``progressive: true`` is the official DARTS-space search
(DARTS-space/train_search.py, model_search.py, utils.py ``prune``,
operations.py and net2wider.py ``wider``), which runs in stages (two of 25
epochs by default, one cosine learning rate over all of them):

* in stage ``s`` an edge's ops see the first ``C / K_s`` channels of its
  input, the rest bypass them and the channels are shuffled, as in PC-DARTS
  but without edge weights (K 6, then 4);
* the alphas are frozen for the first ``stage_warmup_epochs`` epochs of
  every stage (official: ``epoch >= 10`` with the epoch counted per stage);
* entering stage ``s + 1`` (``prune``): each edge keeps the
  ``stage_keep_ops[s]`` ops of largest alpha among those it still has; the
  pruned alphas are set to 0 and never come back; the mixing samples the
  Dirichlet of every op and renormalises over the kept ones, the
  derivation renormalises their softmax; pruned ops are not computed;
* the ops are widened from ``C / K_s`` to ``C / K_{s+1}`` channels by
  appending copies of randomly chosen channels (``widening_indices``): a
  depthwise kernel draws its channels, the pointwise kernel after it takes
  the same ones as inputs and draws its outputs, every other widened axis
  draws its own; the weights' SGD momentum is widened with the same copies.
  The search BNs keep no statistics and have no parameters, so there is
  nothing of theirs to widen.
"""

import numpy as np
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
        options = dict(options or {})
        for key in ("stage_partial_channels", "stage_keep_ops", "stage_epochs"):
            if options.get(key) is not None:
                options[key] = tuple(options[key])
        config = DrnasConfig(**options)
        resolved = {"regularization": str(config.regularization), "kl_scale": float(config.kl_scale),
                    "exclude_none": bool(config.exclude_none)}
        if config.progressive:
            partial = [int(k) for k in config.stage_partial_channels]
            resolved.update(progressive=True, stage_partial_channels=partial,
                            stage_keep_ops=[int(k) for k in config.stage_keep_ops],
                            stage_warmup_epochs=int(config.stage_warmup_epochs),
                            stage_epochs=(split_epochs(self.anneal_epochs(None, epochs), len(partial))
                                          if config.stage_epochs is None else [int(e) for e in config.stage_epochs]))
        super().__init__(resolved, epochs)
        self.derivation_includes_zero = not self.options["exclude_none"]
        self.progressive = self.options if config.progressive else None

    # -- the progressive search's stages ----------------------------------------------
    @property
    def stages(self):
        return 1 if self.progressive is None else len(self.progressive["stage_partial_channels"])

    @property
    def stage_partial_channels(self):
        return None if self.progressive is None else tuple(self.progressive["stage_partial_channels"])

    def stage_start(self, stage):
        """The 0-based epoch that begins ``stage``."""
        return sum(self.progressive["stage_epochs"][:stage]) if self.progressive else 0

    def stage(self, epoch):
        stage = 0
        while stage + 1 < self.stages and epoch >= self.stage_start(stage + 1):
            stage += 1
        return stage

    def arch_frozen(self, epoch):
        if self.progressive is None:
            return super().arch_frozen(epoch)
        return epoch - self.stage_start(self.stage(epoch)) < self.progressive["stage_warmup_epochs"]

    def kept_ops(self, stage):
        return self.progressive["stage_keep_ops"][stage - 1]

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


def split_epochs(epochs, stages):
    """``epochs`` over ``stages`` stages: equal lengths, the remainder to the last."""
    length = epochs // stages
    return [length] * (stages - 1) + [epochs - length * (stages - 1)]


def prune(alpha, mask, keep):
    """DrNAS' ``utils.prune`` on one cell type: each row keeps its ``keep`` largest alphas among ``mask``'s.

    ``alpha`` and ``mask`` are (edges x ops) arrays (``mask`` 1 for the ops
    still searched, or None for all). Returns the new alphas (the kept ones
    unchanged, every other 0, as the official code zeroes them) and the new
    0/1 mask. Ties go to the earlier op.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    mask = np.ones(alpha.shape, bool) if mask is None else np.asarray(mask) > 0
    ranked = np.where(mask, alpha, -np.inf)
    order = np.argsort(-ranked, axis=-1, kind="stable")[:, :keep]
    kept = np.zeros(alpha.shape, bool)
    np.put_along_axis(kept, order, True, axis=-1)
    return np.where(kept, alpha, 0.0), kept.astype(np.float32)


def widening_indices(shapes, kinds, wider, rng):
    """For each kernel of an op, the old channels each widened axis copies, as DrNAS' ``wider`` draws them.

    ``shapes`` are the kernels' narrow shapes in the op's order, ``kinds``
    ``"depthwise"`` (``(k, k, C, 1)``) or ``"conv"`` (``(k, k, C_in,
    C_out)``), ``wider`` the wide shapes. Returns, per kernel, ``{axis:
    indices}``: the wide kernel is the narrow one with ``narrow[..., indices,
    ...]`` appended along ``axis``. A depthwise kernel draws its channels; a
    conv right after it takes the same ones as inputs (the pointwise conv
    of a separable or dilated conv); every other widened axis draws its own.
    """
    plans, previous = [], None
    for shape, kind, wide in zip(shapes, kinds, wider):
        plan = {}
        for axis in (2, 3):
            if kind == "depthwise" and axis == 3:
                continue
            extra = wide[axis] - shape[axis]
            if extra < 0:
                raise ValueError(f"A kernel can only be widened. Received: {tuple(shape)} -> {tuple(wide)}")
            if extra == 0:
                continue
            if axis == 2 and kind == "conv" and previous is not None:
                plan[axis] = previous
            else:
                plan[axis] = rng.integers(0, shape[axis], size=extra)
        previous = plan.get(2) if kind == "depthwise" else None
        plans.append(plan)
    return plans


def widen(value, plan):
    """``value`` (a narrow kernel or its momentum) widened by ``plan`` (``{axis: indices}``)."""
    value = np.asarray(value)
    for axis in sorted(plan):
        value = np.concatenate([value, np.take(value, plan[axis], axis=axis)], axis=axis)
    return value
