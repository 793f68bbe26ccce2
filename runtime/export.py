"""TensorFlow SavedModel export of a derived network, and its verification.

The serving signature ``serving_default`` takes ``images``: float32
``(batch, H, W, C)`` scaled to [0, 1] as the data loader gives them (uint8
sources divided by 255), normalises them with the training statistics and
returns ``probabilities`` (batch, classes).
"""

import json
import os

import keras
import numpy as np
import tensorflow as tf

SIGNATURE = "serving_default"


def write_archive(model, serve, path):
    """Write ``model`` with the endpoint ``serve`` as ``serving_default`` to ``path``."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, serve)
    archive.write_out(path, verbose=False)
    return path


def export_saved_model(model, path, mean, std):
    """Write ``model`` as a SavedModel at ``path`` with a serving signature."""
    image_shape = tuple(model.derived.network.input_shape)
    mean = tf.constant(np.asarray(mean, np.float32))
    std = tf.constant(np.asarray(std, np.float32))

    @tf.function(input_signature=[tf.TensorSpec((None, *image_shape), tf.float32, name="images")], autograph=False)
    def serve(images):
        logits = model((images - mean) / std, training=False)
        return {"probabilities": tf.nn.softmax(logits, axis=-1)}

    return write_archive(model, serve, path)


def verify_saved_model(path, model, images, mean, std, atol=1e-5):
    """Load the SavedModel in a fresh Python process and compare its probabilities with Keras'.

    Returns the largest absolute difference; raises ``ExportVerificationError`` above ``atol``.
    """
    from .deploy import check_float_difference, check_exported

    images = np.asarray(images, np.float32)
    expected = tf.nn.softmax(model((images - mean) / std, training=False), axis=-1).numpy()
    outputs, _ = check_exported("image", path, {}, {"images": images}, latency_runs=1)
    return check_float_difference(os.path.join(path, "saved_model.pb"), outputs["saved_model"], expected, atol)


def write_signature_note(path, image_shape, num_classes):
    note = {
        "signature": SIGNATURE,
        "input": {"name": "images", "dtype": "float32", "shape": [None, *image_shape], "range": [0.0, 1.0]},
        "output": {"name": "probabilities", "dtype": "float32", "shape": [None, num_classes]},
    }
    with open(os.path.join(path, "keras_darts_signature.json"), "w", encoding="utf-8") as handle:
        json.dump(note, handle, indent=2)


# -- language models -----------------------------------------------------------------
# serving_default: ``tokens`` int32 (batch, time) and ``hidden`` float32
# (batch, hidden_size) -> ``log_probabilities`` (batch, time, vocabulary) of
# each next token and ``hidden``, the state after the last token. Start a
# stream with zeros and feed each call's ``hidden`` into the next to run it
# statefully over text of any length.


def export_language_model(model, path, batch=None):
    """Write a language model as a SavedModel at ``path`` with a stateful-use serving signature.

    ``batch`` fixes the number of sequences per call (TFLite's converter
    needs it static to lower the loop over time); ``None`` leaves it free.
    """
    hidden_size = model.hidden_size

    @tf.function(input_signature=[tf.TensorSpec((batch, None), tf.int32, name="tokens"),
                                  tf.TensorSpec((batch, hidden_size), tf.float32, name="hidden")], autograph=False)
    def serve(tokens, hidden):
        logits, last, _, _ = model(tokens, hidden, training=False)
        return {"log_probabilities": tf.nn.log_softmax(logits, axis=-1), "hidden": last}

    return write_archive(model, serve, path)


def write_language_signature_note(path, hidden_size, vocabulary):
    note = {
        "signature": SIGNATURE,
        "inputs": {
            "tokens": {"dtype": "int32", "shape": [None, None], "vocabulary": "vocabulary.txt"},
            "hidden": {"dtype": "float32", "shape": [None, hidden_size], "start": "zeros"},
        },
        "outputs": {
            "log_probabilities": {"dtype": "float32", "shape": [None, None, len(vocabulary)]},
            "hidden": {"dtype": "float32", "shape": [None, hidden_size], "use": "feed into the next call"},
        },
    }
    with open(os.path.join(path, "keras_darts_signature.json"), "w", encoding="utf-8") as handle:
        json.dump(note, handle, indent=2)
    with open(os.path.join(path, "vocabulary.txt"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(vocabulary) + "\n")
