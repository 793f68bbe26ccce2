"""``recurrent_cell``: DARTS' recurrent cell with highway connections, searched and retrained as a language model."""

import logging
import os

import numpy as np

from ..data_checks import TEXT_CHECKS
from .base import CellKind

log = logging.getLogger(__name__)


class RecurrentCellKind(CellKind):
    name = "recurrent_cell"
    spec_layout = "recurrent_cell"
    metric = "perplexity"
    metric_format = "{:.2f}"
    higher_is_better = False
    cell_types = ("recurrent",)
    distributed_retraining = False
    cell_inputs = {0: "s0 (x, h_prev)"}
    first_node = 1
    output_rule = "mean of"
    output_label = "h_t (mean)"
    collapse_cell = "recurrent"
    skip_operation = "identity"
    parameter_free = ("identity",)

    def alpha_edges(self, nodes):
        from keras_darts.compiler.recurrent import recurrent_edges

        return recurrent_edges(nodes)

    # -- data -----------------------------------------------------------------------
    data_checks = TEXT_CHECKS

    def load_data(self, spec):
        from ..text_data import load_text_data

        return load_text_data(spec)

    def data_document(self, spec, data):
        return {"task": "language_model", **data.to_document()}

    def data_files(self, spec, data):
        return {"vocabulary.txt": "\n".join(data.vocabulary) + "\n"}

    # -- search ---------------------------------------------------------------------
    def search_task(self, spec, data, strategy=None):
        from ..language_search import LanguageSearchTask

        return LanguageSearchTask(spec, data, strategy, self)

    def estimate_context(self, spec):
        return {"vocabulary_size": self.load_data(spec).vocabulary_size}

    def build_search(self, spec, strategy=None, vocabulary_size=None, **context):
        from ..language_search import build_language_search

        return build_language_search(spec, vocabulary_size, strategy=strategy)

    def synthetic_batch(self, spec, bilevel, seed=0):
        import tensorflow as tf

        rng = np.random.default_rng(seed)
        batch = spec.data.batch_size
        model = bilevel.model
        tokens = rng.integers(0, model.vocabulary_size, (batch, spec.data.bptt + 1))
        return (tf.constant(tokens[:, :-1], tf.int32), tf.constant(tokens[:, 1:], tf.int32),
                tf.zeros((batch, model.hidden_size), model.embedding.dtype), tf.constant([0, 0], tf.int32))

    def activation_bytes(self, spec, bilevel):
        """One time step's graph times ``bptt``, plus the embedding and decoder."""
        import tensorflow as tf

        from ..footprint import graph_float_bytes

        model = bilevel.model
        cell = model.cell
        size = spec.data.batch_size
        step = tf.function(lambda x, h: cell.step(x, h, cell.kernels(), model.probabilities(), {}), autograph=False)
        dtype = model.embedding.dtype
        per_step = graph_float_bytes(step.get_concrete_function(
            tf.TensorSpec((size, model.embedding_size), dtype), tf.TensorSpec((size, model.hidden_size), dtype)).graph)
        # Embedded inputs, the outputs, and the logits over the vocabulary.
        around = 4 * size * spec.data.bptt * (model.embedding_size + model.hidden_size + 2 * model.vocabulary_size)
        return per_step * spec.data.bptt + around

    # -- retraining and export ---------------------------------------------------------
    def check_retrainable(self, spec, derived):
        from keras_darts.spec import SpecError

        super().check_retrainable(spec, derived)
        space = spec.search_space
        ops = {e.op for cell in derived.cells.values() for node in cell.nodes for e in node}
        unknown = sorted(ops - set(space.operations))
        if unknown:
            raise SpecError.single(derived.source, "$.cells",
                                   f"operations {', '.join(unknown)} are not in the spec's operations")

    def retrain(self, spec, derived, data, run_dir=None, progress=False, strategy=None, writes=True):
        from keras_darts.spec import derived_with_network

        from ..language_retraining import retrain_language_model

        if strategy is not None:
            log.warning("a language model retrains on one device; the distribute setting applies to its search")
        self.check_retrainable(spec, derived)
        derived = derived_with_network(derived, **spec.derived_network(retrain=True),
                                       vocabulary_size=data.vocabulary_size)
        return retrain_language_model(spec, derived, data, run_dir=run_dir if writes else None, progress=progress)

    def retrain_result(self, run_dir, model, metrics, history):
        from ..language_retraining import LanguageRetrainResult

        return LanguageRetrainResult(model, history, metrics["test_loss"], metrics["test_perplexity"],
                                     metrics["parameters"], metrics.get("switched_to_averaging_after_epoch"))

    def retrain_summary(self, result):
        return f"retrain: {result.parameters} parameters, test perplexity {result.test_perplexity:.2f}"

    def export(self, run_dir, info, model=None, data=None, config=None):
        import tempfile

        import tensorflow as tf

        from keras_darts.compiler import count_parameters
        from keras_darts.spec import ExportConfig

        from .. import deploy
        from ..export import export_language_model, write_language_signature_note

        config = config or ExportConfig()
        with open(os.path.join(run_dir, "vocabulary.txt"), encoding="utf-8") as handle:
            vocabulary = handle.read().splitlines()
        if data is not None:
            tokens = data.test[: 4 * 12].reshape(4, 12)
        else:
            tokens = np.random.default_rng(0).integers(0, len(vocabulary), (4, 12))
        tokens = np.asarray(tokens, np.int32)
        hidden = tf.zeros((tokens.shape[0], model.hidden_size))
        expected = tf.nn.log_softmax(model(tokens, hidden, training=False)[0], axis=-1).numpy()
        folder = os.path.join(run_dir, "export")
        os.makedirs(folder, exist_ok=True)
        # The checking processes start first: they import TensorFlow while this one writes the SavedModels.
        with deploy.started_workers(config.formats) as workers, tempfile.TemporaryDirectory(dir=folder) as scratch:
            inside = "saved_model" in config.formats
            saved_model = os.path.join(folder if inside else scratch, "saved_model")
            export_language_model(model, saved_model)
            if inside:
                write_language_signature_note(saved_model, model.hidden_size, vocabulary)
            source = saved_model
            if deploy.tflite_formats(config.formats):  # one sequence per call: the loop over time needs it static
                source = export_language_model(model, os.path.join(scratch, "one_sequence"), batch=1)
            entries, results = deploy.verified_formats(config, folder, saved_model, source, "language",
                                                       {"tokens": tokens}, expected, hidden_size=model.hidden_size,
                                                       saved_model_tolerance=1e-4, workers=workers)
        network = {"parameters": count_parameters(model), "per": "token", "multiply_adds": self.multiply_adds(model)}
        return deploy.report(network, entries, results, config)

    def multiply_adds(self, model):
        """Multiply-accumulates of one token through ``model`` (a language model), from its traced graph."""
        import tensorflow as tf

        from ..deploy import multiply_adds

        return multiply_adds(lambda t, h: model(t, h, training=False)[0],
                             [tf.TensorSpec((1, 1), tf.int32), tf.TensorSpec((1, model.hidden_size), tf.float32)])

    # -- text ---------------------------------------------------------------------------
    def describe_space(self, spec):
        space = spec.search_space
        network = space.network
        return (f"recurrent cell: {space.nodes} nodes, k: {space.k}, highway {str(space.highway).lower()}, "
                f"output {space.output}; language model: embedding {network.embedding_size}, "
                f"hidden {network.hidden_size}")

    def describe_derived(self, derived):
        from keras_darts.compiler import build_language_model, count_parameters

        network = derived.network
        lines = [f"language model: embedding {network.embedding_size}, hidden {network.hidden_size}, "
                 f"vocabulary {network.vocabulary_size}, tied weights {str(network.tie_weights).lower()}"]
        if network.vocabulary_size:
            model = build_language_model(derived)
            lines.append(f"parameters: {count_parameters(model)}")
            lines.append(f"multiply-adds: {self.multiply_adds(model):,} per token")
        return lines
