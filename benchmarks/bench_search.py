"""Time and memory of DARTS search iterations, measured in one run.

For each configuration (SMALL: C=8, 5 cells, batch 16; PAPER: C=16, 8 cells,
batch 64; both 32x32x3 inputs, 10 classes, the eight DARTS ops; RNN: the
recurrent cell with 8 nodes, 64 units, 16 streams, bptt 35, a vocabulary of
1,000) and each mode
(a plain forward+backward of the supernet, a first-order iteration, a
second-order iteration by finite differences and exactly), a fresh Python
process builds the supernet, runs warm-up iterations, then times iterations
on synthetic inputs, with the reference's protocol: a distinct training and
validation batch every iteration (16 pairs generated before the clock
starts, cycled), and in the RNN configuration each stream's hidden state
carried from one iteration to the next, with fresh dropout masks. It prints the median seconds per iteration, each mode's
ratio to the plain forward+backward of the same configuration, the first-call
time (tracing, graph optimisation, one run) with its tracing part, whether
TensorFlow's graph optimiser was on, and the process's peak resident memory;
it writes everything, with the machine, to JSON.

    python benchmarks/bench_search.py                     # SMALL, PAPER and RNN
    python benchmarks/bench_search.py --configs SMALL --iterations 5
    python benchmarks/bench_search.py --configs SMALL --modes first_order retrain_step --replicas 1 2
    python benchmarks/bench_search.py --configs SMALL --paired   # ratios to fwd+bwd timed alternately
    python benchmarks/bench_search.py --configs SMALL PAPER --modes first_order --methods gdas snas
    python benchmarks/bench_search.py --configs SMALL --grappler on off --paired-grappler   # graph optimiser
    python benchmarks/bench_search.py --configs SMALL --modes second_order_fd --replicas 2 --batch-norm global replica
    python benchmarks/bench_search.py --configs SMALL PAPER --precision float32 mixed_bfloat16   # 16-bit compute
    python benchmarks/bench_search.py --configs SMALL --modes second_order_fd --call-shape-inference skipped inferred
    python benchmarks/bench_search.py --configs SMALL --modes second_order_fd --optimizer-arithmetic stacked per_tensor
    python benchmarks/bench_search.py --configs SMALL --modes second_order_exact --batch-shape fixed open
    python benchmarks/bench_search.py --configs PAPER --modes second_order_fd --paired-batch-shape
    python benchmarks/bench_search.py --configs SMALL --modes second_order_fd --sum-gradient recorded custom_gradient
    python benchmarks/bench_search.py --configs SMALL --modes second_order_fd --replicas 2 --batch-norm replica \
        --replica-passes shared per_device

``--call-shape-inference inferred`` builds the steps as before the passes'
calls skipped TensorFlow's shape inference of their bodies
(``graph_build.NestedFunction``), to compare both builds in one run;
``--optimizer-arithmetic per_tensor`` builds the optimisers' arithmetic on
lists of weights one tensor at a time, as before it was stacked per shape
(``optimizers.elementwise``); ``--batch-shape open`` builds the search steps
for batches of any size, as before a search fixed their size
(``Bilevel.fix_batch_size``); ``--paired-batch-shape`` also builds the other
one in the same process and times the two alternately.

``--replicas`` runs the modes under MirroredStrategy on that many logical CPU
devices, at the same global batch, for the throughput per replica
(examples per second per replica); logical devices split this machine's
cores, so they show the cost of the replication, not a speed-up.

Run it alone: other TensorFlow processes on the same cores make the figures
worthless.
"""

import argparse
import functools
import importlib
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import typing
import time

from keras_darts.spec.model import METHODS

CONFIGS = {
    "SMALL": {"init_channels": 8, "layers": 5, "batch": 16},
    "PAPER": {"init_channels": 16, "layers": 8, "batch": 64},
    "RNN": {"hidden": 64, "batch": 16, "bptt": 35, "vocabulary": 1000},
}
MODES = ["forward_backward", "first_order", "second_order_fd", "second_order_exact"]
# Distinct (training, validation) batch pairs each configuration cycles through, one pair per iteration.
POOL = 16
# Spec options under ``search`` that the benchmark can switch on, and their flags.
OPTION_FLAGS = {"recompute_cells": "--recompute", "reuse_virtual_gradient": "--reuse-virtual-gradient"}
# retrain_step: one retraining step of DARTS_V2 at the configuration's size; darts_pt_measure: one batch of
# DARTS-PT's measurement (the supernet's validation forward with the op weights as inputs), which its
# selection runs over the whole validation split once per measurement.
EXTRA_MODES = ["retrain_step", "darts_pt_measure"]
# The PyTorch reference implementation's seconds per iteration, measured on 2026-11-27 on a 2-core
# x86_64 machine of this kind in separate processes (benchmarks/README.md, "Earlier measurements").
# Kept in the JSON for comparison; the printed table holds this run's figures only.
REFERENCE = {
    "SMALL": {"forward_backward": 1.0, "first_order": 2.0, "second_order_fd": 4.5},
    "PAPER": {"forward_backward": 9.9, "first_order": 21.2, "second_order_fd": 47.6},
    "RNN": {"first_order": 0.45, "second_order_fd": 1.0},
}


# FairDARTS' op set has no 'none' (its validator refuses one): the seven other DARTS ops.
METHOD_OPERATIONS = {"fair_darts": ["max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
                                    "dil_conv_3x3", "dil_conv_5x5"]}
FIRST_ORDER_ONLY = ("snas", "gdas", "drnas_stage_1", "drnas_stage_2")
# DrNAS' progressive search, each stage's iteration: ``--methods drnas_progressive`` measures both. The
# official K 6 then 4 divides neither config's 8 or 16 channels, so the benchmark runs K 4 then 2 with the
# official 4 ops kept per edge; stage 2 is entered as a search enters it (prune, widen) from the start.
PROGRESSIVE = {"drnas_stage_1": 0, "drnas_stage_2": 1}
PROGRESSIVE_OPTIONS = {"progressive": True, "stage_partial_channels": [4, 2], "stage_keep_ops": [4]}
# ``--grappler`` values and what ``compiled_iteration`` takes for them.
GRAPPLER_FLAGS = {"auto": None, "on": True, "off": False}
# --threads: distribute.threads' auto, as compile-and-search sets it, or TensorFlow's own threads.
THREADS = ("auto", "tensorflow")
GRAPPLER_NAMES = {None: "auto", True: "on", False: "off"}
# How the passes' calls were built: skipping TensorFlow's shape inference of their bodies, or not.
CALLS = {"skipped": "skip", "inferred": "infer"}
ARITHMETIC = {"stacked": "stack", "per_tensor": "each"}
BATCH_SHAPES = {"fixed": "fixed", "open": "open"}


class OpBuild(typing.NamedTuple):
    """How the package builds something (in ``compiler.ops`` by default), as the search does (``now``) or as
    before (``before``), for its flag."""

    now: str
    before: str
    short: dict  # each value's text in the table's column ``column``
    column: str
    attribute: str  # the function (or Class.attribute) of keras_darts.<module> that the build before replaces ...
    replacement: typing.Callable  # ... with replacement(tf)
    label: str  # the pairs' line
    help: str
    module: str = "compiler.ops"
    recurrent: bool = False  # builds the RNN configuration's steps (else the convolutional ones')


def custom_gradient_recorded(tf):
    """``compiler.ops.recorded`` as ``tf.custom_gradient`` records it in a traced function (the build before):
    the output and every input through one ``IdentityN``, every input's gradient built."""

    def recorded(name, inputs, forward, backward):
        @tf.custom_gradient
        def run(*args):
            return forward(), lambda upstream: backward(upstream, [True] * len(inputs))

        return run(*inputs)

    return recorded


def constants_per_op(tf):
    """``compiler.ops.graph_constant`` as before: every integer constant a node of its own (the BNs' float
    vectors were shared already)."""
    import numpy as np

    from keras_darts.compiler import ops as compiler_ops

    shared = compiler_ops.graph_constant
    return lambda value, dtype="float32": (shared(value, dtype) if dtype == "float32"
                                           else tf.constant(np.asarray(value, dtype)))


def tensorflows_batch_norm(tf):
    """``compiler.ops._search_batch_norm`` as before: the op alone, differentiated (twice, in exact mode) by
    TensorFlow's registered gradients."""
    from keras_darts.compiler.ops import BN_EPSILON

    return lambda x, scale, offset, empty: tuple(tf.raw_ops.FusedBatchNorm(
        x=x, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=BN_EPSILON, data_format="NHWC",
        is_training=True)[:3])


def tensorflows_convolution_gradient(tf):
    """``compiler.ops._convolution`` as before: the op alone, differentiated by TensorFlow's registered gradient."""
    return lambda op, x, kernel, strides, padding: getattr(tf.raw_ops, op)(
        input=x, filter=kernel, strides=[1, strides, strides, 1], padding=padding.upper())


# --<key> (underscores as dashes) takes one or both values, and every combination is measured; each build applies to
# the convolutional configurations or (``recurrent``) to the RNN one.
OP_BUILDS = {
    "fused_batch_norm": OpBuild(
        "first", "third", {"first": "bn1", "third": "bn3"}, "bn op", "fused_batch_norm",
        lambda tf: lambda dtype: tf.raw_ops.FusedBatchNormV3, "FusedBatchNorm / FusedBatchNormV3",
        "the fused op of float32 search BNs: first (FusedBatchNorm, as the search builds) or third "
        "(FusedBatchNormV3, as before, whose gradient's unused outputs the tape fills with zeros)"),
    "dilated": OpBuild(
        "three_ops", "keras", {"three_ops": "3ops", "keras": "keras"}, "dil", "_dilated_depthwise_applies",
        lambda tf: lambda x, stride, dilation: False, "dilated depthwise from three ops / keras.ops",
        "dilated depthwise convolutions from three TensorFlow ops (as the search builds) or through "
        "keras.ops.depthwise_conv (as before)"),
    "convolutions": OpBuild(
        "raw", "keras", {"raw": "raw", "keras": "keras"}, "convs", "_raw_convolutions",
        lambda tf: lambda x, dilation_rate: False, "convolutions as TensorFlow's ops / keras.ops",
        "undilated convolutions as TensorFlow's ops built directly (as the search builds) or through keras.ops "
        "(as before; with --dilated keras, all of them)"),
    "sum_gradient": OpBuild(
        "recorded", "custom_gradient", {"recorded": "rec", "custom_gradient": "cg"}, "sum", "recorded",
        custom_gradient_recorded, "weighted sums recorded as one op / through tf.custom_gradient",
        "the mixed ops' weighted sums recorded on the tapes as one operation of one output (as the search "
        "builds) or through tf.custom_gradient (as before: an IdentityN of the output and inputs, whose "
        "unused outputs the tape fills with zeros)", module="compiler.cells"),
    "constants": OpBuild(
        "shared", "per_op", {"shared": "share", "per_op": "each"}, "consts", "graph_constant", constants_per_op,
        "integer constants shared per graph / one per op",
        "the shapes, paddings, slice bounds and reduction axes the ops are given: one constant per graph and "
        "value (as the search builds) or one per op (as before)"),
    "convolution_gradients": OpBuild(
        "recorded", "tensorflow", {"recorded": "rec", "tensorflow": "tf"}, "cgrad", "_convolution",
        tensorflows_convolution_gradient, "convolution gradients with static shapes / TensorFlow's",
        "the convolutions' gradients: the two backprop ops given static shapes, only for what a tape watches "
        "(as the search builds), or TensorFlow's registered gradient (as before: the shapes computed again, "
        "both backprops built)"),
    "bn_second_derivative": OpBuild(
        "closed_form", "tensorflow", {"closed_form": "form", "tensorflow": "tf"}, "bn2nd", "_search_batch_norm",
        tensorflows_batch_norm, "search BNs' second derivative in closed form / TensorFlow's",
        "the search BNs' second derivative (exact second order's Hessian-vector pass): its closed form (as the "
        "search builds) or TensorFlow's (as before: a tape through the unfused gradient formula)"),
    "replica_passes": OpBuild(
        "shared", "per_device", {"shared": "share", "per_device": "each"}, "rpass", "Bilevel.shares_passes",
        lambda tf: property(lambda self: False), "passes traced once for every replica / once per replica",
        "with --replicas and --batch-norm replica: every replica calls one trace of each pass (as the search "
        "builds) or each replica traces its own (as before, and as global batch norm still does)",
        module="runtime.bilevel"),
    "shift": OpBuild(
        "slice", "strided_slice", {"slice": "slice", "strided_slice": "ss"}, "shift", "shifted",
        lambda tf: lambda x: x[:, 1:, 1:, :], "FactorizedReduce's shift as Slice / StridedSlice",
        "FactorizedReduce's one-pixel shift as TensorFlow's Slice (as the search builds) or StridedSlice (as "
        "before, Keras' slicing)"),
    "subsample": OpBuild(
        "slice", "strided_slice", {"slice": "slice", "strided_slice": "ss"}, "every", "every",
        lambda tf: lambda x, stride: x[:, ::stride, ::stride, :],
        "stride-2 dilated convolutions' subsampling as Slice / StridedSlice",
        "the stride-2 dilated convolutions' every other row and column as a Slice between two Reshapes (as the "
        "search builds) or a StridedSlice (as before, Keras' slicing)"),
    "perturbed_passes": OpBuild(
        "concurrent", "sequential", {"concurrent": "conc", "sequential": "seq"}, "ppass",
        "Bilevel.perturbed_passes_concurrent", lambda tf: property(lambda self: False),
        "perturbed passes at once / one after the other",
        "the RNN configuration's finite differences: the two perturbed passes run at once on a CPU (as the "
        "recurrent search builds them) or the second after the first (as before, and as the convolutional "
        "search builds them)", module="runtime.bilevel", recurrent=True),
}
STEP_MODES = ("first_order", "second_order_fd", "second_order_exact")


def flag(key):
    """The command-line flag of an ``OP_BUILDS`` key."""
    return "--" + key.replace("_", "-")


def conv_spec(config, operations=None, **sections):
    """The benchmark's convolutional search spec at ``config``'s width and depth (32x32x3, 10 classes)."""
    import keras_darts as kd

    space = {"kind": "conv_cell", "network": {
        "init_channels": config["init_channels"], "layers": config["layers"],
        "input_shape": [32, 32, 3], "num_classes": 10}}
    if operations:
        space["operations"] = list(operations)
    return kd.load_spec({
        "version": 1, "name": "bench",
        "search_space": space,
        "retrain": {"enabled": False},
        **sections,
    })


def recurrent_search(config):
    """The RNN configuration's ``Bilevel``, as a recurrent search builds it."""
    import keras_darts as kd
    from keras_darts.runtime.language_search import build_language_search

    size = config["hidden"]
    spec = kd.load_spec({
        "version": 1, "name": "bench",
        "search_space": {"kind": "recurrent_cell", "network": {"embedding_size": size, "hidden_size": size}},
        "data": {"source": "text_files", "path": ".", "batch_size": config["batch"], "bptt": config["bptt"]},
        "retrain": {"enabled": False},
    })
    return build_language_search(spec, config["vocabulary"])


def recurrent_step(config, mode, grappler=None):
    """The RNN configuration's callable for ``mode`` and the tf.function it runs."""
    import numpy as np
    import tensorflow as tf

    size = config["hidden"]
    bilevel = recurrent_search(config)
    rng = np.random.default_rng(0)
    # As the reference's search loop: distinct training and validation token batches every iteration,
    # each stream's hidden state carried from one iteration to the next, fresh dropout masks each time.
    pool = [tf.constant(rng.integers(0, config["vocabulary"], (config["batch"], config["bptt"] + 1)), tf.int32)
            for _ in range(2 * POOL)]
    batches = itertools.cycle(range(POOL))
    carried = {"train": tf.zeros((config["batch"], size)), "val": tf.zeros((config["batch"], size))}
    draws = itertools.count()

    def batch(which, index):
        tokens = pool[2 * index + (which == "val")]
        return tokens[:, :-1], tokens[:, 1:], carried[which], tf.constant([next(draws), 0], tf.int32)

    lr = tf.constant(20.0, tf.float32)
    arch_lr = tf.constant(3e-3, tf.float32)
    if mode == "forward_backward":
        signature = bilevel.objective.batch_signature()

        @tf.function(input_signature=[signature])
        def run(batch):
            with tf.GradientTape() as tape:
                value, _, _, state = bilevel.objective.loss(bilevel.model, batch, training=True)
            return tape.gradient(value, bilevel.model.trainable_variables), state

        def forward_backward():
            gradients, carried["train"] = run(batch("train", next(batches)))
            return gradients

        return forward_backward, run, None, None
    order = "first" if mode == "first_order" else "second"

    def compiled(grappler):
        return bilevel.compiled_iteration(order, "exact" if mode.endswith("exact") else "finite_difference", grappler)

    step = compiled(grappler)

    def call_with(function):
        def call():
            index = next(batches)
            metrics, carried["train"], carried["val"] = function(batch("train", index), batch("val", index), lr,
                                                                 arch_lr)
            return metrics

        return call

    return call_with(step), step, call_with, compiled


def replicated(replicas):
    """A MirroredStrategy over ``replicas`` logical CPU devices (this process's cores split between them)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    return tf.distribute.MirroredStrategy([f"/cpu:{index}" for index in range(replicas)])


def retrain_step(config, strategy, x, y):
    """One retraining step of DARTS_V2 at the configuration's width and depth (auxiliary head, drop path)."""
    import contextlib

    import tensorflow as tf

    import keras_darts as kd
    from keras_darts.compiler import build_network
    from keras_darts.runtime.optimizers import CoupledSGD
    from keras_darts.runtime.retraining import make_train_step

    with strategy.scope() if strategy else contextlib.nullcontext():
        model = build_network(kd.load_derived("DARTS_V2"), synchronized=strategy is not None,
                              init_channels=config["init_channels"], layers=config["layers"], input_shape=(32, 32, 3),
                              num_classes=10, auxiliary=True)
        optimizer = CoupledSGD(model.trainable_variables, 0.9, 3e-4, 5.0)
    model.drop_path_rate.assign(0.2)
    step = make_train_step(model, optimizer, 0.4, (32, 32, 3), strategy)
    lr = tf.constant(0.025, tf.float32)
    return (lambda: step(x, y, lr)), step


def search_epoch(config_name, steps):
    """Seconds of a whole warm search epoch of ``steps`` second-order iterations, through the real loop.

    The data are random images in memory, exactly enough for ``steps`` batches
    in each half, with the default augmentation, so the time includes the
    input pipeline, the loop's bookkeeping and the metric reads. The first
    epoch (tracing) is run and not counted.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from keras_darts.runtime.data import ImageData
    from keras_darts.runtime.workflow import search

    config = CONFIGS[config_name]
    batch = config["batch"]
    spec = conv_spec(config, data={"batch_size": batch, "source": "npz", "path": "unused.npz"},
                     search={"epochs": 2, "order": "second", "diagnostics": {"hessian_eigenvalue": False},
                             "tensorboard": False})
    rng = np.random.default_rng(0)
    count = 2 * steps * batch
    data = ImageData("random", rng.uniform(0, 1, (count, 32, 32, 3)).astype(np.float32),
                     rng.integers(0, 10, count), rng.uniform(0, 1, (batch, 32, 32, 3)).astype(np.float32),
                     rng.integers(0, 10, batch), 10)
    result = search(spec, data=data)
    seconds = result.history[1]["seconds"]
    return {"config": config_name, "mode": "search_epoch", "batch": batch, "replicas": None, "steps": steps,
            "median_seconds": seconds / steps, "epoch_seconds": seconds,
            "first_call_seconds": result.history[0]["seconds"], "traces": None, "times": [seconds],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def measure(config_name, mode, warmup, iterations, batch=None, replicas=None, options=None, paired=False,
            method=None, grappler=None, batch_norm="global", paired_grappler=False, precision="float32",
            call_shape_inference="skipped", optimizer_arithmetic="stacked", batch_shape="fixed",
            paired_batch_shape=False, op_builds=None):
    """Runs inside the child process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if call_shape_inference == "inferred":  # the build before the passes' calls were marked
        from keras_darts.runtime.graph_build import NestedFunction

        NestedFunction.__call__ = lambda self, *args: self.function(*args)
    if optimizer_arithmetic == "per_tensor":  # the build before the arithmetic was stacked per shape
        from keras_darts.runtime import bilevel, optimizers

        def per_tensor(function, *lists):
            outputs = [function(*items) for items in zip(*lists)]
            return tuple(map(list, zip(*outputs))) if isinstance(outputs[0], tuple) else outputs

        optimizers.elementwise = bilevel.elementwise = per_tensor
    op_builds = {key: build.now for key, build in OP_BUILDS.items()} | (op_builds or {})
    for key, value in op_builds.items():
        if value == OP_BUILDS[key].before:
            owner = importlib.import_module(f"keras_darts.{OP_BUILDS[key].module}")
            *path, name = OP_BUILDS[key].attribute.split(".")
            for part in path:
                owner = getattr(owner, part)
            setattr(owner, name, OP_BUILDS[key].replacement(tf))

    from keras_darts.runtime.metrics import cross_entropy
    from keras_darts.runtime.search_loop import build_search

    # Reusing the virtual step's gradient means nothing without one.
    options = {k: v for k, v in (options or {}).items()
               if k != "reuse_virtual_gradient" or mode.startswith("second_order")}
    strategy = replicated(replicas) if replicas else None
    if grappler is None and replicas:  # as a search resolves auto on a MirroredStrategy (its passes nested)
        from keras_darts.runtime.graph_build import resolve_graph_optimizer

        grappler = resolve_graph_optimizer("auto", None, 0)
    config = dict(CONFIGS[config_name])
    if batch:
        config["batch"] = batch
    extra = {"batch": config["batch"], "replicas": replicas, "search_options": options, "method": method or "darts",
             "grappler": GRAPPLER_NAMES[grappler], "batch_norm": batch_norm if replicas else None,
             "precision": precision, "call_shape_inference": call_shape_inference if mode in STEP_MODES else None,
             "optimizer_arithmetic": optimizer_arithmetic if mode in STEP_MODES else None,
             "batch_shape": batch_shape if mode in STEP_MODES and config_name != "RNN" else None,
             **{key: value if OP_BUILDS[key].recurrent == (config_name == "RNN")
                and (not OP_BUILDS[key].recurrent or mode == "second_order_fd") else None
                for key, value in op_builds.items()}}
    if not ((replicas or 0) > 1 and batch_norm == "replica"):
        extra["replica_passes"] = None
    if config_name == "RNN":
        if replicas or mode in EXTRA_MODES:
            raise SystemExit("the RNN configuration measures search iterations on one device only")
        if precision != "float32":
            raise SystemExit("the RNN configuration is measured in float32 only")
        call, function, call_with, compiled = recurrent_step(config, mode, grappler)
        result = {**timed_run(config_name, mode, call, function, warmup, iterations), **extra}
        if paired and mode != "forward_backward":
            result.update(paired_ratio(call, recurrent_step(config, "forward_backward")[0], iterations))
        if paired_grappler and mode in STEP_MODES:
            result.update(grappler_ratio(function, call, call_with, compiled, iterations))
        return result
    stage = PROGRESSIVE.get(method)
    method_options = {"method": "drnas", "drnas": PROGRESSIVE_OPTIONS} if stage is not None else (
        {"method": method} if method else {})
    spec = conv_spec(config, METHOD_OPERATIONS.get(method), search={
        **options, "order": "first" if mode == "first_order" else "second",
        "second_order_mode": "exact" if mode == "second_order_exact" else "finite_difference",
        "precision": precision, **method_options}, distribute={"batch_norm": batch_norm})
    batch = config["batch"]
    # Distinct training and validation batches every iteration, generated before the clock starts.
    generator = tf.random.Generator.from_seed(0)
    pool = [(generator.normal((batch, 32, 32, 3)), generator.uniform((batch,), 0, 10, tf.int32))
            for _ in range(2 * POOL)]
    batches = itertools.cycle(range(POOL))
    x, y = pool[0]
    if mode == "retrain_step":
        if precision != "float32":
            raise SystemExit("retrain_step is measured in float32 only")
        call, function = retrain_step(config, strategy, x, y)
        return {**timed_run(config_name, mode, call, function, warmup, iterations), **extra}
    if mode == "forward_backward" and strategy:
        raise SystemExit("forward_backward is measured on one device only")
    if mode == "darts_pt_measure":
        if strategy or method not in (None, "darts_pt"):
            raise SystemExit("darts_pt_measure is measured on one device, on DARTS-PT's supernet")
        spec = conv_spec(config, search={"order": "first", "method": "darts_pt", "precision": precision})
        call, function, count = darts_pt_measure(spec, pool, batches)
        return {**timed_run(config_name, mode, call, function, warmup, iterations), **extra, "method": "darts_pt",
                "measurements": count}
    def built(batch_shape):
        bilevel = build_search(spec, strategy=strategy)
        if batch_shape == "fixed" and mode in STEP_MODES:  # as a search builds its steps
            bilevel.fix_batch_size(batch)
        if stage:  # the second stage: pruned to the 4 largest (seeded, initial) alphas per edge and widened
            bilevel.enter_stage(stage)
        return bilevel

    bilevel = built(batch_shape)
    lr = tf.constant(0.025, tf.float32)
    arch_lr = tf.constant(3e-4, tf.float32)
    model = bilevel.model

    @tf.function(input_signature=[tf.TensorSpec((None, 32, 32, 3)), tf.TensorSpec((None,), tf.int32)])
    def run(x, y):
        with tf.GradientTape() as tape:
            loss = cross_entropy(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    forward_backward = lambda: run(*pool[2 * next(batches)])  # noqa: E731
    if mode == "forward_backward":
        call, function = forward_backward, run
    else:
        order = "first" if mode == "first_order" else "second"

        def compiled(grappler, bilevel=bilevel):
            mode_name = "exact" if mode.endswith("exact") else "finite_difference"
            return bilevel.compiled_iteration(order, mode_name, grappler)

        function = compiled(grappler)

        def call_with(f):
            def call():
                index = next(batches)
                return f(pool[2 * index], pool[2 * index + 1], lr, arch_lr)

            return call

        call = call_with(function)

    result = {**timed_run(config_name, mode, call, function, warmup, iterations), **extra}
    if paired and mode != "forward_backward":
        result.update(paired_ratio(call, forward_backward, iterations))
    if paired_grappler and mode in STEP_MODES:
        result.update(grappler_ratio(function, call, call_with, compiled, iterations))
    if paired_batch_shape and mode in STEP_MODES:
        other_function = compiled(grappler, built("open" if batch_shape == "fixed" else "fixed"))
        result.update(batch_shape_ratio(call, call_with(other_function), other_function, iterations))
    return result


def batch_shape_ratio(call, other_call, other_function, iterations):
    """This step's time over the same iteration's built for the other batch shape, timed alternately.

    A second supernet from the same spec, its step built with the batch
    dimension the other way (fixed or open); in one process, so the ratio is
    free of the drift between processes.
    """
    pairs = alternated(call, other_call, iterations)
    return {"other_batch_shape_seconds": statistics.median(b for _, b in pairs),
            "other_batch_shape_trace_seconds": other_function.trace_seconds,
            # Its optimisation and first run after the trace (StepFunction.first_call_seconds).
            "other_batch_shape_build_seconds": other_function.first_call_seconds,
            "batch_shape_pairs": pairs,
            "batch_shape_ratio": statistics.median(c / b for c, b in pairs)}


def darts_pt_measure(spec, pool, batches):
    """DARTS-PT's measurement of one validation batch, compiled as ``runtime.projection`` compiles it; and
    how many measurements of the validation split one selection makes (both cell types)."""
    import numpy as np
    import tensorflow as tf

    from keras_darts.runtime.projection import measurement_count, measurement_function
    from keras_darts.runtime.search_loop import build_search

    model = build_search(spec).model
    batch_figures = measurement_function(model, tf.TensorSpec((None, 32, 32, 3)), tf.TensorSpec((None,), tf.int32))
    rng = np.random.default_rng(0)
    weights = {t: tf.constant(rng.dirichlet(np.ones(v.shape[1]), size=v.shape[0]), tf.float32)
               for t, v in model.alphas.items()}

    def call():
        return batch_figures(*pool[2 * next(batches) + 1], weights)

    return call, batch_figures, measurement_count(spec, model)


def timed(call):
    """Seconds of one call, its results fetched."""
    import tensorflow as tf

    started = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy(), call())
    return time.perf_counter() - started


def alternated(call, other, iterations):
    """``iterations`` pairs of seconds ``(call, other)``, timed alternately after two warming calls of ``other``
    (its trace, build and first run)."""
    for _ in range(2):
        timed(other)
    return [(timed(call), timed(other)) for _ in range(iterations)]


def paired_ratio(call, baseline, iterations):
    """The ratio of ``call`` to ``baseline`` (the plain forward+backward) timed alternately in this process.

    Timings on a shared machine drift by a third between processes and over
    minutes; alternating the two and taking the median of the per-pair ratios
    cancels most of that drift.
    """
    pairs = alternated(call, baseline, iterations)
    return {"paired_forward_backward_seconds": statistics.median(b for _, b in pairs),
            "paired_ratio": statistics.median(c / b for c, b in pairs)}


def grappler_ratio(function, call, call_with, compiled, iterations):
    """This step's time over the same step's with the graph optimiser the other way, timed alternately.

    The same iteration compiled again (``compiled(grappler)``) and traced under
    the other setting, since the calls of its passes carry the setting they
    were traced under; in one process, so the ratio is free of the drift
    between processes.
    """
    other = compiled(not function.grappler)
    pairs = alternated(call, call_with(other), iterations)
    return {"other_grappler_seconds": statistics.median(b for _, b in pairs),
            "other_grappler_first_call_seconds": other.first_call_seconds,
            "grappler_ratio": statistics.median(c / b for c, b in pairs)}


def set_threads(setting):
    """In a measuring process, before TensorFlow starts its runtime: its CPU threads as ``--threads`` asks."""
    if setting == "auto":
        from keras_darts.runtime.determinism import auto_kernel_threads, set_kernel_threads

        set_kernel_threads(*auto_kernel_threads())


def kernel_threads():
    """This process' TensorFlow threads, ``[inter_op, intra_op]`` (0: TensorFlow's own choice)."""
    import tensorflow as tf

    return [tf.config.threading.get_inter_op_parallelism_threads(),
            tf.config.threading.get_intra_op_parallelism_threads()]


def threads_column(row):
    """``inter/intra`` (``tf``: TensorFlow's own choice) for the table."""
    if "kernel_threads" not in row:
        return "-"
    inter, intra = row["kernel_threads"]
    return "tf" if not inter and not intra else f"{inter or 'tf'}/{intra or 'tf'}"


def print_threads(results):
    """Each run with distribute.threads' auto beside the same run with TensorFlow's own threads."""
    for row in results:
        if row.get("threads") != "auto":
            continue
        other = next((r for r in results if r.get("threads") == "tensorflow"
                      and all(r.get(k) == row.get(k) for k in run_settings() if k != "threads")), None)
        if other:
            print(f"{row['config']} {row['mode']}{' ' + str(row['replicas']) + ' replicas' if row.get('replicas') else ''}: "
                  f"threads auto ({threads_column(row)}: inter-op/intra-op) / TensorFlow's own: "
                  f"s/iter {row['median_seconds']:.3f} / {other['median_seconds']:.3f} "
                  f"(TensorFlow's over auto {other['median_seconds'] / row['median_seconds']:.2f}), first call "
                  f"{row['first_call_seconds']:.1f} / {other['first_call_seconds']:.1f} s, peak "
                  f"{row['peak_rss_gib']:.2f} / {other['peak_rss_gib']:.2f} GiB")


def timed_run(config_name, mode, call, function, warmup, iterations):
    first_call = timed(call)
    for _ in range(warmup - 1):
        timed(call)
    times = [timed(call) for _ in range(iterations)]
    tracing = function.experimental_get_tracing_count()
    return {
        "config": config_name,
        "mode": mode,
        "median_seconds": statistics.median(times),
        "times": times,
        "first_call_seconds": first_call,
        # A search step's first call split into tracing and the rest (optimisation, executors, one run).
        "trace_seconds": getattr(function, "trace_seconds", None),
        "grappler_on": getattr(function, "grappler", None),
        "traces": tracing,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def estimate_config(config_name, options=None):
    """keras-darts' own estimate for a benchmark configuration (run here, in this process)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras_darts as kd
    from keras_darts.runtime.estimate import estimate

    config = CONFIGS[config_name]
    if config_name == "RNN":
        size = config["hidden"]
        document = {
            "version": 1, "name": "bench",
            "search_space": {"kind": "recurrent_cell", "network": {"embedding_size": size, "hidden_size": size}},
            "data": {"source": "text_files", "path": ".", "batch_size": config["batch"], "bptt": config["bptt"]},
            "retrain": {"enabled": False},
        }
        return estimate(kd.load_spec(document), context={"vocabulary_size": config["vocabulary"]})
    return estimate(conv_spec(config, data={"batch_size": config["batch"]}, search=dict(options or {})))


def print_methods(results):
    """Each method's time per iteration, first call and peak memory beside plain DARTS' in the same mode."""
    print(f"\n{'config':7s} {'mode':18s} {'method':13s} {'s/iter':>8s} {'x darts':>8s} {'first call':>10s} "
          f"{'peak GiB':>8s} {'x darts':>8s}")
    for row in results:
        darts = next((r for r in results if r["config"] == row["config"] and r["mode"] == row["mode"]
                      and r.get("method") == "darts"), None)
        time_ratio = f"{row['median_seconds'] / darts['median_seconds']:8.2f}" if darts else f"{'-':>8s}"
        memory_ratio = f"{row['peak_rss_gib'] / darts['peak_rss_gib']:8.2f}" if darts else f"{'-':>8s}"
        print(f"{row['config']:7s} {row['mode']:18s} {row.get('method', 'darts'):13s} {row['median_seconds']:8.3f} "
              f"{time_ratio} {row['first_call_seconds']:10.1f} {row['peak_rss_gib']:8.2f} {memory_ratio}")


SHORT_PRECISION = {"float32": "f32", "mixed_bfloat16": "bf16", "mixed_float16": "f16"}


def print_precisions(results):
    """Each 16-bit run's time per iteration and first call beside float32's of the same run, measured in this run."""
    for row in results:
        precision = row.get("precision", "float32")
        if precision == "float32":
            continue
        same = ("config", "mode", "batch", "replicas", "method", "grappler", "batch_norm")
        base = next((r for r in results if r.get("precision", "float32") == "float32"
                     and all(r.get(k) == row.get(k) for k in same)), None)
        if base:
            print(f"{row['config']} {row['mode']} {SHORT_PRECISION[precision]} / f32: s/iter "
                  f"{row['median_seconds'] / base['median_seconds']:.2f}x, first call "
                  f"{row['first_call_seconds'] / base['first_call_seconds']:.2f}x, peak memory "
                  f"{row['peak_rss_gib'] / base['peak_rss_gib']:.2f}x")


def run_settings():
    """The keys of a result row that say how it ran (two rows with the same values measure the same thing)."""
    return ("config", "mode", "batch", "replicas", "method", "grappler", "batch_norm", "precision",
            "call_shape_inference", "optimizer_arithmetic", "batch_shape", "threads", *OP_BUILDS)


def print_pairs(results, key, chosen, other, label):
    """Each search step built with ``key`` = ``chosen`` beside the same step built with ``other``."""
    for row in results:
        if row.get(key) != chosen:
            continue
        before = next((r for r in results if r.get(key) == other
                       and all(r.get(k) == row.get(k) for k in run_settings() if k != key)), None)
        if before and row.get("trace_seconds") is not None:
            replicas = f"{row['replicas']} replicas, {row['batch_norm']} batch norm" if row.get("replicas") else "one device"
            print(f"{row['config']} {row['mode']} {replicas}: {label}: trace {row['trace_seconds']:.1f} / "
                  f"{before['trace_seconds']:.1f} s ({row['trace_seconds'] / before['trace_seconds']:.2f}x), first call "
                  f"{row['first_call_seconds']:.1f} / {before['first_call_seconds']:.1f} s "
                  f"({row['first_call_seconds'] / before['first_call_seconds']:.2f}x), s/iter "
                  f"{row['median_seconds']:.3f} / {before['median_seconds']:.3f}")


def cpu_model():
    """The CPU's model name and whether it has AVX-512 (Linux), or ``(None, None)``: figures from machines
    without the same vector units do not compare."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None, None
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return name, any(flag.startswith("avx512") for flag in flags)


@functools.cache
def machine():
    import tensorflow as tf

    name, avx512 = cpu_model()
    return {
        "cores": os.cpu_count(),
        "cpu": name,
        "avx512": avx512,
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "devices": [d.device_type for d in tf.config.list_physical_devices()],
    }


def write_report(path, results, estimates):
    """Write the run's report (machine, results so far, reference seconds, estimates) to ``path``; return it."""
    report = {"machine": machine(), "results": results, "reference_seconds": REFERENCE, "estimates": estimates}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES + EXTRA_MODES)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--output", default="benchmarks/results.json")
    parser.add_argument("--with-estimate", action="store_true",
                        help="also run keras-darts' estimate for each config and compare its peak with the measured one")
    parser.add_argument("--batches", nargs="+", type=int,
                        help="measure at these batch sizes instead of each config's own (time per example)")
    parser.add_argument("--replicas", nargs="+", type=int,
                        help="also run under MirroredStrategy on this many logical CPU devices (same global batch; "
                             "throughput per replica)")
    parser.add_argument("--epoch-steps", nargs="+", type=int,
                        help="instead of single iterations, time whole warm second-order search epochs of these "
                             "numbers of steps (is an epoch's time linear in its batches?)")
    parser.add_argument(OPTION_FLAGS["recompute_cells"], dest="recompute_cells", action="store_true",
                        help="search with search.recompute_cells (each cell run again in the backward pass)")
    parser.add_argument(OPTION_FLAGS["reuse_virtual_gradient"], dest="reuse_virtual_gradient", action="store_true",
                        help="search with search.reuse_virtual_gradient (the opt-in four-pass second order)")
    parser.add_argument("--paired", action="store_true",
                        help="also time each iteration alternately with a forward+backward in the same process and "
                             "report the median ratio of the pairs (robust to the machine's drift)")
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, "drnas_progressive"],
                        help="measure the search modes under each of these search methods (darts added), beside "
                             "plain DARTS (first-order-only methods skip second order); drnas_progressive: each "
                             "stage of DrNAS' progressive search")
    parser.add_argument("--grappler", nargs="+", default=["auto"], choices=list(GRAPPLER_FLAGS),
                        help="TensorFlow's graph optimiser for the search steps: auto (off on CPUs only, as a short search "
                             "runs), on, off; several values measure each search configuration under each")
    parser.add_argument("--batch-norm", nargs="+", default=["global"], choices=["global", "replica"],
                        help="distribute.batch_norm for the --replicas runs; several values measure each")
    parser.add_argument("--precision", nargs="+", default=["float32"],
                        choices=["float32", "mixed_bfloat16", "mixed_float16"],
                        help="search.precision of the convolutional runs (each run under each, one after the other)")
    parser.add_argument("--paired-grappler", action="store_true",
                        help="also time each search step with the graph optimiser the other way, alternately "
                             "in the same process (the 'x other' column: this setting's time over the other's)")
    parser.add_argument("--call-shape-inference", nargs="+", default=["skipped"], choices=list(CALLS),
                        help="whether the passes' calls skip TensorFlow's shape inference of their bodies (skipped, "
                             "as the search builds them) or not (inferred, as before); several values measure each")
    parser.add_argument("--optimizer-arithmetic", nargs="+", default=["stacked"], choices=list(ARITHMETIC),
                        help="the optimisers' arithmetic on lists of weights stacked per shape (stacked, as the search "
                             "builds it) or one tensor at a time (per_tensor, as before); several values measure each")
    parser.add_argument("--batch-shape", nargs="+", default=["fixed"], choices=list(BATCH_SHAPES),
                        help="the search steps built for the batch's size (fixed, as a search builds them) or for any "
                             "size (open, as before); several values measure each")
    for key, build in OP_BUILDS.items():
        parser.add_argument(flag(key), nargs="+", default=[build.now], choices=[build.now, build.before],
                            help=build.help)
    parser.add_argument("--threads", nargs="+", default=["auto"], choices=list(THREADS),
                        help="TensorFlow's CPU threads in each measuring process: auto (distribute.threads' default, "
                             "as compile-and-search sets them) or tensorflow (TensorFlow's own); several values "
                             "measure each run under each")
    parser.add_argument("--paired-batch-shape", action="store_true",
                        help="also build each search step for the other batch shape (a second supernet in the same "
                             "process) and time the two alternately: the median ratio of the pairs, free of the "
                             "machine's drift between processes")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--replica-count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = {key: True for key in OPTION_FLAGS if getattr(args, key)}
    if args.child:
        set_threads(args.threads[0])
    if args.child and args.child[1] == "search_epoch":
        print(json.dumps({**search_epoch(args.child[0], args.steps), "kernel_threads": kernel_threads()}))
        return
    if args.child:
        print(json.dumps({**measure(args.child[0], args.child[1], args.warmup, args.iterations, args.batch,
                                    args.replica_count, options, args.paired, args.method,
                                    GRAPPLER_FLAGS[args.grappler[0]], args.batch_norm[0], args.paired_grappler,
                                    args.precision[0], args.call_shape_inference[0], args.optimizer_arithmetic[0],
                                    args.batch_shape[0], args.paired_batch_shape,
                                    {key: getattr(args, key)[0] for key in OP_BUILDS}),
                          "kernel_threads": kernel_threads()}))
        return
    results = []
    runs = [(c, m, b, r) for c in args.configs for m in args.modes for b in (args.batches or [None])
            for r in (args.replicas or [None])]
    methods = [None]
    if args.methods:
        methods = ["darts"] + [stage for m in args.methods if m != "darts"
                               for stage in (PROGRESSIVE if m == "drnas_progressive" else [m])]
        runs = [(c, m, b, r) for c, m, b, r in runs
                if c != "RNN" and m in ("first_order", "second_order_fd", "second_order_exact")]
    runs = [(*run, method) for run in runs for method in methods
            if not (method in FIRST_ORDER_ONLY and run[1] != "first_order")]
    if args.epoch_steps:
        runs = [(c, "search_epoch", None, None, None, steps) for c in args.configs if c != "RNN"
                for steps in args.epoch_steps]
    # Every search configuration under each graph-optimiser setting asked for, one after the other.
    runs = [(*run[:5], setting, *run[5:]) for run in runs
            for setting in (args.grappler if run[1] in STEP_MODES else args.grappler[:1])]
    # Runs on several replicas under each batch-norm setting asked for.
    runs = [(*run[:6], norm, *run[6:]) for run in runs for norm in (args.batch_norm if run[3] else ["global"])]
    # Convolutional search runs under each precision asked for (RNN and retraining: float32).
    runs = [(*run[:7], precision, *run[7:]) for run in runs
            for precision in (args.precision if run[0] != "RNN" and run[1] not in ("retrain_step", "search_epoch")
                              else ["float32"])]
    # Search step runs with each call shape inference asked for.
    runs = [(*run[:8], calls, *run[8:]) for run in runs
            for calls in (args.call_shape_inference if run[1] in STEP_MODES else args.call_shape_inference[:1])]
    # ... and with each optimiser arithmetic asked for.
    runs = [(*run[:9], arithmetic, *run[9:]) for run in runs
            for arithmetic in (args.optimizer_arithmetic if run[1] in STEP_MODES else args.optimizer_arithmetic[:1])]
    # ... and each batch shape asked for.
    runs = [(*run[:10], shape, *run[10:]) for run in runs
            for shape in (args.batch_shape if run[1] in STEP_MODES else args.batch_shape[:1])]
    # ... and (convolutional runs) each combination of the op builds asked for.
    combinations = [dict(zip(OP_BUILDS, values)) for values in itertools.product(*(getattr(args, key)
                                                                                   for key in OP_BUILDS))]
    runs = [(*run[:11], builds, *run[11:]) for run in runs
            for builds in combinations
            # the builds of the other kind of configuration once (the first value asked for)
            if all(builds[key] == getattr(args, key)[0] for key, build in OP_BUILDS.items()
                   if build.recurrent != (run[0] == "RNN") or (build.recurrent and run[1] != "second_order_fd"))
            # the passes' traces differ only on replicas with replica batch norm
            if builds["replica_passes"] == OP_BUILDS["replica_passes"].now
            or ((run[3] or 0) > 1 and run[6] == "replica")]
    # ... and each run under each threads setting asked for.
    runs = [(threads, run) for run in runs for threads in args.threads]
    for threads, (config, mode, batch, replicas, method, setting, norm, precision, calls, arithmetic, shape, builds,
                  *steps) in runs:
        command = [sys.executable, __file__, "--child", config, mode, "--threads", threads,
                   "--grappler", setting, "--batch-norm", norm,
                   "--warmup", str(args.warmup), "--iterations", str(args.iterations), "--precision", precision,
                   "--call-shape-inference", calls, "--optimizer-arithmetic", arithmetic, "--batch-shape", shape,
                   *(item for key, value in builds.items() for item in (flag(key), value))]
        if method:
            command += ["--method", method]
        if steps:
            command += ["--steps", str(steps[0])]
        if batch:
            command += ["--batch", str(batch)]
        if replicas:
            command += ["--replica-count", str(replicas)]
        command += [OPTION_FLAGS[key] for key in options]
        if args.paired:
            command.append("--paired")
        if args.paired_grappler:
            command.append("--paired-grappler")
        if args.paired_batch_shape:
            command.append("--paired-batch-shape")
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if done.returncode != 0:
            print(f"{config} {mode}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append({**json.loads(done.stdout.strip().splitlines()[-1]), "threads": threads})
        write_report(args.output, results, {})  # after every row: a long run stopped early keeps what it measured
        print(f"measured {config} {mode} {method or ''} grappler {setting} bn {norm} batch {batch or CONFIGS[config]['batch']} "
              f"replicas {replicas or '-'} threads {threads} {precision} calls {calls} arithmetic {arithmetic} batch {shape} "
              f"{' '.join(f'{key} {value}' for key, value in builds.items())}: "
              f"{results[-1]['median_seconds']:.3f} s",
              file=sys.stderr,
              flush=True)
    estimates = {config: estimate_config(config, options) for config in args.configs} if args.with_estimate else {}
    report = write_report(args.output, results, estimates)
    # The reference implementation's seconds (REFERENCE) were measured on another day in another process;
    # they stay in the JSON and in benchmarks/README.md's text, not beside this run's figures.
    header = f"{'config':7s} {'mode':20s} {'batch':>5s} {'rep':>3s} {'s/iter':>8s} {'ms/example':>10s} " \
             f"{'ex/s/rep':>8s} {'x fwd+bwd':>9s} {'grappler':>8s} {'trace s':>7s} {'first call':>10s} " \
             f"{'peak GiB':>8s} {'traces':>6s} {'paired x':>8s} {'x other':>7s} {'precision':>9s} {'calls':>5s} " \
             f"{'arith':>5s} {'shape':>5s} {'thr':>5s} " + " ".join(f"{build.column:>5s}" for build in OP_BUILDS.values())
    print(header)
    for row in results:
        batch = row["batch"]
        replicas = row.get("replicas") or 1
        base = next((r["median_seconds"] for r in results if r["config"] == row["config"]
                     and r["mode"] == "forward_backward" and r["batch"] == batch and not r.get("replicas")
                     and r.get("precision", "float32") == row.get("precision", "float32")
                     and r.get("threads") == row.get("threads")), None)
        ratio = f"{row['median_seconds'] / base:9.2f}" if base else f"{'-':>9s}"
        paired = f"{row['paired_ratio']:8.2f}" if "paired_ratio" in row else f"{'-':>8s}"
        other = f"{row['grappler_ratio']:7.3f}" if "grappler_ratio" in row else f"{'-':>7s}"
        grappler = {True: "on", False: "off", None: "-"}[row.get("grappler_on")]
        trace = f"{row['trace_seconds']:7.1f}" if row.get("trace_seconds") is not None else f"{'-':>7s}"
        rep = f"{row['replicas']}{'r' if row.get('batch_norm') == 'replica' else ''}" if row.get("replicas") else "-"
        print(f"{row['config']:7s} {row['mode']:20s} {batch:5d} {rep:>3} "
              f"{row['median_seconds']:8.3f} {1000 * row['median_seconds'] / batch:10.2f} "
              f"{batch / row['median_seconds'] / replicas:8.1f} {ratio} {grappler:>8s} {trace} "
              f"{row['first_call_seconds']:10.1f} {row['peak_rss_gib']:8.2f} {'-' if row['traces'] is None else row['traces']:>6} "
              f"{paired} {other} {SHORT_PRECISION[row.get('precision', 'float32')]:>9s} "
              f"{CALLS.get(row.get('call_shape_inference'), '-'):>5s} "
              f"{ARITHMETIC.get(row.get('optimizer_arithmetic'), '-'):>5s} "
              f"{BATCH_SHAPES.get(row.get('batch_shape'), '-'):>5s} {threads_column(row):>5s} "
              + " ".join(f"{build.short.get(row.get(key), '-'):>5s}" for key, build in OP_BUILDS.items()))
    print_precisions(results)
    print_threads(results)
    print_pairs(results, "call_shape_inference", "skipped", "inferred", "calls skipping / inferring shape inference")
    print_pairs(results, "optimizer_arithmetic", "stacked", "per_tensor",
                "optimiser arithmetic stacked per shape / per tensor")
    print_pairs(results, "batch_shape", "fixed", "open", "batch size fixed / open")
    for key, build in OP_BUILDS.items():
        print_pairs(results, key, build.now, build.before, build.label)
    for row in results:
        if "batch_shape_ratio" in row:
            this, other = ("fixed", "open") if row["batch_shape"] == "fixed" else ("open", "fixed")
            mine = statistics.median(c for c, _ in row["batch_shape_pairs"])
            print(f"{row['config']} {row['mode']}: batch {this} / {other}, built in one process and timed alternately "
                  f"({len(row['batch_shape_pairs'])} pairs): median ratio {row['batch_shape_ratio']:.3f} "
                  f"(medians {mine:.3f} / {row['other_batch_shape_seconds']:.3f} s); the {other} build in the same "
                  f"process: traced in {row['other_batch_shape_trace_seconds']:.1f} s, optimised and first run in "
                  f"{row['other_batch_shape_build_seconds']:.1f} s")
    for row in results:
        if row["mode"] == "darts_pt_measure":
            per_image = row["median_seconds"] / row["batch"]
            print(f"{row['config']} DARTS-PT selection: {row['measurements']} measurements of the validation split, "
                  f"{1000 * per_image:.2f} ms per image: {row['measurements'] * per_image * 1000 / 60:.1f} min per "
                  f"1,000 validation images, {row['measurements'] * per_image * 25000 / 3600:.1f} h at CIFAR-10's "
                  f"25,000")
    if args.methods:
        print_methods(results)
    for config in args.configs:
        epochs = sorted((r for r in results if r["config"] == config and r["mode"] == "search_epoch"),
                        key=lambda r: r["steps"])
        if len(epochs) > 1:
            per_step = [r["median_seconds"] for r in epochs]
            print(f"{config} search epochs: " + ", ".join(
                f"{r['steps']} steps {r['epoch_seconds']:.2f} s ({r['median_seconds']:.3f} s/step)" for r in epochs)
                + f"; s/step at most {max(per_step) / min(per_step):.2f}x its least")
    for config, estimated in estimates.items():
        for order, mode in (("first", "first_order"), ("second", "second_order_fd")):
            row = next((r for r in results if r["config"] == config and r["mode"] == mode), None)
            peak = estimated["orders"][order]["peak_rss_bytes"] / 2**30
            seconds = estimated["orders"][order]["seconds_per_iteration"]
            if row:
                print(f"estimate {config} {order} order: peak {peak:.2f} GiB (measured {row['peak_rss_gib']:.2f}, "
                      f"ratio {peak / row['peak_rss_gib']:.2f}), {seconds:.3f} s/iter (measured "
                      f"{row['median_seconds']:.3f}, ratio {seconds / row['median_seconds']:.2f}); activations "
                      f"{estimated['activation_bytes'] / 2**30:.3f} GiB per forward pass")
    print(f"machine: {json.dumps(report['machine'])}")
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
