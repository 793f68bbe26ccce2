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

import keras
import tensorflow as tf

from keras_darts.compiler import build_network, count_parameters, with_input_normalization

from . import rundir
from .bilevel import dense_gradients
from .checkpoint import Checkpoints
from .data import pipeline
from .distribution import cross_replica_sum, run_on_replicas
from .graph_build import built_as_the_process_runs
from .loop import Checkpointing, HistoryFiles, Loop, ProgressBar, WorkersAgree
from .metrics import correct_count, evaluate, summed_cross_entropy
from .optimizers import CoupledSGD, cosine_learning_rate
from .precision import NoLossScale, loss_scale_for, precision_note, set_precision

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


def make_train_step(model, optimizer, auxiliary_weight, image_shape, strategy=None, loss_scale=None):
    """``step(x, y, lr) -> (summed loss, number correct)`` over the global batch ``(x, y)``.

    ``loss_scale``: float16's (``runtime/precision.py``); none by default.
    """
    variables = optimizer.variables_list
    loss_scale = loss_scale or NoLossScale()

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
            loss = loss_scale.scale(total / examples)
        gradients = cross_replica_sum(loss_scale.unscale(dense_gradients(tape.gradient(loss, variables), variables)))
        loss_scale.apply(optimizer, gradients, learning_rate)
        return cross_replica_sum([total, correct_count(y, logits)])

    @tf.function(input_signature=[*_signature(image_shape), tf.TensorSpec((), tf.float32)], autograph=False)
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

    @tf.function(input_signature=_signature(image_shape), autograph=False)
    def eval_step(x, y):
        return run_on_replicas(strategy, replica_step, (x, y), (True, True))

    return eval_step


class ImageRetraining:
    """Retraining steps as the ``Loop`` runs them: epoch ``e`` draws order and augmentation from ``(seed, e)``."""

    def __init__(self, config, model, train_step, train_data, drop_path_prob):
        self.config = config
        self.model = model
        self.train_step = train_step
        self.train_data = train_data
        self.drop_path_prob = drop_path_prob
        self.lr = None

    def steps_in_epoch(self, epoch):
        return self.train_data.batches_per_epoch()

    def begin_epoch(self, state):
        settings = self.config.weights_optimizer
        self.lr = cosine_learning_rate(state.epoch, self.config.epochs, settings.learning_rate,
                                       settings.learning_rate_min)
        self.model.drop_path_rate.assign(self.drop_path_prob * state.epoch / self.config.epochs)

    def batches(self, state):
        return self.train_data.epoch(state.epoch, state.step)

    def step(self, inputs, state):
        x, y = inputs
        loss, correct = self.train_step(x, y, tf.constant(self.lr, tf.float32))
        count = int(y.shape[0])
        return {"train_loss": float(loss) / count, "train_accuracy": float(correct) / count}, count

    def accept(self):
        pass

    def end_epoch(self, state, seconds):
        record = {"epoch": state.epoch + 1, "learning_rate": self.lr,
                  "drop_path_prob": float(self.model.drop_path_rate.numpy()), **state.means(), "seconds": seconds}
        log.info("retrain epoch %d/%d: loss %.4f acc %.3f | lr %.5f | %.1fs", record["epoch"], self.config.epochs,
                 record["train_loss"], record["train_accuracy"], self.lr, seconds)
        return record

    def arrays(self):
        return {}

    def load_arrays(self, arrays):
        pass


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
        model = set_precision(model_builder(derived, seed=config.seed, synchronized=strategy is not None),
                              config.precision)
        optimizer = CoupledSGD.from_config(model.trainable_variables, config.weights_optimizer)
        loss_scale = loss_scale_for(config.precision)
    parameters = count_parameters(model)
    train_step = built_as_the_process_runs(
        make_train_step(model, optimizer, config.auxiliary_weight, data.image_shape, strategy, loss_scale),
        "retraining step")
    eval_step = built_as_the_process_runs(make_eval_step(model, data.image_shape, strategy), "test step")
    train_data = pipeline(data, data.x_train, data.y_train, config.batch_size, True, config.augment, config.seed)
    test_data = pipeline(data, data.x_test, data.y_test, config.batch_size)
    replicas = strategy.num_replicas_in_sync if strategy else 1
    log.info("retrain %s: %d parameters (auxiliary head excluded), %d epochs, global batch %d on %d replica%s%s",
             derived.name, parameters, config.epochs, config.batch_size, replicas, "" if replicas == 1 else "s",
             precision_note(config.precision))
    callbacks = [WorkersAgree(strategy, "retraining", run_dir), ProgressBar("retrain", progress)]
    if run_dir:
        folder = os.path.join(run_dir, "retrain")
        if writes:
            callbacks.append(HistoryFiles(folder))
        callbacks.append(Checkpointing(Checkpoints(os.path.join(folder, "checkpoints"), model, writes=writes,
                                                   loss_scale=loss_scale, optimizer=optimizer),
                                       name=f"the retraining of {derived.name}"))
    steps = ImageRetraining(config, model, train_step, train_data, derived.network.drop_path_prob)
    state = Loop(steps, config.epochs, callbacks).run()
    test_loss, test_accuracy = evaluate(eval_step, test_data.epoch(0), progress, desc="test")
    log.info("test: loss %.4f accuracy %.4f", test_loss, test_accuracy)
    if run_dir and writes:
        # Saved behind the normalisation, it takes images as the SavedModel does.
        with_input_normalization(model, data.mean, data.std).save(os.path.join(run_dir, "retrain", "model.keras"))
        rundir.write_json(
            os.path.join(run_dir, "retrain", "metrics.json"),
            {"test_loss": test_loss, "test_accuracy": test_accuracy, "parameters": parameters,
             "test_examples": int(len(data.y_test))},
        )
    return RetrainResult(model, state.history, test_loss, test_accuracy, parameters)
