"""The DARTS search of a recurrent cell on a language-modelling corpus.

As the reference's recurrent search: the training split drives the weights
and the *validation* split drives alpha, both as ``batch_size`` parallel
streams whose hidden states are carried from window to window (truncated
back-propagation through time) and reset each epoch. Windows have the
reference's random lengths around ``bptt``, and each step's learning rate
(and the virtual step's eta) is scaled by ``length / bptt``. After each epoch
the validation split is evaluated (windows of ``bptt``, no dropout) and
reported as perplexity. The search cell's BN normalises with the statistics
of the streams in every pass (it keeps no running averages), so this
evaluation reads ``batch_size`` streams, not ``eval_batch_size``: over a
handful of streams, batch statistics would distort the result.
"""

import logging
import math
import time

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from keras_darts.compiler import build_recurrent_supernet, derived_spec_from_search
from keras_darts.compiler.derive import softmax
from keras_darts.compiler.recurrent import CELL_TYPE

from .bilevel import Bilevel
from .objectives import LanguageModeling
from .optimizers import CoupledAdam, CoupledSGD, cosine_learning_rate
from .search_loop import finish_search, genotype_text, search_origin, write_epoch
from .text_data import batchify, load_text_data, sequence_lengths, window

log = logging.getLogger(__name__)


def build_language_search(spec, vocabulary_size, model=None):
    """The recurrent supernet, its optimisers and the bilevel iteration for ``spec``."""
    config = spec.search
    model = model or build_recurrent_supernet(spec, vocabulary_size)
    objective = LanguageModeling(model, config.activation_regularization, config.temporal_activation_regularization)
    weights_cfg = config.weights_optimizer
    return Bilevel(
        model,
        CoupledSGD.from_config(model.weight_variables, weights_cfg),
        CoupledAdam.from_config(model.arch_variables, config.arch_optimizer),
        hvp_epsilon=config.hvp_epsilon,
        objective=objective,
        unrolled_clip=weights_cfg.grad_clip,
    )


def evaluate_perplexity(loss_fn, tokens, streams, bptt, hidden_size, progress=False, desc="evaluate"):
    """Mean token cross-entropy and perplexity of a split; ``loss_fn(x, y, hidden) -> (mean loss, hidden)``."""
    data = batchify(tokens, streams)
    hidden = tf.zeros((streams, hidden_size))
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


def search_language_model(spec, run_dir=None, data=None, progress=False, on_epoch=None):
    config = spec.search
    keras.utils.set_random_seed(config.seed)
    data = data or load_text_data(spec)
    settings = spec.data
    bilevel = build_language_search(spec, data.vocabulary_size)
    model = bilevel.model
    hidden_size = model.hidden_size
    train = batchify(data.train, settings.batch_size)
    alpha_data = batchify(data.valid, settings.batch_size)
    rng = np.random.default_rng(config.seed)
    log.info(
        "search %s: recurrent cell, %d nodes, %d weights, alpha %s, vocabulary %d, %s order%s, %d epochs",
        spec.name, spec.search_space.nodes, sum(int(np.prod(v.shape)) for v in bilevel.weight_vars),
        tuple(model.alpha.shape), data.vocabulary_size, config.order,
        f" ({config.second_order_mode})" if config.order == "second" else "", config.epochs,
    )
    step = bilevel.compiled_iteration(config.order, config.second_order_mode)
    loss_fn = tf.function(
        lambda x, y, h: bilevel.loss_at(bilevel.current_weights(), bilevel.current_alphas(),
                                        (x, y, h, tf.zeros((2,), tf.int32)))[::2],
        input_signature=bilevel.objective.batch_signature()[:3],
    )
    log.info("the first iteration builds and optimises the step's graph; this takes a while on a CPU")
    weights_cfg = config.weights_optimizer
    arch_lr = tf.constant(config.arch_optimizer.learning_rate, tf.float32)
    history = []
    derived = alphas = None
    iteration = 0
    for epoch in range(config.epochs):
        lr = cosine_learning_rate(epoch, config.epochs, weights_cfg.learning_rate, weights_cfg.learning_rate_min)
        lengths = sequence_lengths(train.shape[1], settings.bptt, settings.variable_length, rng)
        if config.steps_per_epoch:
            lengths = lengths[: config.steps_per_epoch]
        started = time.perf_counter()
        hidden = tf.zeros((settings.batch_size, hidden_size))
        hidden_alpha = tf.zeros((settings.batch_size, hidden_size))
        sums = {}
        tokens = 0
        position = 0
        bar = tqdm(total=len(lengths), desc=f"search {epoch + 1}/{config.epochs}", disable=not progress,
                   leave=False, unit="step")
        for length in lengths:
            x, y = window(train, position, length)
            alpha_start = position % (alpha_data.shape[1] - 1)
            x_a, y_a = window(alpha_data, alpha_start, min(length, alpha_data.shape[1] - 1 - alpha_start))
            seed = tf.constant([config.seed % 2**31, iteration % 2**31], tf.int32)
            metrics, hidden, hidden_alpha = step(
                (tf.constant(x), tf.constant(y), hidden, seed),
                (tf.constant(x_a), tf.constant(y_a), hidden_alpha, seed),
                tf.constant(lr * length / settings.bptt, tf.float32), arch_lr,
            )
            for key in ("train_loss", "arch_loss", "grad_norm"):
                sums[key] = sums.get(key, 0.0) + float(metrics[key]) * (x.size if key == "train_loss" else 1)
            tokens += x.size
            position += length
            iteration += 1
            bar.update(1)
            bar.set_postfix(ppl=f"{math.exp(min(sums['train_loss'] / tokens, 700.0)):.1f}")
        bar.close()
        val_loss, val_perplexity = evaluate_perplexity(
            loss_fn, data.valid, settings.batch_size, settings.bptt, hidden_size
        )
        alphas = {CELL_TYPE: model.alpha.numpy()}
        derived = derived_spec_from_search(
            spec, alphas, retrain=spec.retrain.enabled, origin=search_origin(spec, epoch, alphas),
            vocabulary_size=data.vocabulary_size,
        )
        train_loss = sums["train_loss"] / max(tokens, 1)
        record = {
            "epoch": epoch + 1,
            "learning_rate": lr,
            "train_loss": train_loss,
            "train_perplexity": math.exp(min(train_loss, 700.0)),
            "arch_loss": sums["arch_loss"] / max(len(lengths), 1),
            "grad_norm": sums["grad_norm"] / max(len(lengths), 1),
            "val_loss": val_loss,
            "val_perplexity": val_perplexity,
            "steps": len(lengths),
            "seconds": time.perf_counter() - started,
            "genotype": genotype_text(derived),
            "alpha_softmax": {t: softmax(a).round(4).tolist() for t, a in alphas.items()},
        }
        history.append(record)
        log.info(
            "search epoch %d/%d: train ppl %.2f | val ppl %.2f | lr %.4g | %d steps | %.1fs",
            epoch + 1, config.epochs, record["train_perplexity"], val_perplexity, lr, len(lengths), record["seconds"],
        )
        log.info("genotype: %s", record["genotype"])
        write_epoch(run_dir, epoch, derived, history)
        if on_epoch:
            on_epoch(record)
    return finish_search(run_dir, derived, alphas, history, model)
