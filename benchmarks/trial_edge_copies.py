"""A trial, not the search's build: how much faster an edge is copied into a graph than traced.

``trial_edge_functions.py`` showed that calling one traced function per kind
of edge costs each iteration 1.6 times as much, because the calls stay calls.
The alternative is to copy a traced edge into each place it is used, so the
step's graph is as flat as the search's own. This script measures the two
sides of that: tracing ``--edges`` DARTS mixed edges (the eight DARTS ops,
``C`` channels, stride 1, their weighted sum, and its gradient with respect
to the input, the weights and every variable, given an upstream gradient) one
after another into one graph, as a pass body traces them, against tracing the
first edge once and copying its graph into another graph once per edge
(``tf.graph_util.import_graph_def``), each copy reading its own edge's
variables. It prints both times and their ratio:

    python benchmarks/trial_edge_copies.py --edges 70

What it leaves out: ``tf.GradientTape`` does not record copied ops, so a
search would need each copy wrapped in a custom gradient that copies the
traced gradient too, and exact second order would need that gradient's own
gradient the same way.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_darts.spec.operations import DARTS_CONV_OPERATIONS as OPERATIONS  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=70, help="edges to trace and to copy (SMALL: 70 per pass body)")
    parser.add_argument("--channels", type=int, default=8, help="C of every edge (SMALL's first cells: 8)")
    parser.add_argument("--size", type=int, default=32, help="height and width of the edge's input")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    import tensorflow as tf
    from tensorflow.python.framework import func_graph

    from keras_darts.compiler.ops import build_op

    shape = [args.batch, args.size, args.size, args.channels]

    def make_edge(k):
        ops = [build_op(name, args.channels, 1, False, f"edge{k}_{name}", search=True) for name in OPERATIONS]
        for op in ops:
            op(tf.zeros([1, *shape[1:]]), training=True)
        return ops

    def variables(ops):
        return [v for op in ops for v in op.variables]

    def edge(ops, x, weights, upstream):
        """The mixed op's output and its gradients (input, op weights, variables) for ``upstream``."""
        trainable = [v for op in ops for v in op.trainable_variables]
        with tf.GradientTape() as tape:
            tape.watch([x, weights])
            y = tf.add_n([weights[i] * op(x, training=True) for i, op in enumerate(ops)])
        gradients = tape.gradient(y, [x, weights, *trainable], output_gradients=upstream)
        return [y, *gradients]

    def inputs():
        return (tf.compat.v1.placeholder(tf.float32, shape, name="x"),
                tf.compat.v1.placeholder(tf.float32, [len(OPERATIONS)], name="weights"),
                tf.compat.v1.placeholder(tf.float32, shape, name="upstream"))

    edges = [make_edge(k) for k in range(args.edges)]

    traced_graph = func_graph.FuncGraph("traced")
    with traced_graph.as_default():
        x, weights, upstream = inputs()
        started = time.perf_counter()
        for ops in edges:
            edge(ops, x, weights, upstream)
        traced = time.perf_counter() - started
        traced_nodes = len(traced_graph.get_operations())

    # The first edge, traced once in a graph of its own; its variables enter as captured handles.
    one = func_graph.FuncGraph("one_edge")
    with one.as_default():
        outputs = edge(edges[0], *inputs())
    graph_def = one.as_graph_def()
    internal = {id(external): placeholder.name for external, placeholder in one.captures}
    first = variables(edges[0])
    if sorted(internal) != sorted(id(v.handle) for v in first):
        raise SystemExit("the traced edge captured something other than its own variables")

    copied_graph = func_graph.FuncGraph("copied")
    with copied_graph.as_default():
        x, weights, upstream = inputs()
        started = time.perf_counter()
        for k, ops in enumerate(edges):
            mapping = {"x:0": x, "weights:0": weights, "upstream:0": upstream}
            for source, own in zip(first, variables(ops)):  # the same ops in the same order
                mapping[internal[id(source.handle)]] = copied_graph.capture(own.handle)
            tf.graph_util.import_graph_def(graph_def, input_map=mapping, return_elements=[t.name for t in outputs],
                                           name=f"edge{k}")
        copied = time.perf_counter() - started
        copied_nodes = len(copied_graph.get_operations())

    print(f"one edge: {len(graph_def.node)} nodes, {len(internal)} variables")
    print(f"traced {args.edges} edges: {traced:.2f} s ({1000 * traced / args.edges:.0f} ms per edge), "
          f"{traced_nodes} nodes")
    print(f"copied {args.edges} edges: {copied:.2f} s ({1000 * copied / args.edges:.0f} ms per edge), "
          f"{copied_nodes} nodes")
    print(f"traced / copied: {traced / copied:.1f}")


if __name__ == "__main__":
    main()
