"""The Gumbel-softmax methods: SNAS (soft relaxation) and GDAS (hard straight-through sampling).

Both draw standard Gumbel noise ``g = -log(-log(u))``, ``u`` uniform on (0, 1),
fresh for every step (``SearchMethod.mix``'s ``noise``), independently for
each edge and op.

**SNAS** (Xie et al., "SNAS: Stochastic Neural Architecture Search", ICLR 2019;
SNAS-Series/SNAS-Series, SNAS/model_search.py and utils.py): op weights
``softmax((alpha + g) / t)``, every op computed; one loss on the training
batch updates weights and alphas together (``single_level``); the temperature
``t(e) = (1 - e / 150) (t0 - t_min) + t_min`` with 150 hard-coded, t0 = 1 and
t_min = 0.03 in its README. Derivation: DARTS' rule on ``softmax(alpha)``.

**GDAS** (Dong and Yang, "Searching for A Robust Neural Architecture in Four
GPU Hours", CVPR 2019; D-X-Y/AutoDL-Projects,
xautodl/models/cell_searchs/search_model_gdas_nasnet.py): per edge
``p = softmax((log_softmax(alpha) + g) / tau)``, ``k = argmax p`` and
``h = one_hot(k) - stop_gradient(p) + p``, whose value is ``one_hot(k)`` and
whose gradient is that of ``p``; an edge computes only ``h_k o_k(x)``, forward
and backward (``sampled_op``). ``tau(e) = tau_max - (tau_max - tau_min) e /
(E - 1)`` over the search's E epochs (GDAS.py; 10 and 0.1 in its scripts). Derivation ranks every
(input, op) pair of a node with op other than ``none`` by ``softmax(alpha)`` and
keeps the top k, so two ops may share an input (``rank_pairs``). The official
code resamples a draw with an infinite or NaN entry; here ``u`` is kept inside
(0, 1) (clipped to the float's smallest normal and one below 1), so ``g`` is always finite.
"""

import keras
import numpy as np
from keras import ops

from keras_darts.spec.model import GdasConfig, SnasConfig

from .base import SearchMethod


def gumbel(noise, shape, dtype):
    """Standard Gumbel samples of ``shape`` from ``noise``'s uniform draws, always finite."""
    info = np.finfo(keras.backend.standardize_dtype(dtype))
    u = ops.clip(ops.cast(noise(shape), dtype), float(info.tiny), 1.0 - float(info.eps))
    return -ops.log(-ops.log(u))


class Snas(SearchMethod):
    name = "snas"
    schedule_names = ("temperature",)
    stochastic = True
    single_level = True

    def __init__(self, options=None, epochs=None):
        config = SnasConfig(**dict(options or {}))
        super().__init__({"temperature_start": float(config.temperature_start),
                          "temperature_min": float(config.temperature_min),
                          "anneal_epochs": int(config.anneal_epochs)}, epochs)

    def schedule(self, epoch):
        o = self.options
        return {"temperature": (1 - epoch / o["anneal_epochs"]) * (o["temperature_start"] - o["temperature_min"])
                + o["temperature_min"]}

    def mix(self, alpha, noise=None, schedule=None):
        if noise is None:
            return ops.softmax(alpha, axis=-1)
        g = gumbel(noise, ops.shape(alpha), alpha.dtype)
        return ops.softmax((alpha + g) / ops.cast(schedule["temperature"], alpha.dtype), axis=-1)


class Gdas(SearchMethod):
    name = "gdas"
    schedule_names = ("temperature",)
    stochastic = True
    sampled_op = True
    rank_pairs = True

    def __init__(self, options=None, epochs=None):
        config = GdasConfig(**dict(options or {}))
        super().__init__({"tau_max": float(config.tau_max), "tau_min": float(config.tau_min),
                          "anneal_epochs": self.anneal_epochs(config.anneal_epochs, epochs)}, epochs)

    def schedule(self, epoch):
        o = self.options
        last = o["anneal_epochs"] - 1
        if last <= 0:  # one epoch: the official formula divides by zero; it starts at tau_max
            return {"temperature": o["tau_max"]}
        return {"temperature": o["tau_max"] - (o["tau_max"] - o["tau_min"]) * min(epoch, last) / last}

    def mix(self, alpha, noise=None, schedule=None):
        if noise is None:
            return ops.softmax(alpha, axis=-1)
        g = gumbel(noise, ops.shape(alpha), alpha.dtype)
        tau = ops.cast(schedule["temperature"], alpha.dtype)
        p = ops.softmax((ops.log_softmax(alpha, axis=-1) + g) / tau, axis=-1)
        hard = ops.one_hot(ops.argmax(p, axis=-1), ops.shape(alpha)[-1], dtype=alpha.dtype)
        return hard - ops.stop_gradient(p) + p
