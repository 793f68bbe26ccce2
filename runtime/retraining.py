"""Training a derived network from scratch, as the DARTS evaluation does.

Per step: loss = CE(logits) + auxiliary_weight * CE(auxiliary logits); SGD
with PyTorch momentum, coupled weight decay and clipping; cosine learning
rate per epoch; drop-path probability ramped linearly from 0 to
``drop_path_prob`` over the epochs. Epoch ``e``'s order and augmentation are
drawn from ``(seed, e)``.

Under a tf.distribute strategy each replica takes its slice of the global
batch; losses are summed over the replicas and divided by the global batch
size, gradients are summed, and every batch normalisation uses the global
batch's statistics, so the step is the one-device step on the global batch
(drop-path masks are drawn per replica). A checkpoint is written after every
epoch and a run directory that holds one resumes from it, with any number of
replicas.
"""

import contextlib
import dataclasses
import logging
import os
import time

import keras
import tensorflow as tf
from tqdm.auto import tqdm

from keras_darts.compiler import build_network, count_parameters

from . import rundir
from .bilevel import dense_gradients
from .checkpoint import Checkpoints
from .data import pipeline
from .distribution import check_workers_agree, cross_replica_sum, run_on_replicas
from .metrics import correct_count, evaluate, summed_cross_entropy
from .optimizers import CoupledSGD, cosine_learning_rate

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RetrainResult:
    model: object
    history: list
    test_loss: float
    test_accuracy: float
    parameters: int


def _signature(image_shape):
    return (tf.TensorSpec((None, *image_shape), tf.float32), tf.TensorSpec((None,), tf.int32))


def make_train_step(model, optimizer, auxiliary_weight, image_shape, strategy=None):
    """``step(x, y, lr) -> (summed loss, number correct)`` over the global batch ``(x, y)``."""
    variables = optimizer.variables_list

    def replica_step(batch, examples, learning_rate):
        x, y = batch
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            if isinstance(outputs, (tuple, list)):
                logits, aux_logits = outputs
                total = summed_cross_entropy(y, logits) + auxiliary_weight * summed_cross_entropy(y, aux_logits)
            else:
                logits = outputs
                total = summed_cross_entropy(y, logits)
            loss = total / examples
        gradients = cross_replica_sum(dense_gradients(tape.gradient(loss, variables), variables))
        optimizer.apply(gradients, learning_rate)
        return cross_replica_sum([total, correct_count(y, logits)])

    @tf.function(input_signature=[*_signature(image_shape), tf.TensorSpec((), tf.float32)])
    def train_step(x, y, learning_rate):
        examples = tf.cast(tf.shape(y)[0], tf.float32)
        return run_on_replicas(strategy, replica_step, (x, y), (True, True), examples, learning_rate)

    return train_step


def make_eval_step(model, image_shape, strategy=None):
    """``step(x, y) -> (summed loss, number correct)`` in inference mode."""

    def replica_step(batch):
        x, y = batch
        logits = model(x, training=False)
        return cross_replica_sum([summed_cross_entropy(y, logits), correct_count(y, logits)])

    @tf.function(input_signature=_signature(image_shape))
    def eval_step(x, y):
        return run_on_replicas(strategy, replica_step, (x, y), (True, True))

    return eval_step


def retrain(spec, derived, data, run_dir=None, progress=False, strategy=None, writes=True, model_builder=build_network):
    """Train ``derived`` on ``data`` as ``spec.retrain`` says; evaluate on the test split.

    ``model_builder(derived, seed=..., synchronized=...)`` builds the network (its kind's).

    With ``run_dir``, per-epoch checkpoints go to ``run_dir/retrain/checkpoints``
    and a checkpoint found there is resumed; ``writes=False`` (a worker that
    is not the chief) reads the run directory but writes nothing.
    """
    config = spec.retrain
    keras.utils.set_random_seed(config.seed)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = model_builder(derived, seed=config.seed, synchronized=strategy is not None)
        optimizer = CoupledSGD.from_config(model.trainable_variables, config.weights_optimizer)
    parameters = count_parameters(model)
    train_step = make_train_step(model, optimizer, config.auxiliary_weight, data.image_shape, strategy)
    eval_step = make_eval_step(model, data.image_shape, strategy)
    train_data = pipeline(data, data.x_train, data.y_train, config.batch_size, True, config.augment, config.seed)
    test_data = pipeline(data, data.x_test, data.y_test, config.batch_size)
    history, first_epoch = [], 0
    checkpoints = None
    if run_dir:
        checkpoints = Checkpoints(os.path.join(run_dir, "retrain", "checkpoints"), model, writes=writes,
                                  optimizer=optimizer)
        if checkpoints.latest():
            state, _ = checkpoints.restore()
            history, first_epoch = state["history"], state["epoch"]
            log.info("resuming the retraining of %s after epoch %d from its checkpoint", derived.name, first_epoch)
    check_workers_agree(strategy, first_epoch, "retraining", run_dir)
    replicas = strategy.num_replicas_in_sync if strategy else 1
    log.info("retrain %s: %d parameters (auxiliary head excluded), %d epochs, global batch %d on %d replica%s",
             derived.name, parameters, config.epochs, config.batch_size, replicas, "" if replicas == 1 else "s")
    steps = train_data.batches_per_epoch()
    opt_cfg = config.weights_optimizer
    for epoch in range(first_epoch, config.epochs):
        lr = cosine_learning_rate(epoch, config.epochs, opt_cfg.learning_rate, opt_cfg.learning_rate_min)
        model.drop_path_rate.assign(derived.network.drop_path_prob * epoch / config.epochs)
        started = time.perf_counter()
        total_loss = total_correct = count = 0.0
        bar = tqdm(total=steps, desc=f"retrain {epoch + 1}/{config.epochs}", disable=not progress, leave=False,
                   unit="step")
        for x, y in train_data.epoch(epoch):
            loss, correct = train_step(x, y, tf.constant(lr, tf.float32))
            total_loss += float(loss)
            total_correct += float(correct)
            count += int(y.shape[0])
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
        if run_dir and writes:
            checkpoints.save({"epoch": epoch + 1, "iteration": (epoch + 1) * steps, "history": history})
            rundir.write_json(os.path.join(run_dir, "retrain", "history.json"), history)
            rundir.write_history_csv(os.path.join(run_dir, "retrain", "history.csv"), history)
    test_loss, test_accuracy = evaluate(eval_step, test_data.epoch(0), progress, desc="test")
    log.info("test: loss %.4f accuracy %.4f", test_loss, test_accuracy)
    if run_dir and writes:
        model.save(os.path.join(run_dir, "retrain", "model.keras"))
        rundir.write_json(
            os.path.join(run_dir, "retrain", "metrics.json"),
            {"test_loss": test_loss, "test_accuracy": test_accuracy, "parameters": parameters,
             "test_examples": int(len(data.y_test))},
        )
    return RetrainResult(model, history, test_loss, test_accuracy, parameters)
