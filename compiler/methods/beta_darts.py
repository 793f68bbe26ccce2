"""beta-DARTS (Ye et al., "Beta-Decay Regularization for Differentiable Architecture Search", CVPR 2022).

The alpha step minimises ``L_val + lambda(e) * mean_r logsumexp(alpha_r)``,
``r`` running over the edge rows of every architecture tensor (in the
official code, Sunshine-Ye/Beta-DARTS, optimizers/darts/architect.py,
``mlc_loss``), with ``lambda(e) = 50 e / 100`` hard-coded there for the
0-based epoch ``e``; here ``lambda_max * min(e, ramp_epochs) / ramp_epochs``
with the official 50 and 100 as defaults. The official code adds the term
in its first-order step only; here it is part of the alpha loss in either
order, so a second-order step adds its gradient to the unrolled one.
Derivation is DARTS'.
"""

from keras import ops

from keras_darts.spec.model import BetaDartsConfig

from .base import SearchMethod


class BetaDarts(SearchMethod):
    name = "beta_darts"
    schedule_names = ("alpha_loss_weight",)

    def __init__(self, options=None, epochs=None):
        config = BetaDartsConfig(**dict(options or {}))
        super().__init__({"lambda_max": float(config.lambda_max), "ramp_epochs": int(config.ramp_epochs)}, epochs)

    def schedule(self, epoch):
        ramp = self.options["ramp_epochs"]
        return {"alpha_loss_weight": self.options["lambda_max"] * min(epoch, ramp) / ramp}

    def alpha_loss(self, alphas, schedule):
        rows = ops.concatenate([ops.reshape(a, (-1, a.shape[-1])) for a in alphas], axis=0)
        penalty = ops.mean(ops.logsumexp(rows, axis=-1))
        return ops.cast(schedule["alpha_loss_weight"], penalty.dtype) * penalty

