"""TensorFlow Lite conversion, and checks of TFLite and ONNX files, run as a script in a fresh Python process.

``python litert_worker.py convert|check REQUEST.json`` (see ``deploy.py``), or
``-`` for the path, read from standard input once TensorFlow is imported
(``deploy.FreshProcess`` starts the process before the files exist).
Each conversion and each check runs in a process of its own: the converter
leaks memory on every call in TensorFlow 2.20-2.21 and can crash outright on
graphs it cannot quantise, and a model verified in the process that wrote it
proves less than one loaded from its file alone. This file imports nothing
of keras_darts, so that the process loads only what a deployment would
(and keeps out what Keras would import beside it, below).
"""

import json
import os
import statistics
import sys
import time
import warnings

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow imports Keras, and Keras imports scikit-learn, SciPy and matplotlib where they are installed
# (for its wrappers and plots), as they are beside keras_darts. A deployment has none of them and nothing
# here uses them: kept out, this process starts in 3.4-3.7 s instead of 4.7-5.0 s (importing TensorFlow
# on a 2-core AMD EPYC).
for _name in ("sklearn", "scipy", "matplotlib"):
    sys.modules.setdefault(_name, None)


def interpreter_class():
    """LiteRT's interpreter where ``ai-edge-litert`` is installed, TensorFlow's otherwise."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        import tensorflow as tf

        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        return tf.lite.Interpreter, "tf.lite"


# -- conversion ------------------------------------------------------------------------


def convert(request):
    import tensorflow as tf

    calibration = dict(np.load(request["calibration"])) if request.get("calibration") else None
    for form, path in request["formats"].items():
        converter = tf.lite.TFLiteConverter.from_saved_model(request["saved_model"], signature_keys=["serving_default"])
        if form in ("tflite_dynamic", "tflite_int8"):
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if form == "tflite_int8":
            count = len(next(iter(calibration.values())))
            converter.representative_dataset = lambda: (
                {name: values[i:i + 1] for name, values in calibration.items()} for i in range(count))
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        content = converter.convert()
        with open(path + ".part", "wb") as handle:
            handle.write(content)
        os.replace(path + ".part", path)


# -- checks ----------------------------------------------------------------------------


def _quantise(values, detail):
    scale, zero = detail["quantization"]
    if detail["dtype"] != np.int8 or scale == 0:
        return values.astype(detail["dtype"])
    return np.clip(np.round(values / scale + zero), -128, 127).astype(np.int8)


def _dequantise(values, detail):
    scale, zero = detail["quantization"]
    if detail["dtype"] != np.int8 or scale == 0:
        return values.astype(np.float32)
    return (values.astype(np.float32) - zero) * scale


class OnnxRunner:
    """An ONNX file run by ONNX Runtime, called like ``Runner``."""

    def __init__(self, path):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.output_names = [output.name for output in self.session.get_outputs()]

    def __call__(self, **arrays):
        return dict(zip(self.output_names, self.session.run(self.output_names, arrays)))


class Runner:
    """One TFLite model's serving signature, called with and returning float arrays by name."""

    def __init__(self, path, interpreter):
        self.interpreter = interpreter(model_path=path)
        self.signature = self.interpreter.get_signature_runner("serving_default")
        details = self.interpreter.get_signature_list()["serving_default"]
        self.input_names, self.output_names = details["inputs"], details["outputs"]
        self.inputs = self.signature.get_input_details()
        self.outputs = self.signature.get_output_details()

    def __call__(self, **arrays):
        fed = {name: _quantise(np.asarray(values), self.inputs[name]) for name, values in arrays.items()}
        out = self.signature(**fed)
        return {name: _dequantise(out[name], self.outputs[name]) for name in self.output_names}


def _median_ms(call, runs):
    for _ in range(3):  # warm-up: allocation, delegate set-up
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _image_outputs(run, images, batch=50):
    return np.concatenate([run(images=images[i:i + batch])["probabilities"] for i in range(0, len(images), batch)])


def _language_outputs(run, tokens, hidden_size, piece=3, batch_at_once=False):
    """The sequences in pieces, the state carried from one call to the next.

    TFLite models take one sequence (batch 1) at a time; a SavedModel takes
    them all at once (``batch_at_once``).
    """
    rows = [tokens] if batch_at_once else [row[None] for row in tokens]
    sequences = []
    for row in rows:
        hidden = np.zeros((len(row), hidden_size), np.float32)
        parts = []
        for start in range(0, row.shape[1], piece):
            out = run(tokens=row[:, start:start + piece], hidden=hidden)
            parts.append(out["log_probabilities"])
            hidden = out["hidden"]
        sequences.append(np.concatenate(parts, axis=1))
    return np.concatenate(sequences)


def check(request):
    # A SavedModel is served without Keras (TensorFlow Serving, tf.saved_model.load): TensorFlow imports it
    # where installed, and goes on without it. Checked so, the process is closer to a serving one and starts
    # about 0.5 s sooner.
    sys.modules.setdefault("keras", None)
    import tensorflow as tf

    interpreter, interpreter_name = interpreter_class()
    inputs = dict(np.load(request["inputs"]))
    runs = request["latency_runs"]
    results, outputs = {"interpreter": interpreter_name, "latency_ms": {}}, {}
    if request["kind"] == "image":
        images = inputs["images"]
        one = images[:1]
        loaded = tf.saved_model.load(request["saved_model"]).signatures["serving_default"]
        outputs["saved_model"] = _image_outputs(lambda images: {
            name: value.numpy() for name, value in loaded(images=tf.constant(images)).items()}, images)
        constant = tf.constant(one)
        results["latency_ms"]["saved_model"] = _median_ms(lambda: loaded(images=constant), runs)
        for form, path in request["files"].items():
            run = OnnxRunner(path) if form == "onnx" else Runner(path, interpreter)
            outputs[form] = _image_outputs(run, images)
            results["latency_ms"][form] = _median_ms(lambda: run(images=one), runs)
    else:
        tokens, hidden_size = inputs["tokens"].astype(np.int32), int(request["hidden_size"])
        step = tokens[:1, :1]
        zeros = np.zeros((1, hidden_size), np.float32)
        loaded = tf.saved_model.load(request["saved_model"]).signatures["serving_default"]
        outputs["saved_model"] = _language_outputs(lambda **arrays: {
            name: value.numpy() for name, value in loaded(**{k: tf.constant(v) for k, v in arrays.items()}).items()},
            tokens, hidden_size, batch_at_once=True)
        arguments = {"tokens": tf.constant(step), "hidden": tf.constant(zeros)}
        results["latency_ms"]["saved_model"] = _median_ms(lambda: loaded(**arguments), runs)
        for form, path in request["files"].items():
            run = Runner(path, interpreter)
            outputs[form] = _language_outputs(run, tokens, hidden_size)
            results["latency_ms"][form] = _median_ms(lambda: run(tokens=step, hidden=zeros), runs)
    np.savez(request["outputs"], **outputs)
    with open(request["results"], "w", encoding="utf-8") as handle:
        json.dump(results, handle)


def request_path(argument):
    """The request file: ``argument``, or for ``-`` the line the caller writes to standard input once the
    process has started (``deploy.FreshProcess``); empty if it closed without one."""
    return sys.stdin.readline().strip() if argument == "-" else argument


if __name__ == "__main__":
    if sys.argv[1] == "check":
        sys.modules.setdefault("keras", None)  # see check()
    import tensorflow  # noqa: F401  # before the request: the caller may have started this process early
    path = request_path(sys.argv[2])
    if path:
        with open(path, encoding="utf-8") as request_file:
            {"convert": convert, "check": check}[sys.argv[1]](json.load(request_file))
