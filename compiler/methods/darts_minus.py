"""DARTS- (Chu et al., "DARTS-: Robustly Stepping out of Performance Collapse Without Indicators", ICLR 2021).

Every mixed op gains an auxiliary path, ``y = sum_o softmax(alpha)_o o(x) +
beta(e) aux(x)``, with ``aux`` the identity at stride 1 (or, with
``auxiliary_operation: conv1``, a 1x1 convolution initialised to the
identity) and a FactorizedReduce without affine parameters at stride 2
(Meituan-AutoML/DARTS-, src/search/model_search.py). ``beta`` is not
learned: it follows the official ``DecayScheduler`` (src/utils.py), stepped
with the 0-based epoch ``e`` at the start of each epoch:

    e < T_start:            beta_0
    T_start <= e <= T_stop: linear       beta_0 (T_max - e) / (T_max - T_start)
                            cosine       beta_0 (1 + cos(pi e / (T_max - T_start))) / 2
                            slow_cosine  beta_0 cos(pi / 2 * e / (T_max - T_start))
    e > T_stop:             the value at T_stop

The official script (linear, beta_0 1, T_start 0, T_max = T_stop = its 50
epochs) decays beta from 1 towards 0 over the search. Derivation is DARTS';
the auxiliary path is dropped.
"""

import math

from keras_darts.spec.model import DartsMinusConfig

from .base import SearchMethod


class DartsMinus(SearchMethod):
    name = "darts_minus"
    schedule_names = ("auxiliary_weight",)

    def __init__(self, options=None, epochs=None):
        config = DartsMinusConfig(**dict(options or {}))
        super().__init__(
            {
                "beta_0": float(config.beta_0),
                "decay": config.decay,
                "start_epoch": int(config.start_epoch),
                "max_epoch": int(epochs if config.max_epoch is None else config.max_epoch),
                "stop_epoch": int(epochs if config.stop_epoch is None else config.stop_epoch),
                "auxiliary_operation": config.auxiliary_operation,
            },
            epochs,
        )
        self.auxiliary_operation = config.auxiliary_operation

    def decay_rate(self, epoch):
        """``beta(epoch)`` for a 0-based epoch."""
        o = self.options
        base, start, span = o["beta_0"], o["start_epoch"], o["max_epoch"] - o["start_epoch"]
        epoch = min(epoch, o["stop_epoch"])  # past T_stop the value stays where it was
        if epoch < start:
            return base
        if o["decay"] == "linear":
            return base * (o["max_epoch"] - epoch) / span
        if o["decay"] == "cosine":
            return base * (1 + math.cos(math.pi * epoch / span)) / 2.0
        return base * math.cos((math.pi / 2) * epoch / span)

    def schedule(self, epoch):
        return {"auxiliary_weight": self.decay_rate(epoch)}
