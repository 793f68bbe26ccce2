"""The DARTS search of a recurrent cell on a language-modelling corpus.

As the reference's recurrent search: the training split drives the weights
and the *validation* split drives alpha, both as ``batch_size`` parallel
streams whose hidden states are carried from window to window (truncated
back-propagation through time) and reset each epoch. Windows have the
reference's random lengths around ``bptt`` (drawn from the seed and the
epoch, so an epoch can be replayed), and each step's learning rate (and the
virtual step's eta) is scaled by ``length / bptt``. After each epoch the
validation split is evaluated (windows of ``bptt``, no dropout) and reported
as perplexity. The search cell's BN normalises with the statistics of the
streams in every pass (it keeps no running averages), so this evaluation
reads ``batch_size`` streams, not ``eval_batch_size``: over a handful of
streams, batch statistics would distort the result.
"""

import contextlib
import math

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from keras_darts.compiler import build_recurrent_supernet, derived_spec_from_search
from keras_darts.compiler.recurrent import CELL_TYPE

from .bilevel import Bilevel
from .graph_build import built_as_the_process_runs
from .objectives import LanguageModeling
from .optimizers import CoupledAdam, CoupledSGD
from .precision import set_precision
from .text_data import batchify, sequence_lengths, window


def build_language_search(spec, vocabulary_size, model=None, strategy=None):
    """The recurrent supernet, its optimisers and the bilevel iteration for ``spec`` (under ``strategy``)."""
    config = spec.search
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = set_precision(model or build_recurrent_supernet(spec, vocabulary_size), config.precision)
        objective = LanguageModeling(model, config.activation_regularization,
                                     config.temporal_activation_regularization)
        weights_cfg = config.weights_optimizer
        return Bilevel(
            model,
            CoupledSGD.from_config(model.weight_variables, weights_cfg),
            CoupledAdam.from_config(model.arch_variables, config.arch_optimizer),
            hvp_epsilon=config.hvp_epsilon,
            objective=objective,
            unrolled_clip=weights_cfg.grad_clip,
            strategy=strategy,
            batch_norm=spec.distribute.batch_norm,
            # A recurrent step is thousands of small ops over the unrolled sequence; Grappler's
            # fusions and simplifications make it run 1.8x faster on a CPU (benchmarks/README.md).
            grappler=True,
            precision=config.precision,
            # Each pass is a chain of small kernels over time that keeps one CPU core busy; finite
            # differences' two perturbed passes run at once on a CPU (benchmarks/README.md).
            concurrent_perturbed_passes=True,
        )


def evaluate_perplexity(loss_fn, tokens, streams, bptt, hidden_size, progress=False, desc="evaluate",
                        dtype="float32"):
    """Mean token cross-entropy and perplexity of a split; ``loss_fn(x, y, hidden) -> (mean loss, hidden)``."""
    data = batchify(tokens, streams)
    hidden = tf.zeros((streams, hidden_size), dtype)
    total = count = 0.0
    lengths = sequence_lengths(data.shape[1], bptt, False, None)
    position = 0
    for length in tqdm(lengths, desc=desc, disable=not progress, leave=False, unit="window"):
        x, y = window(data, position, length)
        loss, hidden = loss_fn(tf.constant(x), tf.constant(y), hidden)
        total += float(loss) * x.size
        count += x.size
        position += length
    mean = total / max(count, 1)
    return mean, math.exp(min(mean, 700.0))


class LanguageSearchTask:
    """Windows, carried hidden states, evaluation and records of a recurrent search."""

    metric = "perplexity"

    def __init__(self, spec, data, strategy=None, kind=None):
        self.spec = spec
        self.kind = kind
        self.data = data
        self.settings = spec.data
        self.bilevel = build_language_search(spec, data.vocabulary_size, strategy=strategy)
        self.model = self.bilevel.model
        self.train = batchify(data.train, self.settings.batch_size)
        self.alpha_data = batchify(data.valid, self.settings.batch_size)
        bilevel = self.bilevel
        self.loss_fn = built_as_the_process_runs(tf.function(
            lambda x, y, h: bilevel.loss_at(bilevel.current_weights(), bilevel.current_alphas(),
                                            (x, y, h, tf.zeros((2,), tf.int32)))[::2],
            input_signature=bilevel.objective.batch_signature()[:3],
            autograph=False,
        ), "evaluation step")
        self.reset_hidden()

    def describe(self):
        return (f"recurrent cell of {self.spec.search_space.nodes} nodes, "
                f"{sum(int(np.prod(v.shape)) for v in self.bilevel.weight_vars)} weights, alpha "
                f"{tuple(self.model.alpha.shape)}, vocabulary {self.data.vocabulary_size}")

    def reset_hidden(self):
        streams, size = self.settings.batch_size, self.model.hidden_size
        dtype = self.model.embedding.dtype
        self.hidden = tf.zeros((streams, size), dtype)
        self.hidden_alpha = tf.zeros((streams, size), dtype)

    def lengths(self, epoch):
        config = self.spec.search
        rng = np.random.default_rng([config.seed, epoch])
        lengths = sequence_lengths(self.train.shape[1], self.settings.bptt, self.settings.variable_length, rng)
        return lengths[: config.steps_per_epoch] if config.steps_per_epoch else lengths

    def steps_in_epoch(self, epoch):
        return len(self.lengths(epoch))

    def batches(self, epoch, skip, first_iteration):
        """``(train, val, learning-rate factor, tokens)`` per remaining window; hidden states restart each epoch."""
        if skip == 0:
            self.reset_hidden()
        lengths = self.lengths(epoch)
        seed = self.spec.search.seed % 2**31
        position = sum(lengths[:skip])
        for n, length in enumerate(lengths[skip:]):
            x, y = window(self.train, position, length)
            start = position % (self.alpha_data.shape[1] - 1)
            x_a, y_a = window(self.alpha_data, start, min(length, self.alpha_data.shape[1] - 1 - start))
            masks = tf.constant([seed, (first_iteration + n) % 2**31], tf.int32)
            yield ((tf.constant(x), tf.constant(y), self.hidden, masks),
                   (tf.constant(x_a), tf.constant(y_a), self.hidden_alpha, masks),
                   length / self.settings.bptt, float(x.size))
            position += length

    def carry(self, train_state, val_state):
        self.hidden, self.hidden_alpha = train_state, val_state

    def arrays(self):
        return {"hidden": self.hidden.numpy(), "hidden_alpha": self.hidden_alpha.numpy()}

    def load_arrays(self, arrays):
        if "hidden" in arrays:
            self.hidden = tf.constant(arrays["hidden"])
            self.hidden_alpha = tf.constant(arrays["hidden_alpha"])

    def evaluate(self):
        loss, perplexity = evaluate_perplexity(self.loss_fn, self.data.valid, self.settings.batch_size,
                                               self.settings.bptt, self.model.hidden_size,
                                               dtype=self.model.embedding.dtype)
        return {"val_loss": loss, "val_perplexity": perplexity}

    def diagnostic_batch(self):
        x, y = window(self.alpha_data, 0, min(self.settings.bptt, self.alpha_data.shape[1] - 1))
        return (tf.constant(x), tf.constant(y),
                tf.zeros((self.settings.batch_size, self.model.hidden_size), self.model.embedding.dtype),
                tf.zeros((2,), tf.int32))

    def alphas(self):
        return {CELL_TYPE: self.model.alpha.numpy()}

    def derive(self, alphas, origin):
        return derived_spec_from_search(self.spec, alphas, retrain=self.spec.retrain.enabled, origin=origin,
                                        vocabulary_size=self.data.vocabulary_size)

    def summarise(self, sums, weight):
        """Token-weighted means; perplexity from the mean training loss."""
        record = {key: value / max(weight, 1e-12) for key, value in sums.items()
                  if key not in ("train_perplexity", "arch_perplexity")}
        record["train_perplexity"] = math.exp(min(record.get("train_loss", 700.0), 700.0))
        return record

    def derived_figures(self, derived):
        """Nothing beyond the genotype (a latency-aware search is the convolutional kind's)."""
        return {}
