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

if __name__ == "__main__":  # the measuring process: TensorFlow starts as in the CLI (see runtime.startup)
    from keras_darts.runtime.startup import import_tensorflow_quietly

    import_tensorflow_quietly(without_keras_extras=True)
import tensorflow as tf  # noqa: E402

from .determinism import configure_kernel_threads  # noqa: E402
from .footprint import format_bytes, static_estimate  # noqa: E402
from .kinds import kind_of  # noqa: E402


def measure(spec, order, mode, steps, context):
    """Runs in the child process: first-call and median seconds, peak memory of one order."""
    configure_kernel_threads(spec)  # as the search will run it
    kind = kind_of(spec)
    bilevel = kind.build_search(spec, **context)
    batch = kind.synthetic_batch(spec, bilevel)
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


def estimate(spec, steps=3, orders=("first", "second"), context=None):
    """Static counts here, then each order measured in a fresh process.

    ``context`` is what the kind needs beyond the spec (``kind.estimate_context(spec)`` by default).
    """
    kind = kind_of(spec)
    context = kind.estimate_context(spec) if context is None else context
    bilevel = kind.build_search(spec, **context)
    report = {**static_estimate(spec, bilevel, kind), "batch_size": spec.data.batch_size, "orders": {}}
    document = json.dumps({"spec": spec.document, "source": spec.source, "context": context})
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
    print(json.dumps(measure(spec, order, mode, steps, payload["context"])))


if __name__ == "__main__":
    _child()
