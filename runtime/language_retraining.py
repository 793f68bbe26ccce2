"""Training a derived recurrent cell's language model from scratch, as the DARTS evaluation does.

Per window: loss = token cross-entropy (+ activation and temporal activation
regularisation); plain SGD with coupled weight decay and global-norm
clipping, its learning rate scaled by ``length / bptt``; windows of the
reference's random lengths, hidden state carried. After each epoch the
validation perplexity is measured; with ``averaging`` the optimiser switches
to averaged SGD (the reference's ASGD with t0 = 0, lambda = 0: the same SGD
steps, evaluated and kept with the running average of the iterates since the
switch) once validation has not improved on the best of all but the last
``nonmono`` epochs. The weights with the best validation loss are the result;
the test split is evaluated with them.
"""

import dataclasses
import logging
import math
import os

import keras
import numpy as np
import tensorflow as tf

from keras_darts.compiler import build_language_model, count_parameters

from . import rundir
from .checkpoint import Checkpoints
from .graph_build import built_as_the_process_runs
from .language_search import evaluate_perplexity
from .loop import Checkpointing, HistoryFiles, Loop, ProgressBar
from .objectives import LanguageModeling
from .optimizers import CoupledSGD
from .precision import NoLossScale, loss_scale_for, precision_note, set_precision
from .text_data import batchify, sequence_lengths, window

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LanguageRetrainResult:
    model: object
    history: list
    test_loss: float
    test_perplexity: float
    parameters: int
    switched_to_averaging: object = None


def make_language_train_step(model, optimizer, objective, loss_scale=None):
    signature = objective.batch_signature()
    loss_scale = loss_scale or NoLossScale()

    @tf.function(input_signature=[signature, tf.TensorSpec((), tf.float32)], autograph=False)
    def train_step(batch, learning_rate):
        with tf.GradientTape() as tape:
            value, loss, _, hidden = objective.loss(model, batch, training=True, regularize=True)
            value = loss_scale.scale(value)
        gradients = loss_scale.unscale(tape.gradient(value, optimizer.variables_list))
        loss_scale.apply(optimizer, gradients, learning_rate)
        return loss, hidden

    return train_step


def make_language_eval_step(model, objective):
    @tf.function(input_signature=list(objective.batch_signature()[:3]), autograph=False)
    def eval_step(x, y, hidden):
        _, loss, _, hidden = objective.loss(model, (x, y, hidden, tf.zeros((2,), tf.int32)), training=False)
        return loss, hidden

    return eval_step


def validation_stalled(previous, current, nonmono):
    """The reference's switch to averaging: worse than the best of all but the last ``nonmono`` losses."""
    return len(previous) > nonmono and current > min(previous[:-nonmono])


class IterateAverage:
    """The running mean of a model's weights over the steps since ``start``."""

    def __init__(self, variables):
        self.variables = list(variables)
        self.means = [tf.Variable(v, trainable=False) for v in self.variables]
        self.count = 0

    def update(self):
        self.count += 1
        rate = 1.0 / self.count
        for mean, variable in zip(self.means, self.variables):
            mean.assign_add((variable - mean) * rate)

    def swap(self):
        """Exchange the model's weights with the averages (twice restores them)."""
        for mean, variable in zip(self.means, self.variables):
            current = tf.identity(variable)
            variable.assign(mean)
            mean.assign(current)


class LanguageRetraining:
    """Language-model retraining as the ``Loop`` runs it.

    Epoch ``e``'s window lengths are drawn from ``(seed, e)`` and each step's
    dropout masks from ``(seed, iteration)``, so a resumed epoch replays
    exactly. The hidden state, the best weights so far and the running
    average of the weights (once averaging is on) are the task's arrays in
    every checkpoint; the validation losses and the switch epoch live in the
    loop state.
    """

    def __init__(self, spec, model, train_step, eval_step, data):
        self.spec = spec
        self.config = spec.retrain
        self.settings = spec.data
        self.model = model
        self.train_step = train_step
        self.eval_step = eval_step
        self.data = data
        self.train = batchify(data.train, self.config.batch_size)
        self.hidden = self.zeros()
        self.pending = None
        self.average = None
        self.best = None  # the weights of the best validation loss so far

    def zeros(self):
        return tf.zeros((self.config.batch_size, self.model.hidden_size))

    def lengths(self, epoch):
        rng = np.random.default_rng([self.config.seed, epoch])
        return sequence_lengths(self.train.shape[1], self.settings.bptt, self.settings.variable_length, rng)

    def steps_in_epoch(self, epoch):
        return len(self.lengths(epoch))

    def begin_epoch(self, state):
        if state.step == 0:
            self.hidden = self.zeros()

    def batches(self, state):
        lengths = self.lengths(state.epoch)
        position = sum(lengths[: state.step])
        for length in lengths[state.step:]:
            x, y = window(self.train, position, length)
            yield x, y, length
            position += length

    def step(self, inputs, state):
        x, y, length = inputs
        seed = tf.constant([self.config.seed % 2**31, state.iteration % 2**31], tf.int32)
        loss, self.pending = self.train_step(
            (tf.constant(x), tf.constant(y), self.hidden, seed),
            tf.constant(self.config.learning_rate * length / self.settings.bptt, tf.float32))
        return {"train_loss": float(loss)}, float(x.size)

    def accept(self):
        self.hidden = self.pending
        if self.average is not None:
            self.average.update()

    def end_epoch(self, state, seconds):
        config = self.config
        extra = state.extra
        val_losses = extra.setdefault("val_losses", [])
        if self.average is not None:
            self.average.swap()
        val_loss, val_perplexity = evaluate_perplexity(
            self.eval_step, self.data.valid, self.settings.eval_batch_size, self.settings.bptt, self.model.hidden_size
        )
        if val_loss < extra.get("best_loss", math.inf):
            extra["best_loss"] = val_loss
            self.best = [v.numpy() for v in self.model.variables]
        if self.average is not None:
            self.average.swap()
        if config.averaging and self.average is None and validation_stalled(val_losses, val_loss, config.nonmono):
            self.average = IterateAverage(self.model.trainable_variables)
            extra["switched"] = state.epoch + 1
            log.info("validation stalled: switching to averaged SGD after epoch %d", extra["switched"])
        val_losses.append(val_loss)
        train_loss = state.means()["train_loss"]
        record = {
            "epoch": state.epoch + 1,
            "learning_rate": config.learning_rate,
            "averaging": self.average is not None,
            "train_loss": train_loss,
            "train_perplexity": math.exp(min(train_loss, 700.0)),
            "val_loss": val_loss,
            "val_perplexity": val_perplexity,
            "seconds": seconds,
        }
        log.info("retrain epoch %d/%d: train ppl %.2f | val ppl %.2f%s | %.1fs", record["epoch"], config.epochs,
                 record["train_perplexity"], val_perplexity, " (averaged)" if self.average is not None else "",
                 seconds)
        return record

    def arrays(self):
        arrays = {"hidden": self.hidden.numpy()}
        for n, value in enumerate(self.best or ()):
            arrays[f"best_{n}"] = value
        if self.average is not None:
            arrays["average_count"] = np.array(self.average.count)
            for n, mean in enumerate(self.average.means):
                arrays[f"average_{n}"] = mean.numpy()
        return arrays

    def load_arrays(self, arrays):
        self.hidden = tf.constant(arrays["hidden"])
        count = len(self.model.variables)
        self.best = [arrays[f"best_{n}"] for n in range(count)] if "best_0" in arrays else None
        if "average_count" in arrays:
            self.average = IterateAverage(self.model.trainable_variables)
            self.average.count = int(arrays["average_count"])
            for n, mean in enumerate(self.average.means):
                mean.assign(arrays[f"average_{n}"])


def retrain_language_model(spec, derived, data, run_dir=None, progress=False):
    """Train ``derived``'s language model on ``data`` as ``spec.retrain`` says; report test perplexity.

    With ``run_dir``, a checkpoint goes to ``run_dir/retrain/checkpoints``
    after every epoch and a checkpoint found there is resumed.
    """
    config = spec.retrain
    settings = spec.data
    keras.utils.set_random_seed(config.seed)
    model = set_precision(build_language_model(derived, seed=config.seed), config.precision)
    parameters = count_parameters(model)
    objective = LanguageModeling(model, config.activation_regularization, config.temporal_activation_regularization)
    optimizer = CoupledSGD(model.trainable_variables, momentum=0.0, weight_decay=config.weight_decay,
                           grad_clip=config.grad_clip)
    loss_scale = loss_scale_for(config.precision)
    steps = LanguageRetraining(
        spec, model,
        built_as_the_process_runs(make_language_train_step(model, optimizer, objective, loss_scale), "retraining step"),
        built_as_the_process_runs(make_language_eval_step(model, objective), "retraining evaluation step"), data)
    log.info("retrain %s: %d parameters, vocabulary %d, %d epochs%s", derived.name, parameters,
             data.vocabulary_size, config.epochs, precision_note(config.precision))
    callbacks = [ProgressBar("retrain", progress)]
    if run_dir:
        folder = os.path.join(run_dir, "retrain")
        callbacks += [HistoryFiles(folder),
                      Checkpointing(Checkpoints(os.path.join(folder, "checkpoints"), model, loss_scale=loss_scale,
                                                optimizer=optimizer),
                                    name=f"the retraining of {derived.name}")]
    state = Loop(steps, config.epochs, callbacks).run()
    if steps.best is None:
        log.warning("no epoch had a finite validation loss; the last weights are the result")
    else:
        for variable, value in zip(model.variables, steps.best):
            variable.assign(value)
    test_loss, test_perplexity = evaluate_perplexity(
        steps.eval_step, data.test, settings.eval_batch_size, settings.bptt, model.hidden_size, progress, desc="test"
    )
    best_loss = state.extra.get("best_loss", math.nan)
    switched = state.extra.get("switched")
    log.info("test: loss %.4f perplexity %.2f (best validation perplexity %.2f)", test_loss, test_perplexity,
             math.exp(min(best_loss, 700.0)))
    if run_dir:
        model.save(os.path.join(run_dir, "retrain", "model.keras"))
        rundir.write_json(
            os.path.join(run_dir, "retrain", "metrics.json"),
            {"test_loss": test_loss, "test_perplexity": test_perplexity, "val_loss": best_loss,
             "val_perplexity": math.exp(min(best_loss, 700.0)), "parameters": parameters,
             "test_tokens": int(len(data.test)), "switched_to_averaging_after_epoch": switched},
        )
    return LanguageRetrainResult(model, state.history, test_loss, test_perplexity, parameters, switched)
