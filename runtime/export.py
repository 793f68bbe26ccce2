"""TensorFlow SavedModel export of a derived network, and its verification.

The serving signature ``serving_default`` takes ``images``: float32
``(batch, H, W, C)`` scaled to [0, 1] as the data loader gives them (uint8
sources divided by 255), normalises them with the training statistics and
returns ``probabilities`` (batch, classes).
"""

import json
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_darts.spec import ExportVerificationError

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

    @tf.function(input_signature=[tf.TensorSpec((None, *image_shape), tf.float32, name="images")])
    def serve(images):
        logits = model((images - mean) / std, training=False)
        return {"probabilities": tf.nn.softmax(logits, axis=-1)}

    return write_archive(model, serve, path)


_CHECK = """
import json, sys
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
images = np.load(sys.argv[2])
out = loaded.signatures["{signature}"](images=tf.constant(images))["probabilities"].numpy()
np.save(sys.argv[3], out)
"""


def verify_saved_model(path, model, images, mean, std, atol=1e-5):
    """Load the SavedModel in a fresh Python process and compare its probabilities with Keras'.

    Returns the largest absolute difference; raises ``ExportVerificationError`` above ``atol``.
    """
    images = np.asarray(images, np.float32)
    expected = tf.nn.softmax(model((images - mean) / std, training=False), axis=-1).numpy()
    with tempfile.TemporaryDirectory() as folder:
        inputs = os.path.join(folder, "images.npy")
        outputs = os.path.join(folder, "probabilities.npy")
        np.save(inputs, images)
        actual = _run_in_fresh_process(path, _CHECK.format(signature=SIGNATURE), inputs, outputs)
    return _check_difference(path, actual, expected, atol)


def _run_in_fresh_process(path, script, inputs, outputs, *extra):
    """Run a check ``script`` on the SavedModel at ``path`` in a new Python; return the array it saved."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", script, path, inputs, outputs, *extra], env=env,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ExportVerificationError.single(path, "saved_model.pb",
                                             f"loading and running it in a fresh process failed: {last}")
    return np.load(outputs)


def _check_difference(path, actual, expected, atol):
    difference = float(np.max(np.abs(actual - expected)))
    if not difference <= atol:
        raise ExportVerificationError.single(
            path, "saved_model.pb", f"differs from the Keras model by {difference} (expected at most {atol})")
    return difference


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


def export_language_model(model, path):
    """Write a language model as a SavedModel at ``path`` with a stateful-use serving signature."""
    hidden_size = model.hidden_size

    @tf.function(input_signature=[tf.TensorSpec((None, None), tf.int32, name="tokens"),
                                  tf.TensorSpec((None, hidden_size), tf.float32, name="hidden")])
    def serve(tokens, hidden):
        logits, last, _, _ = model(tokens, hidden, training=False)
        return {"log_probabilities": tf.nn.log_softmax(logits, axis=-1), "hidden": last}

    return write_archive(model, serve, path)


_CHECK_LANGUAGE = """
import sys
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
tokens = np.load(sys.argv[2])
serve = loaded.signatures["{signature}"]
hidden = tf.zeros((tokens.shape[0], int(sys.argv[4])))
outputs = []
for start in range(0, tokens.shape[1], 3):  # in pieces, carrying the state
    result = serve(tokens=tf.constant(tokens[:, start:start + 3]), hidden=hidden)
    outputs.append(result["log_probabilities"].numpy())
    hidden = result["hidden"]
np.save(sys.argv[3], np.concatenate(outputs, axis=1))
"""


def verify_language_model(path, model, tokens, atol=1e-4):
    """Run the SavedModel in a fresh process, statefully in pieces, against Keras on the whole sequence."""
    tokens = np.asarray(tokens, np.int32)
    hidden = tf.zeros((tokens.shape[0], model.hidden_size))
    expected = tf.nn.log_softmax(model(tokens, hidden, training=False)[0], axis=-1).numpy()
    with tempfile.TemporaryDirectory() as folder:
        inputs = os.path.join(folder, "tokens.npy")
        outputs = os.path.join(folder, "log_probabilities.npy")
        np.save(inputs, tokens)
        actual = _run_in_fresh_process(path, _CHECK_LANGUAGE.format(signature=SIGNATURE), inputs, outputs,
                                       str(model.hidden_size))
    return _check_difference(path, actual, expected, atol)


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
