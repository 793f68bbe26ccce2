"""A trial: where a search iteration's kernel time goes, per TensorFlow op type.

Builds a spec's search (second order by finite differences, its steps built
for its batch size and without the graph optimiser, as a short search on a
CPU builds them), runs warm iterations on random batches of the spec's input
shape, then records ``--iterations`` more with TensorFlow's profiler and
prints, per op type, the kernel seconds per iteration summed over the
runtime's threads, and the calls per iteration:

    python benchmarks/trial_kernel_profile.py examples/quickstart.yaml

``--shift strided_slice`` builds FactorizedReduce's one-pixel shift as
Keras' slicing (a ``StridedSlice``), as before ``compiler.ops.shifted``;
``--subsample strided_slice`` the stride-2 dilated convolutions' subsampling
likewise, as before ``compiler.ops.every`` took a ``Slice``.
``--threads`` sets TensorFlow's threads as ``compile-and-search`` does for
the spec (``auto``, the default) or leaves TensorFlow's own (``tensorflow``,
as the shift's profiles in ``benchmarks/README.md`` ran).
The profile is read from the profiler's XSpace file with TensorFlow's own
protocol buffer module (``tensorflow.tsl``, an internal path of the pinned
TensorFlow).
"""

import argparse
import collections
import glob
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--shift", choices=["slice", "strided_slice"], default="slice")
    parser.add_argument("--subsample", choices=["slice", "strided_slice"], default="slice")
    parser.add_argument("--threads", choices=["auto", "tensorflow"], default="auto")
    args = parser.parse_args()

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    import keras_darts as kd
    from keras_darts.compiler import ops as compiler_ops
    from keras_darts.runtime.determinism import configure_kernel_threads
    from keras_darts.runtime.search_loop import build_search

    if args.shift == "strided_slice":
        compiler_ops.shifted = lambda x: x[:, 1:, 1:, :]
    if args.subsample == "strided_slice":
        compiler_ops.every = lambda x, stride: x[:, ::stride, ::stride, :]
    tensorflows = ["distribute.threads.inter_op=0", "distribute.threads.intra_op=0"]
    spec = kd.load_spec(args.spec, overrides=tensorflows if args.threads == "tensorflow" else None)
    configure_kernel_threads(spec)  # before TensorFlow starts its runtime
    batch_size = spec.data.batch_size
    shape = tuple(spec.search_space.network.input_shape)
    classes = spec.search_space.network.num_classes
    bilevel = build_search(spec)
    bilevel.fix_batch_size(batch_size)
    step = bilevel.compiled_iteration("second", "finite_difference", False)
    generator = tf.random.Generator.from_seed(0)

    def batch():
        return generator.normal((batch_size, *shape)), generator.uniform((batch_size,), 0, classes, tf.int32)

    learning_rate, arch_learning_rate = tf.constant(0.025), tf.constant(3e-4)

    def iterate(count):
        started = time.perf_counter()
        for _ in range(count):
            tf.nest.map_structure(lambda t: t.numpy(), step(batch(), batch(), learning_rate, arch_learning_rate))
        return (time.perf_counter() - started) / count

    iterate(3)  # trace, build, warm
    print(f"{spec.name}: {iterate(args.iterations):.3f} s per iteration unprofiled")
    with tempfile.TemporaryDirectory() as folder:
        tf.profiler.experimental.start(folder)
        iterate(args.iterations)
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)[0], "rb") as handle:
            space.ParseFromString(handle.read())
    seconds, calls = collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):  # the runtime's threads, one event per kernel
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" not in name or "::" in name:  # the executor's own regions, not kernels
                    continue
                op_type = name.rsplit(":", 1)[1]
                seconds[op_type] += event.duration_ps / 1e12 / args.iterations
                calls[op_type] += 1 / args.iterations
    print(f"kernel seconds per iteration, summed over threads: {sum(seconds.values()):.3f}")
    for op_type, value in seconds.most_common(args.top):
        print(f"{value:8.3f} s {calls[op_type]:8.0f} calls  {op_type}")


if __name__ == "__main__":
    main()
