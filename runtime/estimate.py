"""What a search will cost, before it starts: parameters, activations, peak memory and time per iteration.

* Parameters and alphas: counted on the compiled supernet.
* Activation memory: the bytes of every floating-point tensor one forward
  pass of the supernet produces at the spec's batch size, read off the traced
  graph (for a recurrent cell: one time step's graph times ``bptt``, plus the
  embedding and decoder). Back-propagation keeps most of them alive, so this
  is what grows with the batch.
* Peak memory and time per iteration: measured, not modelled. A fresh
  process builds the search at the spec's sizes, runs one iteration (tracing
  and graph optimisation, reported as the first call) and then ``steps``
  timed iterations of each order on synthetic data, and reports its peak
  resident memory (on a GPU, TensorFlow's device-memory high-water mark
  besides). This is the figure to compare with the machine's memory.

``keras-darts estimate spec.yaml`` prints them; a search logs the parameter
and activation figures when it starts.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf

SKIPPED_OPS = {"Const", "ReadVariableOp", "Placeholder", "VarHandleOp", "Identity", "NoOp", "Shape", "Reshape"}


def graph_float_bytes(graph):
    """Bytes of the statically shaped floating-point tensors produced by a graph's computing ops."""
    total = 0
    for op in graph.get_operations():
        if op.type in SKIPPED_OPS:
            continue
        for tensor in op.outputs:
            if tensor.dtype.is_floating and tensor.shape.is_fully_defined():
                total += tensor.shape.num_elements() * tensor.dtype.size
    return total


def build_for_estimate(spec, vocabulary_size=None):
    """The search's Bilevel, built as a search would build it."""
    if spec.search_space.kind == "recurrent_cell":
        from .language_search import build_language_search

        return build_language_search(spec, vocabulary_size)
    from .search_loop import build_search

    return build_search(spec)


def synthetic_batch(spec, bilevel, seed=0):
    rng = np.random.default_rng(seed)
    batch = spec.data.batch_size
    if spec.search_space.kind == "recurrent_cell":
        model = bilevel.model
        tokens = rng.integers(0, model.vocabulary_size, (batch, spec.data.bptt + 1))
        return (tf.constant(tokens[:, :-1], tf.int32), tf.constant(tokens[:, 1:], tf.int32),
                tf.zeros((batch, model.hidden_size)), tf.constant([0, 0], tf.int32))
    shape = spec.search_space.network.input_shape
    classes = spec.search_space.network.num_classes
    return (tf.constant(rng.normal(size=(batch, *shape)), tf.float32),
            tf.constant(rng.integers(0, classes, batch), tf.int32))


def activation_bytes(spec, bilevel):
    """Floating-point bytes one forward pass produces at the spec's batch size."""
    model = bilevel.model
    batch = synthetic_batch(spec, bilevel)
    if spec.search_space.kind != "recurrent_cell":
        forward = tf.function(lambda x: model(x, training=True))
        return graph_float_bytes(forward.get_concrete_function(tf.TensorSpec(batch[0].shape, tf.float32)).graph)
    cell = model.cell
    size = spec.data.batch_size
    step = tf.function(lambda x, h: cell.step(x, h, cell.kernels(), model.probabilities(), {}))
    per_step = graph_float_bytes(step.get_concrete_function(
        tf.TensorSpec((size, model.embedding_size)), tf.TensorSpec((size, model.hidden_size))).graph)
    # Embedded inputs, the outputs, and the logits over the vocabulary.
    around = 4 * size * spec.data.bptt * (model.embedding_size + model.hidden_size + 2 * model.vocabulary_size)
    return per_step * spec.data.bptt + around


def static_estimate(spec, bilevel):
    """Counts that need no timing: weights, alphas and activation bytes."""
    return {
        "weights": int(sum(np.prod(v.shape) for v in bilevel.weight_vars)),
        "alphas": int(sum(np.prod(v.shape) for v in bilevel.arch_vars)),
        "activation_bytes": int(activation_bytes(spec, bilevel)),
        "recompute_cells": bool(getattr(bilevel.model, "recompute_cells", False)),
    }


def measure(spec, order, mode, steps, vocabulary_size=None):
    """Runs in the child process: first-call and median seconds, peak memory of one order."""
    if order == "second":
        from .search_loop import serialize_kernels_if_needed

        serialize_kernels_if_needed(spec)  # as the search will run it
    bilevel = build_for_estimate(spec, vocabulary_size)
    batch = synthetic_batch(spec, bilevel)
    step = bilevel.compiled_iteration(order, mode)
    learning_rate = tf.constant(spec.search.weights_optimizer.learning_rate, tf.float32)
    arch_lr = tf.constant(spec.search.arch_optimizer.learning_rate, tf.float32)

    def timed():
        started = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), step(batch, batch, learning_rate, arch_lr))
        return time.perf_counter() - started

    first = timed()
    times = [timed() for _ in range(steps)]
    result = {"first_call_seconds": first, "seconds_per_iteration": statistics.median(times),
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        result["peak_device_bytes"] = tf.config.experimental.get_memory_info(gpus[0].name)["peak"]
    return result


def estimate(spec, steps=3, orders=("first", "second"), vocabulary_size=None):
    """Static counts here, then each order measured in a fresh process."""
    bilevel = build_for_estimate(spec, vocabulary_size)
    report = {**static_estimate(spec, bilevel), "batch_size": spec.data.batch_size, "orders": {}}
    document = json.dumps({"spec": spec.document, "source": spec.source, "vocabulary_size": vocabulary_size})
    for order in orders:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        done = subprocess.run(
            [sys.executable, "-m", "keras_darts.runtime.estimate", order, spec.search.second_order_mode, str(steps)],
            input=document, capture_output=True, text=True, env=env, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"measuring the {order}-order iteration failed: {done.stderr.strip()[-1000:]}")
        report["orders"][order] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def format_bytes(count):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def report_lines(report):
    lines = [
        f"parameters: {report['weights']:,} weights, {report['alphas']:,} architecture parameters",
        f"activations: {format_bytes(report['activation_bytes'])} per forward pass at batch {report['batch_size']}"
        + ("; cells run again in the backward pass, so only each cell's inputs are kept, and one cell's "
           "activations at a time"
           if report.get("recompute_cells") else ""),
    ]
    for order, measured in report["orders"].items():
        line = (f"{order} order: {measured['seconds_per_iteration']:.3f} s per iteration (first call, tracing "
                f"included: {measured['first_call_seconds']:.1f} s), peak memory "
                f"{format_bytes(measured['peak_rss_bytes'])}")
        if "peak_device_bytes" in measured:
            line += f", device peak {format_bytes(measured['peak_device_bytes'])}"
        lines.append(line)
    return lines


def _child():
    from keras_darts.spec import load_spec
    from keras_darts.spec.plugins import import_plugins

    order, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    payload = json.loads(sys.stdin.read())
    import_plugins(payload["spec"].get("plugins"), payload["source"])  # found beside the spec file, as there
    spec = load_spec(payload["spec"])
    print(json.dumps(measure(spec, order, mode, steps, payload["vocabulary_size"])))


if __name__ == "__main__":
    _child()
