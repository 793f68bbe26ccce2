"""The step functions' graph-optimisation setting: what it switches, what it leaves alone, what it reports."""

import contextlib
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

import keras_darts as kd
from keras_darts.runtime import graph_build
from keras_darts.runtime.graph_build import (NestedFunction, StepFunction, accelerated, built_as_the_process_runs,
                                             grappler_off, meta_optimizer_disabled, resolve_graph_optimizer)
from keras_darts.runtime.search_loop import build_search
from tests.conftest import tiny_spec_document
from tests.runtime.test_bilevel import ETA, batches, make_bilevel


def test_grappler_off_switches_the_meta_optimizer_off_inside_and_restores_the_previous_setting():
    assert meta_optimizer_disabled() is False
    with grappler_off():
        assert meta_optimizer_disabled() is True
        with grappler_off():  # nested: the inner exit restores the outer's setting
            pass
        assert meta_optimizer_disabled() is True
    assert meta_optimizer_disabled() is False
    with pytest.raises(RuntimeError):
        with grappler_off():
            raise RuntimeError("a failing step")
    assert meta_optimizer_disabled() is False


def test_a_step_function_calls_its_function_under_its_setting_and_leaves_the_process_setting_alone():
    seen = []

    @tf.function(input_signature=[tf.TensorSpec((), tf.float32)])
    def double(x):
        return 2.0 * x

    def watching(x):
        seen.append(meta_optimizer_disabled())
        return double(x)

    watching.get_concrete_function = double.get_concrete_function
    for grappler, expected in ((False, True), (True, False)):
        seen.clear()
        step = StepFunction(watching, grappler=grappler)
        assert float(step(tf.constant(3.0))) == 6.0
        step(tf.constant(4.0))
        assert seen == [expected, expected]
        assert meta_optimizer_disabled() is False


# The ops by which a traced graph calls a function of its own.
CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall")


def nested_calls_optimised(graph):
    """For each call of a nested function in ``graph``: whether the runtime optimises its body with Grappler
    (the options the call carries, which it took from the context it was traced in)."""
    from tensorflow.core.protobuf import config_pb2

    return [not config_pb2.ConfigProto.FromString(op.get_attr("config_proto")).graph_options.rewrite_options
            .disable_meta_optimizer
            for op in graph.get_operations() if op.type in CALL_OPS]


def test_a_step_function_traces_its_nested_functions_under_the_setting_it_calls_them_with():
    # A nested function's call carries the options of its tracing, and its body (a search's passes,
    # most of a step's graph) is optimised with them: so the step is traced under its own setting.
    # (On: as the caller has it; off: off whatever the caller has.)
    inner = tf.function(lambda x: 2.0 * x, input_signature=[tf.TensorSpec((), tf.float32)], autograph=False,
                        experimental_attributes={"_noinline": True})
    for grappler, caller_off in ((False, False), (True, True), (False, True), (True, False)):
        outer = tf.function(lambda x: inner(inner(x) + 1.0), input_signature=[tf.TensorSpec((), tf.float32)],
                            autograph=False)
        step = StepFunction(outer, grappler=grappler)
        with grappler_off() if caller_off else contextlib.nullcontext():
            assert float(step(tf.constant(3.0))) == 14.0
        expected = grappler and not caller_off
        assert nested_calls_optimised(step.get_concrete_function().graph) == [expected, expected]
        assert meta_optimizer_disabled() is False


def call_ops(graph):
    """``(function name, whether TensorFlow's graph builder skipped its body's shape inference)`` per call op."""
    return [(op.get_attr("f").name, op.node_def.attr["_disable_call_shape_inference"].b)
            for op in graph.get_operations() if op.type in CALL_OPS]


def test_a_nested_function_call_skips_the_shape_inference_of_its_body_and_computes_the_same():
    def body(x, w):
        return tf.reduce_sum(tf.nn.relu(tf.matmul(x, w)) ** 2)

    signature = [tf.TensorSpec((3, 4), tf.float32), tf.TensorSpec((4, 2), tf.float32)]
    nested = NestedFunction(body, signature)
    plain = tf.function(body, input_signature=signature, autograph=False,
                        experimental_attributes={"_noinline": True})

    @tf.function(input_signature=signature, autograph=False)
    def outer(x, w):
        first = nested(x, w)
        with tf.GradientTape() as tape:  # a gradient through a marked call
            tape.watch(w)
            second = nested(x, 2.0 * w)
        after = plain(x, w)  # made after the nested calls: unmarked
        return first, second, tape.gradient(second, w), after

    x = tf.constant(np.linspace(-1.0, 1.0, 12).reshape(3, 4), tf.float32)
    w = tf.constant(np.linspace(-0.5, 1.5, 8).reshape(4, 2), tf.float32)
    first, second, gradient, after = outer(x, w)
    # d/dw sum(relu(x 2w)^2) = 2 x^T relu(x 2w) . 2 (the chain rule through 2w).
    expected_gradient = 4.0 * tf.matmul(x, tf.nn.relu(tf.matmul(x, 2.0 * w)), transpose_a=True)
    np.testing.assert_allclose(float(first), float(body(x, w)), rtol=1e-6)
    np.testing.assert_allclose(float(second), float(body(x, 2.0 * w)), rtol=1e-6)
    np.testing.assert_allclose(gradient.numpy(), expected_gradient.numpy(), rtol=1e-6)
    assert float(after) == float(first)
    graph = outer.get_concrete_function().graph
    calls = call_ops(graph)
    # In the order made: the nested function's call, the call of its forward function the tape asked
    # for, the plain function's call, and the backward function's call that tape.gradient made last.
    assert [name.split("_body")[0] for name, _ in calls] == [
        "__inference", "__forward", "__inference", "__inference___backward"]
    assert [marked for _, marked in calls] == [True, True, False, False]
    assert not getattr(graph.create_op, "marks_calls", False)  # the graph's own create_op is back
    assert float(nested(x, w)) == float(first)  # called eagerly, outside any trace


def test_by_default_the_optimiser_is_off_on_cpus_and_on_with_an_accelerator(monkeypatch):
    assert not tf.config.list_logical_devices("GPU")  # this machine
    assert StepFunction(lambda: None).grappler is False
    devices = {"GPU": ["/gpu:0"], "TPU": []}
    monkeypatch.setattr(graph_build.tf.config, "list_logical_devices", lambda kind: devices.get(kind, []))
    assert StepFunction(lambda: None).grappler is True


def test_an_iteration_computes_the_same_with_the_graph_optimiser_on_and_off(caplog):
    # The setting changes how the graph is built, not what it computes: one second-order
    # iteration from the same start moves every weight and alpha to the same values.
    (xt, yt), (xv, yv) = batches("float32", seed=3)
    lr, arch_lr = tf.constant(ETA, tf.float32), tf.constant(0.1, tf.float32)
    results = {}
    for grappler in (True, False):
        bilevel = make_bilevel(seed=3, arch_sgd=True)
        before = [v.numpy().copy() for v in bilevel.arch_vars + bilevel.weight_vars]
        step = bilevel.compiled_iteration("second", "finite_difference", grappler=grappler)
        with caplog.at_level(logging.INFO, logger="keras_darts.runtime.graph_build"):
            metrics, _, _ = step((xt, yt), (xv, yv), lr, arch_lr)
        after = [v.numpy() for v in bilevel.arch_vars + bilevel.weight_vars]
        assert sum(not np.array_equal(a, b) for a, b in zip(before, after)) > len(after) // 2
        results[grappler] = ({k: float(v) for k, v in metrics.items()}, after)
        assert step.trace_seconds > 0 and step.first_call_seconds > 0
        # Its passes (the forward and backward bodies) are optimised as the step is: 5 calls in second order.
        assert nested_calls_optimised(step.get_concrete_function().graph) == [grappler] * 5
        assert (f"search step built: traced in {step.trace_seconds:.1f} s; optimised and first run in "
                f"{step.first_call_seconds:.1f} s (graph optimiser {'on' if grappler else 'off'})") in caplog.text
    (metrics_on, on), (metrics_off, off) = results[True], results[False]
    assert metrics_on == pytest.approx(metrics_off, rel=1e-5)
    for a, b in zip(on, off):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_builds_short_convolutional_searches_on_cpus_without_the_optimiser(monkeypatch):
    short, long = graph_build.SHORT_SEARCH_ITERATIONS, graph_build.SHORT_SEARCH_ITERATIONS + 1
    assert resolve_graph_optimizer("auto", None, short) is False
    assert resolve_graph_optimizer("auto", None, long) is True
    assert resolve_graph_optimizer("auto", True, short) is True  # the builder's choice (recurrent) stands
    assert resolve_graph_optimizer("on", None, short) is True
    assert resolve_graph_optimizer("off", True, long) is False
    # Passes traced into the step (global batch norm on multi-worker or TPU replicas) keep it on.
    assert resolve_graph_optimizer("auto", None, short, passes_inlined=True) is True
    assert resolve_graph_optimizer("auto", None, long, passes_inlined=True) is True
    assert resolve_graph_optimizer("off", None, short, passes_inlined=True) is False
    monkeypatch.setattr(graph_build.tf.config, "list_logical_devices", lambda kind: ["/gpu:0"] if kind == "GPU" else [])
    assert resolve_graph_optimizer("auto", None, short) is True


def test_a_recurrent_search_keeps_the_optimiser_on(cyclic_corpus):
    from tests.runtime.test_language import make_language_bilevel

    assert make_language_bilevel(cyclic_corpus, grad_clip=0.25).grappler is True


def builds_logged(messages):
    """``{step name: [its build lines]}`` of the ``... built: traced in ...`` lines among ``messages``."""
    built = {}
    for message in messages:
        name, found, _ = message.partition(" built: traced in ")
        if found:
            built.setdefault(name, []).append(message)
    return built


def test_the_spec_setting_reaches_the_search_step_and_every_step_function_logs_its_build_once(caplog):
    from keras_darts.runtime.workflow import search

    document = tiny_spec_document()
    document["search"].update({"epochs": 2, "steps_per_epoch": 2, "order": "first", "graph_optimizer": "on"})
    document["retrain"]["enabled"] = False
    with caplog.at_level(logging.INFO, logger="keras_darts"):
        search(kd.load_spec(document))
    built = builds_logged(r.getMessage() for r in caplog.records)
    # Two epochs, each evaluated and its eigenvalue measured: each function built once, not per epoch.
    assert {name: len(lines) for name, lines in built.items()} == {"search step": 1, "evaluation step": 1,
                                                                  "eigenvalue pass": 1}
    assert built["search step"][0].endswith("(graph optimiser on)")  # the spec's setting
    # Evaluation runs as the process has it: on.
    assert built["evaluation step"][0].endswith("(graph optimiser on)")
    # The eigenvalue pass as the devices decide: off on CPUs, where Grappler's build of it is not reproducible.
    assert built["eigenvalue pass"][0].endswith(f"(graph optimiser {'on' if accelerated() else 'off'})")


def test_a_function_built_as_the_process_runs_reports_the_process_setting(caplog):
    @tf.function(input_signature=[tf.TensorSpec((), tf.float32)])
    def double(x):
        return 2.0 * x

    for off in (False, True):
        step = built_as_the_process_runs(double, f"step {off}")
        with caplog.at_level(logging.INFO, logger="keras_darts.runtime.graph_build"):
            with grappler_off() if off else contextlib.nullcontext():
                assert float(step(tf.constant(3.0))) == 6.0
        assert builds_logged(r.getMessage() for r in caplog.records)[f"step {off}"][0].endswith(
            f"(graph optimiser {'off' if off else 'on'})")


def test_the_eigenvalue_pass_gives_the_same_alpha_gradients_each_time_at_the_quickstarts_scale():
    # The eigenvalue's finite differences (radius 1e-3) divide differences between two passes by 2e-3, so
    # its pass must give the same values each time. Grappler's build of it on a CPU did not at this scale
    # (the tiny test supernets do not show it): three calls differed by about 2e-8 in 90% of the gradients'
    # entries, in each of three runs of this test, and the eigenvalues of three evaluations by up to 0.57.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = kd.load_spec(os.path.join(root, "examples", "quickstart.yaml"))
    bilevel = build_search(spec)
    size = spec.data.batch_size
    bilevel.fix_batch_size(size)  # as the search builds it
    generator = tf.random.Generator.from_seed(0)
    network = spec.search_space.network
    batch = (generator.normal((size, *network.input_shape)),
             generator.uniform((size,), 0, network.num_classes, tf.int32))
    weights, alphas = bilevel.current_weights(), bilevel.current_alphas()
    first, *others = [[g.numpy() for g in bilevel.eigenvalue_pass(weights, alphas, batch)[2]] for _ in range(3)]
    assert bilevel.eigenvalue_pass.grappler is accelerated()
    assert max(float(np.abs(g).max()) for g in first) > 1e-3  # gradients, not zeros
    for other in others:
        for a, b in zip(first, other):
            np.testing.assert_array_equal(a, b)
