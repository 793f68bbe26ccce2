"""Measure blocks of a derived network through the TFLite interpreter, run as a script in a fresh Python process.

``python -m keras_darts.runtime.latency_worker REQUEST.json`` (or ``-``: the
path is read from standard input once TensorFlow is imported, as
``deploy.FreshProcess`` hands it over): the request
holds ``blocks`` (``{key: description}``, as ``compiler.latency.LatencyPlan``
writes them) or ``files`` (``{name: TFLite file}``, timed alike), ``runs``
and ``results`` (a JSON file). Each block is built
alone on a batch of one at its input shape, exported as a SavedModel,
converted to a float32 TFLite model and timed (median of ``runs`` calls
after warm-up), as the export times a whole network. The results file is
rewritten after every block, so a crash keeps what was measured. A fresh
process keeps the converter's memory leak and the training's threads away
from the timings.
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def block_layers(description):
    """The Keras layers of one block, applied in order (a BN in inference mode)."""
    import keras

    from keras_darts.compiler.cells import _preprocessing
    from keras_darts.compiler.network import stem_layers
    from keras_darts.compiler.ops import build_op

    kind = description["block"]
    if kind == "op":
        return [build_op(description["op"], description["channels"], description["stride"], affine=True,
                         layer_name="op")]
    if kind == "preprocess":
        pair = _preprocessing(description["channels"], description["reduction_prev"], True, "cell")
        return [pair[description["part"]]]
    if kind == "stem":
        stems = stem_layers(description["stem"], description["channels"], description["stem_multiplier"])
        if description["part"]:
            return stems[1]
        # The exported network normalises its input first (values that cannot be folded away).
        depth = description["input"][-1]
        return [keras.layers.Normalization(mean=[0.3] * depth, variance=[0.09] * depth), *stems[0]]
    if kind == "head":
        return [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(description["classes"]),
                keras.layers.Softmax()]
    raise ValueError(f"unknown block {kind!r}")


def tflite_model(description, folder):
    """The block's float32 TFLite model (bytes), through a SavedModel in ``folder``."""
    import keras
    import tensorflow as tf

    inputs = keras.Input(tuple(description["input"]), batch_size=1, name="x")
    x = inputs
    for layer in block_layers(description):
        x = layer(x, training=False)
    path = os.path.join(folder, "saved_model")
    keras.Model(inputs, x).export(path, format="tf_saved_model", verbose=False)
    return tf.lite.TFLiteConverter.from_saved_model(path).convert()


def median_invoke_ms(interpreter, runs, **source):
    """One TFLite model (``model_content`` or ``model_path``) on a random input: median ms of ``runs`` invocations."""
    import numpy as np

    from keras_darts.runtime.litert_worker import _median_ms

    runner = interpreter(**source)
    runner.allocate_tensors()
    detail = runner.get_input_details()[0]
    rng = np.random.default_rng(0)
    if np.issubdtype(detail["dtype"], np.integer):  # a full-integer model's quantised input
        values = rng.integers(np.iinfo(detail["dtype"]).min, np.iinfo(detail["dtype"]).max, detail["shape"])
    else:
        values = rng.standard_normal(detail["shape"])
    runner.set_tensor(detail["index"], values.astype(detail["dtype"]))
    return _median_ms(runner.invoke, runs)


def measure(request):
    """Time each of ``blocks`` (built and converted here) or each of ``files`` (TFLite files), into ``results``."""
    from keras_darts.runtime.litert_worker import interpreter_class

    interpreter, name = interpreter_class()
    results = {"interpreter": name, "entries": {}}
    items = request.get("blocks") or request["files"]
    for key, item in items.items():
        if request.get("blocks"):
            with tempfile.TemporaryDirectory() as folder:
                source = {"model_content": tflite_model(item, folder)}
        else:
            source = {"model_path": item}
        results["entries"][key] = median_invoke_ms(interpreter, request["runs"], **source)
        with open(request["results"] + ".part", "w", encoding="utf-8") as handle:
            json.dump(results, handle)
        os.replace(request["results"] + ".part", request["results"])
        print(f"{len(results['entries'])}/{len(items)} {key}: {results['entries'][key]:.4f} ms", file=sys.stderr,
              flush=True)


if __name__ == "__main__":
    from keras_darts.runtime.startup import import_tensorflow_quietly

    import_tensorflow_quietly(without_keras_extras=True)  # as the CLI starts it (see runtime.startup)
    from keras_darts.runtime.litert_worker import request_path

    path = request_path(sys.argv[1])
    if path:
        with open(path, encoding="utf-8") as request_file:
            measure(json.load(request_file))
