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

SIGNATURE = "serving_default"


def export_saved_model(model, path, mean, std):
    """Write ``model`` as a SavedModel at ``path`` with a serving signature."""
    image_shape = tuple(model.derived.network.input_shape)
    mean = tf.constant(np.asarray(mean, np.float32))
    std = tf.constant(np.asarray(std, np.float32))

    @tf.function(input_signature=[tf.TensorSpec((None, *image_shape), tf.float32, name="images")])
    def serve(images):
        logits = model((images - mean) / std, training=False)
        return {"probabilities": tf.nn.softmax(logits, axis=-1)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, serve)
    archive.write_out(path, verbose=False)
    return path


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

    Returns the largest absolute difference; raises ``AssertionError`` above ``atol``.
    """
    images = np.asarray(images, np.float32)
    expected = tf.nn.softmax(model((images - mean) / std, training=False), axis=-1).numpy()
    with tempfile.TemporaryDirectory() as folder:
        inputs = os.path.join(folder, "images.npy")
        outputs = os.path.join(folder, "probabilities.npy")
        np.save(inputs, images)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        subprocess.run(
            [sys.executable, "-c", _CHECK.format(signature=SIGNATURE), path, inputs, outputs],
            check=True, env=env, capture_output=True,
        )
        actual = np.load(outputs)
    difference = float(np.max(np.abs(actual - expected)))
    if difference > atol:
        raise AssertionError(f"SavedModel at {path} differs from the Keras model by {difference} (> {atol})")
    return difference


def write_signature_note(path, image_shape, num_classes):
    note = {
        "signature": SIGNATURE,
        "input": {"name": "images", "dtype": "float32", "shape": [None, *image_shape], "range": [0.0, 1.0]},
        "output": {"name": "probabilities", "dtype": "float32", "shape": [None, num_classes]},
    }
    with open(os.path.join(path, "keras_darts_signature.json"), "w", encoding="utf-8") as handle:
        json.dump(note, handle, indent=2)
