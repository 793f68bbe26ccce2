"""How a search's step functions are built, and what the build costs.

A search step is one large graph: a SMALL second-order step holds some 27,000
nodes (57,000 on 2026-12-04), five calls of its passes over every edge of the
supernet plus the optimiser arithmetic of every weight. Before its first
iteration TensorFlow traces it (Python creating every node) and then, at the
first call, Grappler rewrites the graph and the runtime builds its executors.
For a convolutional supernet on a 2-core CPU the Grappler rewrite is most of
that first call after tracing (SMALL second order, measured on 2026-12-04:
60.5 s with it, 15.0 s without; first order 26.3 and 10.3 s) and gives little
time per iteration back: the step's ops are convolutions, batch norms and
elementwise arithmetic that TensorFlow's CPU kernels run much as they are.
Timed alternately in one process, the steps ran 3% slower without it (SMALL
first and second order) and exact second order 2.4% faster, so Grappler pays
for its build time only after about 650 second-order iterations at SMALL (45 s
spent, 0.07 s saved per iteration). The threshold below was set before the
passes were traced under the step's setting, between the break-evens then
measured (about 300 iterations at SMALL and 150 at PAPER); PAPER's has not
been measured again. The figures, both sides, are in ``benchmarks/README.md``.

``search.graph_optimizer: auto`` therefore turns it off
(``disable_meta_optimizer``) for a convolutional search on a machine whose
only devices are CPUs when the search plans at most
``SHORT_SEARCH_ITERATIONS`` iterations (tests, quickstarts, estimates: they
start sooner), and keeps it on for longer searches, where global batch
norm's passes are traced into the step (multi-worker and TPU replicas), and
with a GPU, where its layout optimiser and op fusions are what
make convolutions fast. A recurrent search keeps it on: its step is
thousands of small ops over the unrolled sequence, which Grappler's rewrites
do speed up on a CPU. ``on`` and ``off`` force it.

The setting is TensorFlow's process-wide optimiser option, switched around
the step's tracing and each of its calls and restored after them, so that
nothing else the process runs (retraining, evaluation, a user's own
functions) is affected. A function is optimised once for the options it is
first called with and again for other options, so a step must always be
called under the same setting, which ``StepFunction`` guarantees. The tracing
matters as much as the call: a step calls its passes (the forward and
backward bodies, most of its graph) as nested functions, and each such call
carries the options it was traced under, with which the runtime optimises
the nested body.

``StepFunction`` also measures the build: the tracing, then the first call
(optimisation, executor construction and one iteration), and logs both. Every
step function a search or retraining calls is one, so its log holds the build
of each: the search step (and the warm-up step of a search that has one), the
evaluation step, the eigenvalue pass, DARTS-PT's measurement step, and the
retraining and test steps; these others run under the process's own setting.

Every ``tf.function`` of the runtime (search steps and their passes,
retraining and evaluation steps, the exported serving functions) is traced
with ``autograph=False``. AutoGraph rewrites the source of every Python
function a traced function calls, so that Python branches and loops on
tensors become graph control flow. Nothing here branches or loops on a tensor
(GDAS' one-op edges build ``tf.switch_case``, the recurrent cell
``keras.ops.scan`` and float16 loss scaling ``tf.cond`` themselves, and a
Python ``if`` on a tensor fails loudly at tracing), so the rewrite bought
nothing and cost time: for the tiny test supernet's second-order step it
converted some 270 functions and was half of the tracing (9.5-10.6 s with it,
5.9-6.2 s without; first call 14-15 s against 10 s), the same graph either
way (identical losses to the last digit).
"""

import contextlib
import logging
import time

import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2

log = logging.getLogger(__name__)

# Planned iterations up to which ``auto`` builds a convolutional search's steps without Grappler
# on CPUs: between the break-evens of the SMALL and PAPER second-order steps measured before (see above).
SHORT_SEARCH_ITERATIONS = 200


def accelerated():
    """Whether TensorFlow sees a GPU or TPU (where Grappler's rewrites pay for themselves)."""
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def resolve_graph_optimizer(setting, current, iterations, passes_inlined=False):
    """Whether a search's steps run with Grappler, for ``search.graph_optimizer`` ``setting``.

    ``current`` is what the search's builder chose (``True`` for a recurrent
    search, ``None`` for no choice); ``iterations`` the search's planned
    total; ``passes_inlined`` whether the passes are traced into the step
    (global batch norm under a multi-worker or TPU strategy), where ``auto``
    keeps Grappler on: a two-replica SMALL second-order step built that way
    ran out of 24 GiB without it. A MirroredStrategy keeps its passes nested
    (with global batch norm each replica launches its own all-reduces), and
    there Grappler did not make an iteration faster (two replicas, SMALL
    second order, global: 5.91 s on, 5.93 s off) and made the first call
    647 s against 367 s.
    """
    if setting != "auto":
        return setting == "on"
    if current is not None:
        return current
    return accelerated() or passes_inlined or iterations > SHORT_SEARCH_ITERATIONS


def meta_optimizer_disabled():
    """Whether TensorFlow's graph optimiser is switched off for this process (or inside ``grappler_off``)."""
    return bool(tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False))


def built_as_the_process_runs(function, name):
    """``function`` (a ``tf.function`` with an input signature) whose first call logs its build under
    ``name``, optimised as the process's own setting says: for the steps outside a search's iteration
    (evaluation, measurements, retraining), whose graph optimisation ``search.graph_optimizer`` leaves
    alone."""
    return StepFunction(function, name, grappler=True)


@contextlib.contextmanager
def grappler_off():
    """TensorFlow's graph optimiser off for the functions called inside, restored after."""
    previous = meta_optimizer_disabled()
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": previous})


_CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall")
# A call node's attribute by which TensorFlow's graph builder leaves the callee's body out of its shape inference.
_NO_CALL_SHAPE_INFERENCE = {"_disable_call_shape_inference": attr_value_pb2.AttrValue(b=True)}


class NestedFunction:
    """A ``tf.function`` kept as a function of its own in the graphs that call it (not inlined),
    whose calls there skip TensorFlow's shape inference of its body.

    When a traced graph adds a call of a function, TensorFlow's graph builder
    infers the shape of every node of the callee's body again, for each call.
    A search's passes are most of its step (a SMALL second-order step calls
    two of some 19,000 and 17,000 nodes five times), and those inferences were
    a fifth of its tracing (8.4 of 39 s); exact second order's double backward
    pass is larger still (its tracing went from 180 to 78 s without them).
    They give nothing back: the call's outputs take their shapes from the
    function's signature right after.
    So each call made while a graph is traced carries
    ``_disable_call_shape_inference``; the call, its body and its gradient
    are the same as without it.

    ``shared_by_replicas``: one trace for every replica of a strategy. Under a
    strategy of several devices a ``tf.function`` keys its traces by the
    device it is called on, so each replica traces the body again (a SMALL
    second-order step on two replicas: first call 38.8 s, and 30.5 s with
    one trace). A shared function is traced at its first call and that
    concrete function is called on every replica; the runtime places each
    call's body on the caller's device (a trace holds no device of its own).
    What differs between replicas must come in as arguments: the body must
    not read variables (it would read the tracing replica's copies) nor the
    replica's index from its context.
    """

    def __init__(self, function, input_signature, shared_by_replicas=False):
        self.function = tf.function(function, input_signature=input_signature, autograph=False,
                                    experimental_attributes={"_noinline": True})
        self.shared_by_replicas = shared_by_replicas
        self.shared = None  # the one concrete function, once traced

    def __call__(self, *args):
        if tf.executing_eagerly():
            return self.function(*args)
        function = self.function
        if self.shared_by_replicas:
            if self.shared is None:
                self.shared = self.function.get_concrete_function()
            function = self.shared
        graph = tf.compat.v1.get_default_graph()
        if getattr(graph.create_op, "marks_calls", False):  # inside another such call on this graph
            return function(*args)
        create_op = type(graph).create_op

        def marked(op_type, inputs, *rest, **options):
            # The call op is made as create_op(type, inputs, dtypes, name=..., attrs=...).
            if op_type in _CALL_OPS and "attrs" in options:
                options["attrs"] = {**options["attrs"], **_NO_CALL_SHAPE_INFERENCE}
            return create_op(graph, op_type, inputs, *rest, **options)

        marked.marks_calls = True
        graph.create_op = marked  # for this call only
        try:
            return function(*args)
        finally:
            del graph.create_op

    def get_concrete_function(self, *args):
        return self.function.get_concrete_function(*args)


class StepFunction:
    """A step ``tf.function`` with a fixed input signature, called under its graph-optimisation setting.

    ``grappler``: ``True`` leaves TensorFlow's graph optimiser as the process
    has it (on, unless switched off process-wide), ``False`` turns it off for
    this function's calls; ``None`` (the default) decides by
    the devices (off on CPUs only, see the module docstring). After the first
    call, ``trace_seconds`` and ``first_call_seconds`` hold what the build
    took, and the build is logged under ``name``.
    """

    def __init__(self, function, name="search step", grappler=None):
        self.function = function
        self.name = name
        self.grappler = accelerated() if grappler is None else bool(grappler)
        self.trace_seconds = None
        self.first_call_seconds = None

    def _setting(self):
        return contextlib.nullcontext() if self.grappler else grappler_off()

    def __call__(self, *args):
        first = self.first_call_seconds is None
        if first:
            started = time.perf_counter()
            self.get_concrete_function()
            self.trace_seconds = time.perf_counter() - started
        started = time.perf_counter()
        with self._setting():
            result = self.function(*args)
            optimised = first and not meta_optimizer_disabled()  # what the build ran under, for its log line
        if first:
            # The values, so the time includes the run (calls may return before it ends on a GPU).
            tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, result)
            self.first_call_seconds = time.perf_counter() - started
            log.info("%s built: traced in %.1f s; optimised and first run in %.1f s (graph optimiser %s)",
                     self.name, self.trace_seconds, self.first_call_seconds, "on" if optimised else "off")
        return result

    def get_concrete_function(self, *args, **kwargs):
        # Traced under the setting too: a call of a nested function (a search's passes) carries the
        # options it was traced under, and the runtime optimises that function's body with them.
        with self._setting():
            return self.function.get_concrete_function(*args, **kwargs)

    def experimental_get_tracing_count(self):
        return self.function.experimental_get_tracing_count()
