"""Training a derived network from scratch, as the DARTS evaluation does.

Per step: loss = CE(logits) + auxiliary_weight * CE(auxiliary logits); SGD
with PyTorch momentum, coupled weight decay and clipping; cosine learning
rate per epoch; drop-path probability ramped linearly from 0 to
``drop_path_prob`` over the epochs.
"""

import dataclasses
import logging
import os
import time

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from keras_darts.compiler import build_network, count_parameters

from . import rundir
from .metrics import correct_count, cross_entropy, evaluate
from .data import pipeline
from .optimizers import CoupledSGD, cosine_learning_rate

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RetrainResult:
    model: object
    history: list
    test_loss: float
    test_accuracy: float
    parameters: int


def make_train_step(model, optimizer, auxiliary_weight, image_shape):
    images = tf.TensorSpec((None, *image_shape), tf.float32)
    labels = tf.TensorSpec((None,), tf.int32)

    @tf.function(input_signature=[images, labels, tf.TensorSpec((), tf.float32)])
    def train_step(x, y, learning_rate):
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            if isinstance(outputs, (tuple, list)):
                logits, aux_logits = outputs
                loss = cross_entropy(y, logits) + auxiliary_weight * cross_entropy(y, aux_logits)
            else:
                logits = outputs
                loss = cross_entropy(y, logits)
        gradients = tape.gradient(loss, optimizer.variables_list)
        optimizer.apply(gradients, learning_rate)
        return loss, correct_count(y, logits)

    return train_step


def make_eval_step(model, image_shape):
    @tf.function(input_signature=[tf.TensorSpec((None, *image_shape), tf.float32), tf.TensorSpec((None,), tf.int32)])
    def eval_step(x, y):
        logits = model(x, training=False)
        loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        return loss, correct_count(y, logits)

    return eval_step


def retrain(spec, derived, data, run_dir=None, progress=False):
    """Train ``derived`` on ``data`` as ``spec.retrain`` says; evaluate on the test split."""
    config = spec.retrain
    keras.utils.set_random_seed(config.seed)
    model = build_network(derived, seed=config.seed)
    parameters = count_parameters(model)
    optimizer = CoupledSGD.from_config(model.trainable_variables, config.weights_optimizer)
    train_step = make_train_step(model, optimizer, config.auxiliary_weight, data.image_shape)
    eval_step = make_eval_step(model, data.image_shape)
    train_ds = pipeline(data, data.x_train, data.y_train, config.batch_size, True, config.augment, config.seed)
    test_ds = pipeline(data, data.x_test, data.y_test, config.batch_size)
    log.info("retrain %s: %d parameters (auxiliary head excluded), %d epochs", derived.name, parameters, config.epochs)
    history = []
    steps = int(np.ceil(len(data.y_train) / config.batch_size))
    opt_cfg = config.weights_optimizer
    for epoch in range(config.epochs):
        lr = cosine_learning_rate(epoch, config.epochs, opt_cfg.learning_rate, opt_cfg.learning_rate_min)
        model.drop_path_rate.assign(derived.network.drop_path_prob * epoch / config.epochs)
        started = time.perf_counter()
        total_loss = total_correct = count = 0.0
        bar = tqdm(total=steps, desc=f"retrain {epoch + 1}/{config.epochs}", disable=not progress, leave=False,
                   unit="step")
        for x, y in train_ds:
            loss, correct = train_step(x, y, tf.constant(lr, tf.float32))
            batch = int(y.shape[0])
            total_loss += float(loss) * batch
            total_correct += float(correct)
            count += batch
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss / count:.3f}")
        bar.close()
        record = {
            "epoch": epoch + 1,
            "learning_rate": lr,
            "drop_path_prob": float(model.drop_path_rate.numpy()),
            "train_loss": total_loss / count,
            "train_accuracy": total_correct / count,
            "seconds": time.perf_counter() - started,
        }
        history.append(record)
        log.info("retrain epoch %d/%d: loss %.4f acc %.3f | lr %.5f | %.1fs", epoch + 1, config.epochs,
                 record["train_loss"], record["train_accuracy"], lr, record["seconds"])
        if run_dir:
            rundir.write_json(os.path.join(run_dir, "retrain", "history.json"), history)
            rundir.write_history_csv(os.path.join(run_dir, "retrain", "history.csv"), history)
    test_loss, test_accuracy = evaluate(eval_step, test_ds, progress, desc="test")
    log.info("test: loss %.4f accuracy %.4f", test_loss, test_accuracy)
    if run_dir:
        model.save(os.path.join(run_dir, "retrain", "model.keras"))
        rundir.write_json(
            os.path.join(run_dir, "retrain", "metrics.json"),
            {"test_loss": test_loss, "test_accuracy": test_accuracy, "parameters": parameters,
             "test_examples": int(len(data.y_test))},
        )
    return RetrainResult(model, history, test_loss, test_accuracy, parameters)
