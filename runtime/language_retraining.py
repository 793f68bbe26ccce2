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
import time

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from keras_darts.compiler import build_language_model, count_parameters

from . import rundir
from .language_search import evaluate_perplexity
from .objectives import LanguageModeling
from .optimizers import CoupledSGD
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


def make_language_train_step(model, optimizer, objective):
    signature = objective.batch_signature()

    @tf.function(input_signature=[signature, tf.TensorSpec((), tf.float32)])
    def train_step(batch, learning_rate):
        with tf.GradientTape() as tape:
            value, loss, _, hidden = objective.loss(model, batch, training=True, regularize=True)
        gradients = tape.gradient(value, optimizer.variables_list)
        optimizer.apply(gradients, learning_rate)
        return loss, hidden

    return train_step


def make_language_eval_step(model, objective):
    @tf.function(input_signature=list(objective.batch_signature()[:3]))
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


def retrain_language_model(spec, derived, data, run_dir=None, progress=False):
    """Train ``derived``'s language model on ``data`` as ``spec.retrain`` says; report test perplexity."""
    config = spec.retrain
    settings = spec.data
    keras.utils.set_random_seed(config.seed)
    model = build_language_model(derived, seed=config.seed)
    parameters = count_parameters(model)
    objective = LanguageModeling(model, config.activation_regularization, config.temporal_activation_regularization)
    optimizer = CoupledSGD(model.trainable_variables, momentum=0.0, weight_decay=config.weight_decay,
                           grad_clip=config.grad_clip)
    train_step = make_language_train_step(model, optimizer, objective)
    eval_step = make_language_eval_step(model, objective)
    train = batchify(data.train, config.batch_size)
    hidden_size = model.hidden_size
    rng = np.random.default_rng(config.seed)
    log.info("retrain %s: %d parameters, vocabulary %d, %d epochs", derived.name, parameters,
             data.vocabulary_size, config.epochs)
    history = []
    val_losses = []
    average = None
    switched = None
    best = (math.inf, None)
    iteration = 0
    for epoch in range(config.epochs):
        started = time.perf_counter()
        lengths = sequence_lengths(train.shape[1], settings.bptt, settings.variable_length, rng)
        hidden = tf.zeros((config.batch_size, hidden_size))
        total = tokens = 0.0
        position = 0
        bar = tqdm(total=len(lengths), desc=f"retrain {epoch + 1}/{config.epochs}", disable=not progress,
                   leave=False, unit="step")
        for length in lengths:
            x, y = window(train, position, length)
            seed = tf.constant([config.seed % 2**31, iteration % 2**31], tf.int32)
            loss, hidden = train_step((tf.constant(x), tf.constant(y), hidden, seed),
                                      tf.constant(config.learning_rate * length / settings.bptt, tf.float32))
            if average is not None:
                average.update()
            total += float(loss) * x.size
            tokens += x.size
            position += length
            iteration += 1
            bar.update(1)
            bar.set_postfix(ppl=f"{math.exp(min(total / tokens, 700.0)):.1f}")
        bar.close()
        if average is not None:
            average.swap()
        val_loss, val_perplexity = evaluate_perplexity(
            eval_step, data.valid, settings.eval_batch_size, settings.bptt, hidden_size
        )
        if val_loss < best[0]:
            best = (val_loss, [v.numpy() for v in model.variables])
        if average is not None:
            average.swap()
        if config.averaging and average is None and validation_stalled(val_losses, val_loss, config.nonmono):
            average = IterateAverage(model.trainable_variables)
            switched = epoch + 1
            log.info("validation stalled: switching to averaged SGD after epoch %d", switched)
        val_losses.append(val_loss)
        train_loss = total / max(tokens, 1)
        record = {
            "epoch": epoch + 1,
            "learning_rate": config.learning_rate,
            "averaging": average is not None,
            "train_loss": train_loss,
            "train_perplexity": math.exp(min(train_loss, 700.0)),
            "val_loss": val_loss,
            "val_perplexity": val_perplexity,
            "seconds": time.perf_counter() - started,
        }
        history.append(record)
        log.info("retrain epoch %d/%d: train ppl %.2f | val ppl %.2f%s | %.1fs", epoch + 1, config.epochs,
                 record["train_perplexity"], val_perplexity, " (averaged)" if average is not None else "",
                 record["seconds"])
        if run_dir:
            rundir.write_json(os.path.join(run_dir, "retrain", "history.json"), history)
            rundir.write_history_csv(os.path.join(run_dir, "retrain", "history.csv"), history)
    for variable, value in zip(model.variables, best[1]):
        variable.assign(value)
    test_loss, test_perplexity = evaluate_perplexity(
        eval_step, data.test, settings.eval_batch_size, settings.bptt, hidden_size, progress, desc="test"
    )
    log.info("test: loss %.4f perplexity %.2f (best validation perplexity %.2f)", test_loss, test_perplexity,
             math.exp(min(best[0], 700.0)))
    if run_dir:
        model.save(os.path.join(run_dir, "retrain", "model.keras"))
        rundir.write_json(
            os.path.join(run_dir, "retrain", "metrics.json"),
            {"test_loss": test_loss, "test_perplexity": test_perplexity, "val_loss": best[0],
             "val_perplexity": math.exp(min(best[0], 700.0)), "parameters": parameters,
             "test_tokens": int(len(data.test)), "switched_to_averaging_after_epoch": switched},
        )
    return LanguageRetrainResult(model, history, test_loss, test_perplexity, parameters, switched)
