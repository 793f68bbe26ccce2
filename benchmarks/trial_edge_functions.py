"""A trial, not the search's build: one traced function per kind of edge, called from every edge of that kind.

A search's passes trace every mixed op of the supernet on its own (SMALL: 70
per pass), although most of them are alike: the same ops, channels, stride
and input shape. Here ``MixedOp.call`` is replaced, in this process only, by a
call of one ``tf.function`` per kind of edge, traced once on the first edge of
its kind with that edge's weights given as arguments (a ``StatelessScope``
inside maps them to the first edge's variables, so every edge of the kind
computes with its own weights). Each build runs in a fresh process, one after
the other, and the script prints the trace, the first call and each timed
iteration of a SMALL second-order (finite-difference) step built for its
batch, as ``bench_search.py`` times them:

    python benchmarks/trial_edge_functions.py                  # every build
    python benchmarks/trial_edge_functions.py --builds flat per_kind

Builds: ``flat`` (the search's own), ``per_kind`` (the edge functions as
nested calls, the graph optimiser off as a short CPU search runs),
``per_kind_inlining_config`` (the same, the passes' calls asking the runtime
to inline function calls: ``do_function_inlining`` in their config), and
``per_kind_grappler_inlining`` / ``flat_grappler_inlining`` (the graph
optimiser on with only its function optimiser, which inlines calls, and its
pruning).
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

BUILDS = ["flat", "per_kind", "per_kind_inlining_config", "per_kind_grappler_inlining", "flat_grappler_inlining"]


def edge_functions():
    """``MixedOp.call`` through one traced function per kind of edge; returns [edge calls, kinds]."""
    import keras
    import tensorflow as tf
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    from keras_darts.compiler import cells

    original = cells.MixedOp.call
    functions = {}
    counts = [0, 0]

    def call(self, x, weights, training=None):
        scope = get_stateless_scope()
        values = [scope.get_current_value(v) for v in self.variables] if scope is not None else [None]
        if tf.executing_eagerly() or any(v is None for v in values):
            return original(self, x, weights, training)
        config = self.get_config()
        config.pop("name")
        key = (repr(sorted(config.items())), self.stage, self.kept, tuple(x.shape), x.dtype.name,
               weights[0].dtype.name, len(weights), bool(training), self.compute_dtype,
               tuple((tuple(v.shape), v.dtype) for v in self.variables))
        counts[0] += 1
        if key not in functions:
            counts[1] += 1
            first = self

            def body(x, weights, values):
                with keras.StatelessScope(list(zip(first.variables, values))):
                    return original(first, x, weights, training)

            functions[key] = tf.function(body, autograph=False)
        return functions[key](x, list(weights), values)

    cells.MixedOp.call = call
    return counts


def inlining_config():
    """The passes' calls carry ``do_function_inlining`` in their config (read by the runtime's lowering pass)."""
    import tensorflow as tf
    from tensorflow.core.framework import attr_value_pb2
    from tensorflow.core.protobuf import config_pb2

    from keras_darts.runtime import graph_build

    create_op = tf.Graph.create_op

    def marked(graph, op_type, inputs, *rest, **options):
        if op_type in graph_build._CALL_OPS and "config_proto" in options.get("attrs", {}):
            config = config_pb2.ConfigProto()
            config.ParseFromString(options["attrs"]["config_proto"].s)
            config.graph_options.optimizer_options.do_function_inlining = True
            options["attrs"] = {**options["attrs"],
                                "config_proto": attr_value_pb2.AttrValue(s=config.SerializeToString())}
        return create_op(graph, op_type, inputs, *rest, **options)

    tf.Graph.create_op = marked


def grappler_inlining_only():
    """The step's "graph optimiser off" becomes: on, with only function inlining and pruning."""
    import tensorflow as tf

    from keras_darts.runtime import graph_build

    @contextlib.contextmanager
    def inlining_only():
        previous = tf.config.optimizer.get_experimental_options()
        tf.config.optimizer.set_experimental_options({
            "disable_meta_optimizer": False, "function_optimization": True, "disable_model_pruning": False,
            **{name: False for name in (
                "layout_optimizer", "constant_folding", "shape_optimization", "remapping",
                "arithmetic_optimization", "dependency_optimization", "loop_optimization", "debug_stripper",
                "scoped_allocator_optimization", "pin_to_host_optimization", "implementation_selector",
                "auto_mixed_precision")}})
        try:
            yield
        finally:
            tf.config.optimizer.set_experimental_options(previous)

    graph_build.grappler_off = inlining_only


def measure(build, iterations):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tensorflow as tf

    from bench_search import CONFIGS, conv_spec
    from keras_darts.runtime.search_loop import build_search

    counts = edge_functions() if build.startswith("per_kind") else None
    if build == "per_kind_inlining_config":
        inlining_config()
    if build.endswith("grappler_inlining"):
        grappler_inlining_only()
    config = CONFIGS["SMALL"]
    batch = config["batch"]
    bilevel = build_search(conv_spec(config, search={"order": "second", "graph_optimizer": "off"}))
    bilevel.fix_batch_size(batch)
    step = bilevel.compiled_iteration("second", "finite_difference")
    generator = tf.random.Generator.from_seed(0)
    pool = [(generator.normal((batch, 32, 32, 3)), generator.uniform((batch,), 0, 10, tf.int32)) for _ in range(4)]
    lr, arch_lr = tf.constant(0.025), tf.constant(3e-4)

    def timed(index):
        started = time.perf_counter()
        float(step(pool[index % 2 * 2], pool[index % 2 * 2 + 1], lr, arch_lr)[0]["arch_loss"])
        return time.perf_counter() - started

    first = timed(0)
    timed(1)  # warm-up
    times = [timed(i) for i in range(iterations)]
    library = step.get_concrete_function().graph.as_graph_def().library.function
    return {"build": build, "trace_seconds": step.trace_seconds, "first_call_seconds": first, "times": times,
            "functions": len(library), "function_nodes": sum(len(f.node_def) for f in library),
            "edge_calls_traced": counts[0] if counts else None, "edge_kinds": counts[1] if counts else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", nargs="+", default=BUILDS, choices=BUILDS)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.iterations)))
        return
    print(f"{'build':28s} {'trace s':>7s} {'first call s':>12s} {'functions':>9s} {'their nodes':>11s} "
          f"{'edges/kinds':>11s}  s/iter (each timed iteration)")
    for build in args.builds:
        done = subprocess.run([sys.executable, __file__, "--child", build, "--iterations", str(args.iterations)],
                              capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if done.returncode != 0:
            print(f"{build}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        edges = f"{row['edge_calls_traced']}/{row['edge_kinds']}" if row["edge_kinds"] else "-"
        print(f"{build:28s} {row['trace_seconds']:7.1f} {row['first_call_seconds']:12.1f} {row['functions']:9d} "
              f"{row['function_nodes']:11d} {edges:>11s}  " + ", ".join(f"{t:.3f}" for t in row["times"]),
              flush=True)


if __name__ == "__main__":
    main()
