"""Latency-aware search: a lookup table of block latencies, the expected latency, ProxylessNAS' losses.

The table (``latency_table``) holds the milliseconds of every block of the
derived network the search's architecture would become
(``compiler.latency.LatencyPlan``: the stem, each cell's preprocessing, the
head, and every candidate op on every edge at the shape it sees there). It
is read from ``search.latency.table`` (a file measured on another device:
``{key: ms}`` or ProxylessNAS' ``{key: {mean: ms}}``, YAML or JSON) or
measured on this machine through the TFLite interpreter, block by block in a
fresh process (``latency_worker``), and cached per machine under
``$KERAS_DARTS_CACHE`` (default ``~/.cache/keras-darts``) so that later
searches of the same shapes measure nothing. The run directory keeps the
table it searched with (``search/latency_table.json``): a resumed search
reads that one.

The expected latency (``ExpectedLatency``) is ProxylessNAS' sum over
searchable blocks of the op weights times the table, here over the edges of
every cell: ``E = fixed + sum_cells sum_edges s_e sum_ops w_op LUT[op, shape]``
with ``w`` the method's op weights without noise (softmax for DARTS, the
sigmoid for FairDARTS, the Dirichlet mean for DrNAS) and ``s_e`` the share
of a node's inputs derivation keeps (``k / inputs``; 1 under ``edges:
all``), so that a uniform architecture's ``E`` is the latency of a network
of the derived size. ``LatencyLoss`` turns the architecture step's gradient
of the task loss into that of ProxylessNAS' objective (applied, as there,
to the architecture step only):

* ``mul_log``:    ``J = a * CE * (log E / log T) ** b``, so ``dJ = f dCE + CE df`` with ``f = a (log E / log T) ** b``;
* ``add_linear``: ``J = CE + l * (E - T) / T``.

``E`` and ``T`` are in milliseconds; ``mul_log`` needs ``T > 1`` (its
``log T`` divides) and exerts no pull once ``E`` falls to 1 ms.
"""

import hashlib
import json
import logging
import os
import tempfile
import time

import numpy as np
import tensorflow as tf

from keras_darts.compiler.latency import CELL_TYPES, LatencyPlan
from keras_darts.spec import DerivedNetworkConfig, SpecError, read_yaml_file
from keras_darts.spec.model import from_mapping

from . import rundir
from .deploy import fresh_process_failure

log = logging.getLogger(__name__)

TABLE_FILE = "latency_table.json"


def plan_for(spec):
    """The ``LatencyPlan`` of the network ``spec.search.latency.network`` names."""
    space = spec.search_space
    deployed = spec.search.latency.network == "deployed"
    network = from_mapping(DerivedNetworkConfig, spec.derived_network(deployed))
    return LatencyPlan(network, space.operations, space.nodes)


# -- the target -----------------------------------------------------------------------


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def target():
    """What a measured latency depends on here: the CPU, its cores, the interpreter and TensorFlow."""
    import importlib.util

    return {"device": "cpu", "cpu": _cpu_model(), "cores": os.cpu_count(), "tensorflow": tf.__version__,
            "interpreter": "ai_edge_litert" if importlib.util.find_spec("ai_edge_litert") else "tf.lite"}


def cache_path(described):
    """The cache file of a target: one per machine and software, named by a hash of ``described``."""
    root = os.environ.get("KERAS_DARTS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "keras-darts")
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(root, "latency", f"tflite_cpu-{digest}.json")


# -- measuring ------------------------------------------------------------------------


def measure(blocks=None, runs=50, files=None):
    """``{key: ms}`` of ``blocks`` ({key: description}) or ``files`` ({name: TFLite file}), in a fresh process.

    The process is ``latency_worker``'s; a file is timed as a block is.
    """
    with tempfile.TemporaryDirectory() as folder:
        results = os.path.join(folder, "results.json")
        reason = fresh_process_failure(["-m", "keras_darts.runtime.latency_worker"],
                                       {"blocks": blocks, "files": files, "runs": int(runs), "results": results})
        if reason is not None:
            raise RuntimeError(f"measuring op latencies in a fresh process failed: {reason}")
        return rundir.read_json(results)["entries"]


def measured_table(plan, runs):
    """``{key: ms}`` for every block of ``plan`` on this machine, from the cache and measured where missing."""
    described = target()
    path = cache_path(described)
    cached = rundir.read_json(path)["entries"] if os.path.exists(path) else {}
    missing = {key: plan.blocks[key] for key in plan.missing(cached)}
    if missing:
        log.info("latency table: measuring %d of %d blocks through the TFLite interpreter on this machine",
                 len(missing), len(plan.blocks))
        start = time.perf_counter()
        cached = {**cached, **measure(missing, runs)}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        rundir.write_json(path, {"target": described, "entries": cached})
        log.info("latency table: measured in %.0f s, cached in %s", time.perf_counter() - start, path)
    else:
        log.info("latency table: all %d blocks cached in %s", len(plan.blocks), path)
    return {key: cached[key] for key in plan.blocks}


def read_table_file(path, spec):
    """``{key: ms}`` of a user's table file; ``SpecError`` naming ``search.latency.table`` if unreadable."""
    where = "$.search.latency.table"
    resolved = path if os.path.isabs(path) else os.path.join(os.path.dirname(os.path.abspath(spec.source)), path)
    if not os.path.isfile(resolved):
        raise SpecError.single(spec.source, where, f"no latency table at {resolved}")
    document = read_yaml_file(resolved)  # YAML reads JSON too
    if not isinstance(document, dict):
        raise SpecError.single(resolved, "$", "a latency table must be a mapping of block keys to milliseconds")
    table = {}
    for key, value in document.items():
        value = value.get("mean") if isinstance(value, dict) else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise SpecError.single(resolved, f"$.{key}", f"expected milliseconds (a number >= 0, or {{mean: ms}}); "
                                   f"got {document[key]!r}")
        table[key] = float(value)
    return table, resolved


def latency_table(spec, run_dir=None):
    """The search's table (``{"entries", "source", "target"}``), written to ``run_dir/search/latency_table.json``.

    A run directory that holds one (a resumed search) gives it back unchanged.
    """
    config = spec.search.latency
    plan = plan_for(spec)
    saved = os.path.join(run_dir, "search", TABLE_FILE) if run_dir else None
    if saved and os.path.exists(saved):
        return rundir.read_json(saved)
    if config.table:
        entries, source = read_table_file(config.table, spec)
        missing = plan.missing(entries)
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise SpecError.single(source, "$", f"the table lacks {len(missing)} block(s) this spec's network runs: "
                                   f"{shown} (keras-darts latency-table writes every key)")
        table = {"source": source, "target": None, "entries": {key: entries[key] for key in plan.blocks}}
    else:
        table = {"source": "measured", "target": target(), "entries": measured_table(plan, config.runs)}
    if saved:
        os.makedirs(os.path.dirname(saved), exist_ok=True)
        rundir.write_json(saved, table)
    return table


def write_table_file(spec, path):
    """Measure (or take from the cache) every block of ``spec``'s latency network and write ``{key: ms}`` to ``path``.

    A table measured on another machine this way is what ``search.latency.table`` reads.
    """
    entries = measured_table(plan_for(spec), spec.search.latency.runs)
    rundir.write_yaml(path, entries)
    return path


def uniform_latency(spec, table):
    """The expected latency (ms) at uniform op weights, as the search starts (for the log)."""
    plan = plan_for(spec)
    factors = edge_factors(plan, spec)
    weights = 1.0 / len(plan.operations)
    costs = plan.edge_costs(table["entries"])
    return plan.fixed_cost(table["entries"]) + sum(float((factors * costs[t] * weights).sum()) for t in CELL_TYPES)


def edge_factors(plan, spec):
    """``s_e`` of each alpha row, as a column: ``k / inputs of its node`` (``edges: survival``) or 1."""
    if spec.search.latency.edges == "all":
        return np.ones((len(plan.edges), 1))
    k = spec.search_space.k
    return np.array([[min(1.0, k / node)] for _, node in plan.edges])  # node j has j inputs


def derived_latency(spec, table, derived):
    """The table's milliseconds for ``derived``'s cells in the network the table was made for."""
    return plan_for(spec).genotype_cost(table["entries"], derived.cells)


def table_latency(derived, table):
    """The table's milliseconds for the network ``derived`` describes; ``None`` if it lacks one of its blocks."""
    plan = LatencyPlan(derived.network, derived.operations, len(derived.cells["normal"].nodes))
    return None if plan.missing(table["entries"]) else plan.genotype_cost(table["entries"], derived.cells)


# -- in the search ----------------------------------------------------------------------


class ExpectedLatency:
    """``E(alphas)`` in milliseconds (see the module's docstring), differentiable in the alphas."""

    def __init__(self, model, spec, table):
        plan = plan_for(spec)
        factors = edge_factors(plan, spec)
        self.method = model.method
        self.model = model
        self.fixed = plan.fixed_cost(table["entries"])
        self.costs = {t: factors * c for t, c in plan.edge_costs(table["entries"]).items()}
        self.positions = [next(i for i, v in enumerate(model.arch_variables) if v is model.alphas[t])
                          for t in CELL_TYPES]

    def __call__(self, alphas):
        dtype = alphas[0].dtype
        total = tf.constant(self.fixed, dtype)
        for cell_type, position in zip(CELL_TYPES, self.positions):
            weights = self.model.kept_share(cell_type, self.method.mix(alphas[position]))  # DrNAS' stages
            total += tf.reduce_sum(tf.cast(weights, dtype) * tf.constant(self.costs[cell_type], dtype))
        return total


class LatencyLoss:
    """ProxylessNAS' objective for the architecture step (``search.latency``), from the task loss and its gradient."""

    def __init__(self, model, spec, table):
        self.config = spec.search.latency
        self.expected = ExpectedLatency(model, spec, table)

    def objective(self, task_loss, alphas):
        """``(J, E)``: the objective the alphas minimise, and the expected latency."""
        config = self.config
        expected = self.expected(alphas)
        target = tf.constant(config.target_ms, expected.dtype)
        task_loss = tf.cast(task_loss, expected.dtype)
        if config.loss == "add_linear":
            return task_loss + config.add_lambda * (expected - target) / target, expected
        ratio = tf.maximum(tf.math.log(expected), 1e-6) / tf.math.log(target)
        return config.mul_alpha * task_loss * ratio ** config.mul_beta, expected

    def apply(self, gradients, task_loss, alphas):
        """``(dJ/da, E)`` from the task loss's gradient ``gradients`` (of any order), at ``alphas``."""
        loss = tf.stop_gradient(tf.cast(task_loss, alphas[0].dtype))
        with tf.GradientTape() as tape:
            tape.watch(alphas)
            unit = tf.ones((), loss.dtype)
            scaled, expected = self.objective(unit, alphas)  # J at CE = 1: the factor f (mul) or 1 + term (add)
        term = tape.gradient(scaled, alphas, unconnected_gradients="zero")
        if self.config.loss == "add_linear":
            return [g + t for g, t in zip(gradients, term)], expected
        return [scaled * g + loss * t for g, t in zip(gradients, term)], expected
