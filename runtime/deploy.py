"""TensorFlow Lite and ONNX files of a derived network, verified, and what the network costs to run.

``write_tflite`` converts a SavedModel to the requested TFLite formats and
``write_onnx`` to ONNX (tf2onnx); ``check_exported`` runs them all and the
SavedModel on held-out data; each works in a fresh Python process
(``litert_worker.py``, tf2onnx's command). ``multiply_adds`` counts a
network's multiply-accumulates from its traced graph. The kinds' ``export``
puts these together into the report ``export/report.json`` holds.
"""

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

from keras_darts.spec import ExportVerificationError

TFLITE_FILES = {"tflite": "model.tflite", "tflite_dynamic": "model_dynamic.tflite",
                "tflite_int8": "model_int8.tflite"}
ONNX_FILE = "model.onnx"
# tf2onnx's opset: ONNX Runtime 1.20 and later run it, and every op of the DARTS set has a kernel in it.
ONNX_OPSET = 17
REPORT = "report.json"
# Largest |difference| of a float32 TFLite model's outputs from Keras' (probabilities or log-probabilities).
FLOAT_TOLERANCE = 1e-4
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "litert_worker.py")


def tflite_formats(formats):
    return [form for form in formats if form in TFLITE_FILES]


def converted_formats(formats):
    """The formats converted from the SavedModel (TFLite and ONNX): those the data must be loaded for."""
    return [form for form in formats if form in TFLITE_FILES or form == "onnx"]


def check_requirements(formats, source):
    """Raise ``SpecError`` naming ``source``'s ``$.export.formats`` unless ``onnx``'s packages are installed.

    Called before a search starts, so that a missing extra is found before hours of work.
    """
    import importlib.util

    from keras_darts.spec import SpecError

    if "onnx" in formats:
        missing = [name for name in ("tf2onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise SpecError.single(source, "$.export.formats", f"onnx needs {' and '.join(missing)}, which {verb} "
                                   "not installed; pip install 'keras-darts[onnx]'")


def write_onnx(saved_model, folder):
    """Convert the SavedModel's serving signature to ONNX with tf2onnx in a fresh process; return the path."""
    path = os.path.join(folder, ONNX_FILE)
    done = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", saved_model, "--signature_def",
                           "serving_default", "--opset", str(ONNX_OPSET), "--output", path + ".part"],
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0 or not os.path.exists(path + ".part"):
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise ExportVerificationError.single(folder, ONNX_FILE, "converting it with tf2onnx failed: "
                                             + (lines[-1] if lines else "(no output)"))
    os.replace(path + ".part", path)
    return path


class FreshProcess:
    """``python arguments... -``: a fresh Python process, started at once and handed its request later.

    The script (``litert_worker.py``, ``latency_worker``) imports what it
    needs, then reads its request file's path from its standard input; the
    path ``-`` on its command line says so. Started before the caller writes
    the files it is to check, the process imports TensorFlow (3-4 s on a
    2-core CPU) beside that work instead of after it. Closed without a
    request, it is stopped, having done nothing.
    """

    def __init__(self, arguments):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.process = subprocess.Popen([sys.executable, *arguments, "-"], env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, request):
        """Hand ``request`` over (as a temporary JSON file) and wait: ``None``, or why it failed (its last line)."""
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "request.json")
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(request, handle)
            # A process that ended before reading (a failed start) is fine here: communicate ignores the broken pipe.
            _, stderr = self.process.communicate(path + "\n")
        if self.process.returncode == 0:
            return None
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else "(no output)"
        if self.process.returncode < 0:
            reason = f"the process was killed by signal {-self.process.returncode} ({reason})"
        return reason

    def close(self):
        if self.process.returncode is None:
            self.process.kill()
            self.process.communicate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fresh_process_failure(arguments, request):
    """Run ``python arguments...`` on ``request`` in a fresh process; ``None``, or why it failed (its last line)."""
    with FreshProcess(arguments) as process:
        return process.run(request)


@contextlib.contextmanager
def started_workers(formats):
    """The fresh processes ``verified_formats`` runs for ``formats``, started now (``FreshProcess``), closed after."""
    with contextlib.ExitStack() as stack:
        modes = ["convert", "check"] if tflite_formats(formats) else ["check"]
        yield {mode: stack.enter_context(FreshProcess([_WORKER, mode])) for mode in modes}


def _run_worker(mode, request, blame, workers=None):
    """Run ``litert_worker.py mode`` on ``request`` (in ``workers[mode]`` if given, else started now); a failure
    names ``blame`` (a file) with the worker's last line."""
    if workers and mode in workers:
        reason = workers[mode].run(request)
    else:
        reason = fresh_process_failure([_WORKER, mode], request)
    if reason is not None:
        action = "converting" if mode == "convert" else "running"
        raise ExportVerificationError.single(os.path.dirname(blame), os.path.basename(blame),
                                             f"{action} it in a fresh process failed: {reason}")


def write_tflite(saved_model, formats, folder, calibration=None, workers=None):
    """Convert the SavedModel at ``saved_model`` to each TFLite format in ``formats``; return {format: path}.

    ``calibration`` ({input name: array of examples}) calibrates ``tflite_int8``; ``workers``: see
    ``started_workers``.
    """
    files = {form: os.path.join(folder, TFLITE_FILES[form]) for form in tflite_formats(formats)}
    if not files:
        return {}
    with tempfile.TemporaryDirectory() as scratch:
        request = {"saved_model": saved_model, "formats": files, "calibration": None}
        if "tflite_int8" in files:
            request["calibration"] = os.path.join(scratch, "calibration.npz")
            np.savez(request["calibration"], **calibration)
        _run_worker("convert", request, next(iter(files.values())), workers)
    return files


def check_exported(kind, saved_model, files, inputs, latency_runs, hidden_size=None, workers=None):
    """Run the SavedModel and every TFLite or ONNX file, and time them, in a fresh process.

    ``kind``: ``image`` (``inputs["images"]``, outputs: probabilities) or
    ``language`` (``inputs["tokens"]``, one sequence per row, run in pieces
    carrying the state; outputs: log-probabilities). Returns ({format:
    outputs}, {"interpreter": ..., "latency_ms": {format: median ms}}) with
    ``saved_model`` among the formats, the latency that of one example (one
    token) per call. ``workers``: see ``started_workers``.
    """
    with tempfile.TemporaryDirectory() as scratch:
        request = {"kind": kind, "saved_model": saved_model, "files": files, "latency_runs": latency_runs,
                   "hidden_size": hidden_size, "inputs": os.path.join(scratch, "inputs.npz"),
                   "outputs": os.path.join(scratch, "outputs.npz"), "results": os.path.join(scratch, "results.json")}
        np.savez(request["inputs"], **inputs)
        _run_worker("check", request, next(iter(files.values()), saved_model), workers)
        with np.load(request["outputs"]) as outputs:
            outputs = {form: outputs[form] for form in ("saved_model", *files)}
        with open(request["results"], encoding="utf-8") as handle:
            return outputs, json.load(handle)


def check_float_difference(path, actual, expected, tolerance=FLOAT_TOLERANCE):
    """The largest |actual - expected|; raises ``ExportVerificationError`` naming ``path`` above ``tolerance``."""
    difference = float(np.max(np.abs(actual - expected)))
    if not difference <= tolerance:
        raise ExportVerificationError.single(os.path.dirname(path), os.path.basename(path),
                                             f"differs from the Keras model by {difference} "
                                             f"(expected at most {tolerance})")
    return difference


def file_bytes(path):
    """The size of a file, or of every file under a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def machine():
    """Where latencies were measured."""
    import tensorflow as tf

    return {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "system": platform.platform(), "tensorflow": tf.__version__}


# -- multiply-adds ---------------------------------------------------------------------

_CONVOLUTIONS = ("Conv2D", "DepthwiseConv2dNative")
_FUNCTION_ATTRIBUTES = {"While": ("body",), "StatelessWhile": ("body",), "PartitionedCall": ("f",),
                        "StatefulPartitionedCall": ("f",)}


def graph_multiply_adds(graph):
    """Multiply-accumulates of one run of ``graph`` (static shapes), counted over its convolutions and matmuls.

    A convolution costs, per output element, its kernel's height x width x
    input channels (one for a depthwise kernel); a matmul (batch, n) x (n, m)
    costs batch x n x m. A dilated convolution is counted at its own output
    size, as written, not at the padded size TensorFlow may compute it at.
    The body of a loop (a recurrent cell over a sequence) and of a called
    function counts once: trace a recurrent model on one time step.
    """
    total = 0
    for op in graph.get_operations():
        for attribute in _FUNCTION_ATTRIBUTES.get(op.type, ()):
            total += graph_multiply_adds(graph._get_function(op.get_attr(attribute).name).graph)
        if op.type in _CONVOLUTIONS:
            kernel = op.inputs[1].shape
            per_output = kernel[0] * kernel[1] * (kernel[2] if op.type == "Conv2D" else 1)
            output = op.outputs[0].shape
            if op.inputs[0].op.type == "SpaceToBatchND":  # a dilated convolution: count its real output
                output = _dilated_output_shape(op)
            total += int(np.prod(output)) * per_output
        elif op.type in ("MatMul", "BatchMatMulV2"):
            a, b = op.inputs[0].shape, op.inputs[1].shape
            transpose_b = op.get_attr("transpose_b") if op.type == "MatMul" else op.get_attr("adj_y")
            total += int(np.prod(a)) * int(b[0] if transpose_b else b[-1])
    return total


def _dilated_output_shape(op):
    """The output shape after the BatchToSpaceND (and crop) that follows a space-to-batch convolution."""
    for consumer in op.outputs[0].consumers():
        if consumer.type == "BatchToSpaceND":
            return consumer.outputs[0].shape
    return op.outputs[0].shape


def multiply_adds(call, input_specs):
    """Multiply-accumulates of ``call(*inputs)`` on inputs of ``input_specs`` (``tf.TensorSpec`` with static shapes)."""
    import tensorflow as tf

    return graph_multiply_adds(tf.function(call, autograph=False).get_concrete_function(*input_specs).graph)


def report_lines(report):
    """What an export report says, a line per file."""
    network = report["network"]
    lines = [f"network: {network['parameters']:,} parameters, {network['multiply_adds']:,} multiply-adds per "
             f"{network['per']}"]
    reference = report.get("keras")
    if reference:
        lines.append(f"keras model: {reference['metric']} {reference['value']:.4f} on {report['test_examples']} "
                     f"test examples")
    for form, entry in report["formats"].items():
        parts = [f"{entry['bytes'] / 1024:,.0f} KiB"]
        if "value" in entry:
            parts.append(f"{entry['metric']} {entry['value']:.4f} ({entry['change']:+.4f})")
        if "max_difference" in entry:
            parts.append(f"max |difference| from Keras {entry['max_difference']:.1e}")
        if "latency_ms" in entry:
            parts.append(f"{entry['latency_ms']:.3g} ms per {network['per']}")
        lines.append(f"{form}: {entry['path']} ({', '.join(parts)})")
    if network.get("latency_table_ms") is not None:
        measured = report["formats"].get("tflite", {}).get("latency_ms")
        error = "" if measured is None else f", {network['latency_table_ms'] / measured - 1:+.0%} from tflite's"
        lines.append(f"latency table: {network['latency_table_ms']:.3g} ms for this network (the sum of its "
                     f"blocks' entries{error})")
    return lines


def verified_formats(config, folder, saved_model, conversion_source, kind, inputs, expected, score=None,
                     calibration=None, hidden_size=None, saved_model_tolerance=1e-5, workers=None):
    """Convert to the TFLite formats ``config.formats`` asks for, run everything in a fresh process, compare.

    ``expected``: the Keras model's outputs on ``inputs``. The SavedModel and
    the float32 TFLite file must agree with them within their tolerance
    (``ExportVerificationError`` otherwise); the quantised files are reported
    by their largest difference and by ``score(outputs)`` (a dict of figures).
    Returns the report's entry per requested format and the worker's results. ``workers``: the processes
    ``started_workers(config.formats)`` started, or ``None`` to start them here.
    """
    files = write_tflite(conversion_source, config.formats, folder, calibration, workers)
    if "onnx" in config.formats:
        files["onnx"] = write_onnx(saved_model, folder)
    outputs, results = check_exported(kind, saved_model, files, inputs, config.latency_runs, hidden_size, workers)
    tolerances = {"saved_model": saved_model_tolerance, "tflite": FLOAT_TOLERANCE, "onnx": FLOAT_TOLERANCE}
    entries = {}
    for form in config.formats:
        path = saved_model if form == "saved_model" else files[form]
        checked = os.path.join(path, "saved_model.pb") if form == "saved_model" else path
        entry = {"path": path, "bytes": file_bytes(path), "latency_ms": results["latency_ms"][form]}
        if form in tolerances:
            entry["max_difference"] = check_float_difference(checked, outputs[form], expected, tolerances[form])
        else:
            entry["max_difference"] = float(np.max(np.abs(outputs[form] - expected)))
        if score is not None:
            entry.update(score(outputs[form]))
        entries[form] = entry
    if "saved_model" not in entries:  # the SavedModel the files came from is checked all the same
        check_float_difference(os.path.join(saved_model, "saved_model.pb"), outputs["saved_model"], expected,
                               saved_model_tolerance)
    return entries, results


def report(network, entries, results, config, keras=None, test_examples=0):
    """The document ``export/report.json`` holds."""
    return {"network": network, "keras": keras, "test_examples": test_examples, "formats": entries,
            "latency": {"examples_per_call": 1, "statistic": "median", "runs": config.latency_runs,
                        "interpreter": results["interpreter"], "machine": machine()}}
