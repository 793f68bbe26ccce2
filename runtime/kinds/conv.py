"""``conv_cell``: DARTS' convolutional cells (normal and reduction) on image classification."""

import logging
import os

import numpy as np

from ..data_checks import IMAGE_CHECKS
from .base import CellKind

log = logging.getLogger(__name__)


class ConvCellKind(CellKind):
    name = "conv_cell"
    spec_layout = "conv_cell"
    metric = "accuracy"
    cell_types = ("normal", "reduce")
    cell_inputs = {0: "c_{k-2}", 1: "c_{k-1}"}
    first_node = 2
    output_rule = "concat"
    output_label = "c_k (concat)"
    collapse_cell = "normal"
    skip_operation = "skip_connect"
    parameter_free = ("max_pool_3x3", "avg_pool_3x3", "skip_connect")

    # -- the models: a kind that keeps this data and objective may change only these ------
    def build_supernet(self, spec):
        from keras_darts.compiler import build_supernet

        return build_supernet(spec)

    def build_network(self, derived, seed=None, synchronized=False):
        from keras_darts.compiler import build_network

        return build_network(derived, seed=seed, synchronized=synchronized)

    def alpha_edges(self, nodes):
        from keras_darts.compiler.graph import cell_edges

        return cell_edges(nodes)

    # -- data -----------------------------------------------------------------------
    data_checks = IMAGE_CHECKS

    def load_data(self, spec):
        from ..data import load_image_data

        return load_image_data(spec)

    def data_document(self, spec, data):
        return {
            "name": data.name,
            "image_shape": list(data.image_shape),
            "num_classes": int(spec.search_space.network.num_classes),
            "train_examples": int(len(data.y_train)),
            "test_examples": int(len(data.y_test)),
            "mean": data.mean.tolist(),
            "std": data.std.tolist(),
        }

    # -- search ---------------------------------------------------------------------
    def search_context(self, spec, run_dir=None):
        if spec.search.latency.target_ms is None:
            return {}
        from ..latency import latency_table, uniform_latency

        table = latency_table(spec, run_dir)
        log.info("latency-aware search (%s): expected latency %.3f ms at uniform op weights, target %s ms",
                 spec.search.latency.loss, uniform_latency(spec, table), spec.search.latency.target_ms)
        return {"latency_table": table}

    def search_task(self, spec, data, strategy=None, latency_table=None):
        from ..search_loop import ImageSearchTask

        return ImageSearchTask(spec, data, self.build_search(spec, strategy, latency_table=latency_table), self,
                               latency_table)

    def build_search(self, spec, strategy=None, latency_table=None, **context):
        from ..search_loop import build_search

        return build_search(spec, strategy=strategy, model_builder=self.build_supernet, latency_table=latency_table)

    def synthetic_batch(self, spec, bilevel, seed=0):
        import tensorflow as tf

        rng = np.random.default_rng(seed)
        batch = spec.data.batch_size
        shape = spec.search_space.network.input_shape
        classes = spec.search_space.network.num_classes
        return (tf.constant(rng.normal(size=(batch, *shape)), tf.float32),
                tf.constant(rng.integers(0, classes, batch), tf.int32))

    def activation_bytes(self, spec, bilevel):
        import tensorflow as tf

        from ..footprint import graph_float_bytes

        model = bilevel.model
        batch = self.synthetic_batch(spec, bilevel)
        forward = tf.function(lambda x: model(x, training=True), autograph=False)
        return graph_float_bytes(forward.get_concrete_function(tf.TensorSpec(batch[0].shape, tf.float32)).graph)

    # -- retraining and export ---------------------------------------------------------
    def retrain(self, spec, derived, data, run_dir=None, progress=False, strategy=None, writes=True):
        from keras_darts.spec import derived_with_network

        from ..retraining import retrain

        self.check_retrainable(spec, derived)
        derived = derived_with_network(derived, **spec.derived_network(retrain=True))
        return retrain(spec, derived, data, run_dir=run_dir, progress=progress, strategy=strategy, writes=writes,
                       model_builder=self.build_network)

    def retrain_result(self, run_dir, model, metrics, history):
        from keras_darts.compiler import derived_network_of

        from ..retraining import RetrainResult

        network = None if model is None else derived_network_of(model)
        return RetrainResult(network, history, metrics["test_loss"], metrics["test_accuracy"], metrics["parameters"])

    def retrain_summary(self, result):
        return f"retrain: {result.parameters} parameters, test accuracy {result.test_accuracy:.4f}"

    def export(self, run_dir, info, model=None, data=None, config=None):
        import tempfile

        import tensorflow as tf

        from keras_darts.compiler import count_parameters, derived_network_of
        from keras_darts.spec import ExportConfig

        from .. import deploy
        from ..export import export_saved_model, write_signature_note
        from ..latency import TABLE_FILE, table_latency
        from ..rundir import read_json

        config = config or ExportConfig()
        model = derived_network_of(model)
        mean = np.asarray(info["mean"], np.float32)
        std = np.asarray(info["std"], np.float32)
        shape = tuple(info["image_shape"])
        if data is not None:  # the test split, scored
            images, labels = data.x_test, data.y_test
        else:
            images, labels = np.random.default_rng(0).uniform(0, 1, (16, *shape)).astype(np.float32), None
        folder = os.path.join(run_dir, "export")
        os.makedirs(folder, exist_ok=True)

        def score(probabilities):
            accuracy = float(np.mean(np.argmax(probabilities, axis=-1) == labels))
            return {"metric": "accuracy", "value": accuracy, "change": accuracy - keras_accuracy}

        # The checking processes start first: they import TensorFlow while this one writes the SavedModel.
        with deploy.started_workers(config.formats) as workers, tempfile.TemporaryDirectory(dir=folder) as scratch:
            inside = "saved_model" in config.formats
            saved_model = os.path.join(folder if inside else scratch, "saved_model")
            export_saved_model(model, saved_model, mean, std)
            if inside:
                write_signature_note(saved_model, shape, info["num_classes"])
            # The Keras network's probabilities, from one traced function: 1.6 s on the quickstart, tracing
            # included, where op by op they took 2.4-2.7 s.
            predict = tf.function(lambda x: tf.nn.softmax(model((x - mean) / std, training=False)),
                                  input_signature=[tf.TensorSpec((None, *shape), tf.float32)], autograph=False)
            expected = np.concatenate([predict(images[i:i + 256]).numpy() for i in range(0, len(images), 256)])
            keras_accuracy = None if labels is None else float(np.mean(np.argmax(expected, axis=-1) == labels))
            calibration = None
            if "tflite_int8" in config.formats:
                chosen = np.random.default_rng(0).permutation(len(data.x_train))[:config.calibration_samples]
                calibration = {"images": data.x_train[np.sort(chosen)]}
            entries, results = deploy.verified_formats(config, folder, saved_model, saved_model, "image",
                                                       {"images": images}, expected,
                                                       score=None if labels is None else score,
                                                       calibration=calibration, workers=workers)
        network = {"parameters": count_parameters(model), "per": "image", "input_shape": list(shape),
                   "multiply_adds": self.multiply_adds(model)}
        table = os.path.join(run_dir, "search", TABLE_FILE)
        if os.path.exists(table):  # a latency-aware search's: what its table says this network takes
            network["latency_table_ms"] = table_latency(model.derived, read_json(table))
        reference = None if labels is None else {"metric": "accuracy", "value": keras_accuracy}
        return deploy.report(network, entries, results, config, keras=reference,
                             test_examples=0 if labels is None else len(labels))

    def multiply_adds(self, model):
        """Multiply-accumulates of one image through ``model`` (a derived network), from its traced graph."""
        import tensorflow as tf

        from ..deploy import multiply_adds

        shape = tuple(model.derived.network.input_shape)
        return multiply_adds(lambda x: model(x, training=False), [tf.TensorSpec((1, *shape), tf.float32)])

    # -- text ---------------------------------------------------------------------------
    def describe_space(self, spec):
        space = spec.search_space
        return (f"nodes: {space.nodes}, k: {space.k}, reduction cells at {list(space.reduction_positions)} "
                f"of {space.network.layers}")

    def describe_derived(self, derived):
        from keras_darts.compiler import count_parameters

        network = derived.network
        model = self.build_network(derived)
        return [f"network: C={network.init_channels}, {network.layers} cells, reductions at "
                f"{list(network.reduction_positions)}, input {list(network.input_shape)}, "
                f"{network.num_classes} classes",
                f"parameters: {count_parameters(model)} (auxiliary head excluded)",
                f"multiply-adds: {self.multiply_adds(model):,} per image"]
