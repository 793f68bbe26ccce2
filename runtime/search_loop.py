"""The DARTS search: bilevel iterations, a derived spec every epoch, and what makes a long run trustworthy.

``SearchDriver`` runs any search task (images: ``ImageSearchTask``;
language modelling: ``language_search.LanguageSearchTask``; a cell kind
supplies it) as one ``loop.Loop`` of compiled bilevel steps (``SearchSteps``),
with the search's callbacks:

* every ``checkpoint_every_steps`` iterations and after every epoch it writes
  an atomic checkpoint (weights, alphas, both optimisers, position, counters,
  carried arrays); a run directory with a checkpoint resumes from it. Data
  order and augmentation are functions of (seed, epoch, position), so a
  resumed epoch replays exactly; with ``search.deterministic`` (op
  determinism and one kernel at a time) a killed and resumed search ends with
  the same alphas as an uninterrupted one;
* a loss or gradient norm that is NaN or infinite stops the search
  (``DivergenceGuard`` raises ``DivergenceError``, naming the step and the
  value) and leaves the last good checkpoint as it was, or, with
  ``on_divergence: rollback``, restores it and continues with the learning
  rate times ``divergence_lr_factor``;
* each epoch it records losses, metrics, learning rate, alpha softmaxes, the
  genotype and collapse diagnostics (skip connections and parameter-free ops
  of the derived cell, the dominant eigenvalue of the alpha Hessian of the
  validation loss; ``Diagnostics``) in CSV, JSON and TensorBoard, and applies
  the early-stopping rules (``EarlyStopping``), recording the one that fired.
"""

import contextlib
import dataclasses
import logging
import math
import os
import resource

import numpy as np
import tensorflow as tf

from keras_darts.compiler import CELL_TYPES, build_supernet, derived_spec_from_search
from keras_darts.compiler.methods import search_method
from keras_darts.compiler.methods.base import softmax
from keras_darts.spec import DivergenceError

from . import rundir
from .bilevel import Bilevel
from .checkpoint import START, SearchCheckpoints
from .data import pipeline, search_split
from .footprint import format_bytes, static_estimate
from .graph_build import resolve_graph_optimizer
from .latency import LatencyLoss, derived_latency
from .loop import Callback, Checkpointing, HistoryFiles, Loop, ProgressBar, WorkersAgree
from .metrics import evaluate
from .optimizers import CoupledAdam, CoupledSGD, cosine_learning_rate
from .precision import precision_note, set_precision
from .projection import SupernetSelection, projection_record, projection_state

log = logging.getLogger(__name__)

@dataclasses.dataclass
class SearchResult:
    derived: object
    alphas: dict
    history: list
    model: object = None
    stopped_by: object = None


# Written after a search's last results: a run directory that holds it has a finished search.
SEARCH_FINISHED = os.path.join("search", "finished.json")


def finished_search(run_dir):
    """The result of the finished search in ``run_dir``, read from its files; ``None`` if it has none.

    Nothing is built: the derived spec, the final alphas and the history are
    what the search wrote after its last epoch.
    """
    from keras_darts.spec import load_derived

    marker = os.path.join(run_dir, SEARCH_FINISHED)
    if not os.path.exists(marker):
        return None
    finished = rundir.read_json(marker)
    with np.load(os.path.join(run_dir, "search", "alphas.npz")) as arrays:
        alphas = {key: arrays[key] for key in arrays.files}
    return SearchResult(derived=load_derived(os.path.join(run_dir, "derived.yaml")), alphas=alphas,
                        history=rundir.read_json(os.path.join(run_dir, "search", "history.json")),
                        stopped_by=finished["stopped_by"])


def genotype_text(derived):
    parts = []
    for cell_type, cell in derived.cells.items():
        nodes = "; ".join(", ".join(f"{e.op}<-{e.input}" for e in node) for node in cell.nodes)
        parts.append(f"{cell_type}: {nodes}")
    return " | ".join(parts)


def build_search(spec, model=None, strategy=None, model_builder=build_supernet, latency_table=None):
    """The supernet (``model``, or ``model_builder(spec)``), its two optimisers and the bilevel iteration.

    Built under ``strategy``'s scope. ``latency_table`` (``latency.latency_table``) makes the search latency-aware.
    """
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = set_precision(model or model_builder(spec), spec.search.precision)
        config = spec.search
        latency = LatencyLoss(model, spec, latency_table) if latency_table is not None else None
        return Bilevel(
            model,
            CoupledSGD.from_config(model.weight_variables, config.weights_optimizer),
            CoupledAdam.from_config(model.arch_variables, config.arch_optimizer),
            hvp_epsilon=config.hvp_epsilon,
            strategy=strategy,
            reuse_virtual_gradient=config.reuse_virtual_gradient,
            batch_norm=spec.distribute.batch_norm,
            precision=config.precision,
            latency=latency,
        )


class ImageSearchTask:
    """Batches, evaluation and records of a search on images (of ``kind``, with ``bilevel``)."""

    metric = "accuracy"

    def __init__(self, spec, data, bilevel, kind, latency_table=None):
        config = spec.search
        self.spec = spec
        self.kind = kind
        self.latency_table = latency_table
        weight_index, alpha_index = search_split(data, spec)
        batch = spec.data.batch_size
        augment = spec.data.augment
        self.weights_data = pipeline(data, data.x_train[weight_index], data.y_train[weight_index], batch, True,
                                     augment, config.seed, drop_remainder=True)
        self.alpha_data = pipeline(data, data.x_train[alpha_index], data.y_train[alpha_index], batch, True, augment,
                                   config.seed + 1, drop_remainder=True)
        self.eval_data = pipeline(data, data.x_train[alpha_index], data.y_train[alpha_index], batch)
        self.steps = min(self.weights_data.batches_per_epoch(), self.alpha_data.batches_per_epoch())
        if config.steps_per_epoch:
            self.steps = min(self.steps, config.steps_per_epoch)
        # Every search batch has ``batch`` examples (the remainder is dropped): the steps are built for that size.
        bilevel.fix_batch_size(batch)
        self.bilevel = bilevel

    def describe(self):
        bilevel = self.bilevel
        return (f"{sum(int(np.prod(v.shape)) for v in bilevel.weight_vars)} weights, alphas "
                f"{'+'.join(str(tuple(v.shape)) for v in bilevel.arch_vars)}")

    def steps_in_epoch(self, epoch):
        return self.steps

    def batches(self, epoch, skip, first_iteration):
        """``(train, val, learning-rate factor, weight)`` for each remaining step of ``epoch``."""
        pairs = zip(self.weights_data.epoch(epoch, skip), self.alpha_data.epoch(epoch, skip))
        for _, (train, val) in zip(range(self.steps - skip), pairs):
            yield train, val, 1.0, 1.0

    def carry(self, train_state, val_state):
        pass

    def arrays(self):
        return {}

    def load_arrays(self, arrays):
        pass

    def evaluate(self):
        loss, accuracy = evaluate(lambda x, y: self.bilevel.evaluate_batch((x, y))[:2], self.eval_data)
        return {"val_loss": loss, "val_accuracy": accuracy}

    def diagnostic_batch(self):
        return next(iter(self.eval_data.epoch(0)))

    def alphas(self):
        return {t: self.bilevel.model.alphas[t].numpy() for t in CELL_TYPES}

    def derive(self, alphas, origin):
        model = self.bilevel.model
        if model.method.stages > 1:
            model.sync_stage()  # the stage its weights hold, also when no epoch ran since a resume
            if model.stage > 0:  # a search in stages: the pruned ops take no part
                origin = {**origin, "kept_ops": {t: model.kept_masks[t].numpy().astype(int).tolist()
                                                 for t in alphas}}
                alphas = model.searched_alphas(alphas)
        betas = {t: v.numpy() for t, v in getattr(model, "edge_betas", {}).items()}
        if betas:  # PC-DARTS' edge weights take part in the derivation: record them too
            origin = {**origin, "edge_weights": {t: b.tolist() for t, b in betas.items()}}
        projection = projection_state(model)
        if projection is not None:  # DARTS-PT's selection so far decides the edges it has fixed
            space = self.spec.search_space
            origin = {**origin, "darts_pt": projection_record(model, space.operations)}
        return derived_spec_from_search(self.spec, alphas, retrain=self.spec.retrain.enabled, origin=origin,
                                        edge_betas=betas or None, projection=projection)

    def summarise(self, sums, weight):
        return {key: value / max(weight, 1e-12) for key, value in sums.items()}

    def derived_figures(self, derived):
        """What an epoch's record adds about its derived network: the latency table's sum for it."""
        if self.latency_table is None:
            return {}
        return {"table_latency_ms": derived_latency(self.spec, self.latency_table, derived)}


def search_origin(spec, epoch, alphas):
    """The ``origin`` block of a derived spec written after ``epoch`` epochs."""
    config = spec.search
    return {
        "spec_name": spec.name,
        "spec_sha256": spec.sha256,
        "seed": config.seed,
        "epoch": epoch + 1,
        "order": config.order,
        "method": search_method(spec).to_document(),
        "source": spec.source,
        "alphas": {t: a.tolist() for t, a in alphas.items()},
    }


class SearchSteps:
    """A search task (``ImageSearchTask``, ``LanguageSearchTask``) as the ``Loop`` runs it: compiled bilevel steps."""

    def __init__(self, spec, task):
        self.spec = spec
        self.config = spec.search
        self.task = task
        self.bilevel = task.bilevel
        self.bilevel.grappler = resolve_graph_optimizer(self.config.graph_optimizer, self.bilevel.grappler,
                                                        self.config.epochs * task.steps_in_epoch(0),
                                                        self.bilevel.passes_inlined)
        self.step_function = self.bilevel.compiled_iteration(self.config.order, self.config.second_order_mode)
        # DARTS-PT: tuning epochs after the search's, with selection steps between them.
        self.selection = (SupernetSelection(spec, task) if self.bilevel.model.method.selection is not None
                          else None)
        self.epochs = self.config.epochs + (self.selection.epochs if self.selection else 0)
        self.warmup_function = None  # the weights-only step of a method's warm-up (PC-DARTS), built when used
        self.arch_lr = tf.constant(self.config.arch_optimizer.learning_rate, tf.float32)
        self.lr = None
        self.pending = None
        self.derived = self.alphas = None

    def steps_in_epoch(self, epoch):
        return self.task.steps_in_epoch(epoch)

    def begin_epoch(self, state):
        weights = self.config.weights_optimizer
        searched = self.config.epochs
        self.follow_stages(min(state.epoch, searched - 1))
        if state.epoch < searched:
            self.lr = state.lr_scale * cosine_learning_rate(state.epoch, searched, weights.learning_rate,
                                                            weights.learning_rate_min)
            self.bilevel.model.set_epoch(state.epoch)
            return
        # DARTS-PT's tuning: the weights' learning rate restarted lower, a cosine over the tuning epochs;
        # the method's schedules stay at their last search epoch's values.
        tune_epoch = state.epoch - searched
        factor = self.selection.selection.options["learning_rate_factor"]
        self.lr = state.lr_scale * cosine_learning_rate(tune_epoch, self.selection.epochs,
                                                        factor * weights.learning_rate, weights.learning_rate_min)
        self.bilevel.model.set_epoch(searched - 1)
        self.selection.begin(tune_epoch, self.restart_weights_optimizer)

    def follow_stages(self, epoch):
        """Put the supernet in the method's stage of ``epoch`` (a search in stages), retracing the steps if it moves.

        The stage the weights hold comes first (a resumed search); the stages
        after it are entered in order, each pruning and widening the supernet
        and the weights' momentum (``Supernet.enter_stage``).
        """
        model = self.bilevel.model
        if model.method.stages == 1:
            return
        resumed_in_stage = model.sync_stage()
        entered = False
        while model.stage < model.method.stage(epoch):
            self.bilevel.enter_stage(model.stage + 1)  # rebuilds the passes itself
            log.info("stage %d of the search from epoch %d: %d ops kept per edge, ops on C/%d channels",
                     model.stage + 1, epoch + 1, model.method.kept_ops(model.stage),
                     model.method.stage_partial_channels[model.stage])
            entered = True
        if resumed_in_stage and not entered:
            self.bilevel.compile_passes()
        if resumed_in_stage or entered:
            self.step_function = self.bilevel.compiled_iteration(self.config.order, self.config.second_order_mode)
            self.warmup_function = None

    def restart_weights_optimizer(self):
        """Clear the weights' momentum: the official tuning builds a new optimiser."""
        for buffer in self.bilevel.weights_optimizer.momentum_buffers:
            buffer.assign(tf.zeros_like(buffer))

    def batches(self, state):
        return self.task.batches(state.epoch, state.step, state.iteration)

    def step(self, inputs, state):
        train, val, factor, weight = inputs
        function = self.step_function
        if self.bilevel.model.method.arch_frozen(state.epoch):
            if self.warmup_function is None:
                self.warmup_function = self.bilevel.compiled_weight_step()
            function = self.warmup_function
        metrics, train_state, val_state = function(train, val, tf.constant(self.lr * factor, tf.float32),
                                                   self.arch_lr)
        self.pending = (train_state, val_state)
        return {key: float(value) for key, value in metrics.items()}, weight

    def accept(self):
        self.task.carry(*self.pending)

    def end_epoch(self, state, seconds):
        epoch = state.epoch
        record = {"epoch": epoch + 1, "learning_rate": self.lr, **self.task.summarise(state.sums, state.weight),
                  **self.bilevel.model.method.schedule(epoch)}
        record.update(self.task.evaluate())
        self.alphas = self.task.alphas()
        self.derived = self.task.derive(self.alphas, search_origin(self.spec, epoch, self.alphas))
        record["seconds"] = seconds
        record["genotype"] = genotype_text(self.derived)
        record.update(self.task.derived_figures(self.derived))
        searched = getattr(self.bilevel.model, "searched_alphas", lambda alphas: alphas)(self.alphas)
        record["alpha_softmax"] = {t: softmax(a).tolist() for t, a in searched.items()}
        return record

    def arrays(self):
        return self.task.arrays()

    def load_arrays(self, arrays):
        self.task.load_arrays(arrays)


class Diagnostics(Callback):
    """Collapse diagnostics of each epoch's derived cell: the kind's statistic and the alpha Hessian's eigenvalue."""

    def __init__(self, config):
        self.config = config

    def on_epoch_end(self, loop, record):
        steps = loop.task
        record.update(steps.task.kind.collapse(steps.derived))
        settings = self.config.diagnostics
        if settings.hessian_eigenvalue:
            record["hessian_eigenvalue"] = steps.bilevel.alpha_hessian_eigenvalue(
                steps.task.diagnostic_batch(), settings.hessian_iterations, settings.hessian_radius, self.config.seed
            )


class EarlyStopping(Callback):
    """The search's early-stopping rules; the one that fires is recorded and ends the loop."""

    def __init__(self, rules):
        self.rules = rules

    def rule(self, record, history):
        """The rule ``record`` (an epoch after ``history``) breaks, as text, or ``None``."""
        rules = self.rules
        if rules.max_skip_connections is not None and record["skip_connections"] > rules.max_skip_connections:
            return (f"max_skip_connections: the derived cell has {record['skip_connections']} skip connections "
                    f"(> {rules.max_skip_connections}) after epoch {record['epoch']}")
        eigenvalue = record.get("hessian_eigenvalue")
        reference_epochs = rules.eigenvalue_reference_epochs
        if rules.eigenvalue_ratio is not None and eigenvalue is not None and len(history) >= reference_epochs:
            early = float(np.mean([r["hessian_eigenvalue"] for r in history[:reference_epochs]]))
            if early > 0 and eigenvalue > rules.eigenvalue_ratio * early:
                return (f"eigenvalue_ratio: the alpha Hessian's dominant eigenvalue {eigenvalue:.4g} exceeds "
                        f"{rules.eigenvalue_ratio} x its mean {early:.4g} over the first {reference_epochs} epochs "
                        f"(epoch {record['epoch']})")
        return None

    def on_epoch_end(self, loop, record):
        rule = self.rule(record, loop.state.history[:-1])
        if rule:
            record["stopped_by"] = loop.state.stopped_by = rule


class SearchLog(Callback):
    """The search's own lines: what runs, the resource figures, the first iterations' cost, each epoch."""

    def __init__(self, spec):
        self.spec = spec
        self.timings = []

    def on_train_begin(self, loop):
        config = self.spec.search
        steps = loop.task
        log.info("search %s: %s, %s order%s, %d epochs%s%s", self.spec.name, steps.task.describe(), config.order,
                 f" ({config.second_order_mode})" if config.order == "second" else "", config.epochs,
                 f", then {steps.selection.describe()}" if steps.selection else "", precision_note(config.precision))
        counts = static_estimate(self.spec, steps.bilevel, steps.task.kind)
        log.info("estimate: %s weights, %s architecture parameters, %s of activations per forward pass at batch %d",
                 f"{counts['weights']:,}", f"{counts['alphas']:,}", format_bytes(counts["activation_bytes"]),
                 self.spec.data.batch_size)
        if loop.state.epoch < loop.epochs and not loop.state.stopped_by:
            log.info("the first iteration traces and builds the step's graph; on a CPU this takes a while")

    def on_train_batch_end(self, loop, logs):
        self.timings.append(logs["step_seconds"])
        if len(self.timings) == 4:
            timings = self.timings
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
            remaining = loop.epochs * loop.task.steps_in_epoch(0)
            log.info("measured: first iteration %.1f s (with the build), then %.3f s per iteration (about %.1f min for %d "
                     "iterations); peak memory so far %.2f GiB", timings[0], float(np.median(timings[1:])),
                     float(np.median(timings[1:])) * remaining / 60, remaining, peak)

    def on_epoch_end(self, loop, record):
        metric = loop.task.task.metric
        log.info(
            "search epoch %d/%d: train loss %.4f | val loss %.4f %s %.4g | lr %.4g | skip %s | eigenvalue %s | %.1fs",
            record["epoch"], loop.epochs, record.get("train_loss", float("nan")), record["val_loss"], metric,
            record[f"val_{metric}"], record["learning_rate"], record["skip_connections"],
            "-" if record.get("hessian_eigenvalue") is None else f"{record['hessian_eigenvalue']:.4g}",
            record["seconds"],
        )
        log.info("genotype: %s", record["genotype"])
        if "table_latency_ms" in record:
            log.info("latency: expected %.3f ms (epoch mean), derived network %.3f ms by the table, target %s ms",
                     record.get("expected_latency_ms", float("nan")), record["table_latency_ms"],
                     self.spec.search.latency.target_ms)
        if record.get("stopped_by"):
            log.warning("early stopping: %s", record["stopped_by"])


class DerivedSpecs(Callback):
    """Each epoch's derived spec as ``folder/epoch_NNN.yaml``."""

    def __init__(self, folder):
        self.folder = folder

    def on_epoch_end(self, loop, record):
        rundir.write_yaml(os.path.join(self.folder, f"epoch_{record['epoch']:03d}.yaml"),
                          loop.task.derived.to_document())


class TensorBoardLog(Callback):
    """Scalars per step and per epoch, alpha heatmaps and the genotype in ``run_dir/tensorboard``."""

    def __init__(self, run_dir, operations, edge_labels):
        self.arguments = (run_dir, operations, edge_labels)
        self.board = None

    def on_train_begin(self, loop):
        from .monitor import TensorBoard

        # Only now, after the workers agreed: a refused start writes nothing.
        self.board = TensorBoard(*self.arguments)

    def on_train_batch_end(self, loop, logs):
        self.board.step(loop.state.iteration, logs)

    def on_epoch_end(self, loop, record):
        self.board.epoch(record)

    def on_train_end(self, loop):
        self.board.close()


class EpochHook(Callback):
    """Calls ``function(record)`` after every epoch (the search's ``on_epoch``)."""

    def __init__(self, function):
        self.function = function

    def on_epoch_end(self, loop, record):
        self.function(record)


class DivergenceGuard:
    """A NaN or infinite step value stops the search, or rolls back to the last checkpoint.

    Called by the loop after every step, before the step counts; returns the
    state to continue from after a rollback, ``None`` when the step is good.
    """

    def __init__(self, spec, checkpointing):
        self.spec = spec
        self.config = spec.search
        self.checkpointing = checkpointing

    def __call__(self, loop, values):
        bad = next(((k, v) for k, v in values.items() if not math.isfinite(v)), None)
        if bad is None:
            return None
        key, value = bad
        state = loop.state
        where = f"epoch {state.epoch + 1}, step {state.step + 1} (iteration {state.iteration + 1})"
        kept = self.checkpointing.last_good() if self.checkpointing else None
        if self.config.on_divergence == "rollback" and kept and state.rollbacks < self.config.max_rollbacks:
            restored = self.checkpointing.restore(loop, kept)
            restored.lr_scale *= self.config.divergence_lr_factor
            restored.rollbacks = state.rollbacks + 1
            log.warning("search diverged at %s: %s = %s; rolled back to %s and scaled the learning rate by %g",
                        where, key, value, kept, restored.lr_scale)
            return restored
        message = f"the search diverged at {where}: {key} = {value}"
        if kept == START:
            message += "; it had written no checkpoint yet: the same command starts it again"
        elif kept:
            message += f"; the last good checkpoint is {os.path.join(self.checkpointing.checkpoints.directory, kept)}"
        if self.config.on_divergence == "rollback":
            message += f" (after {state.rollbacks} rollbacks)"
        raise DivergenceError.single(self.spec.source, "$.search.on_divergence", message)


class SearchDriver:
    """The search of ``task`` as one ``Loop``, with the callbacks a run directory gets (only the chief writes)."""

    def __init__(self, spec, task, run_dir=None, progress=False, on_epoch=None, writes=True):
        self.spec = spec
        self.task = task
        self.run_dir = run_dir
        self.writes = writes
        self.steps = SearchSteps(spec, task)
        config = spec.search
        self.checkpointing = None
        callbacks = [Diagnostics(config), EarlyStopping(config.early_stopping), SearchLog(spec)]
        if run_dir:
            bilevel = task.bilevel
            self.checkpointing = Checkpointing(
                SearchCheckpoints(os.path.join(run_dir, "search", "checkpoints"), bilevel.model,
                                  bilevel.weights_optimizer, bilevel.arch_optimizer, writes=writes,
                                  loss_scale=bilevel.loss_scale),
                every_steps=config.checkpoint_every_steps, keep_start=True, name=spec.name)
            callbacks.append(self.checkpointing)
        callbacks.insert(0, WorkersAgree(task.bilevel.strategy, "search", run_dir))
        if run_dir and writes:
            space = spec.search_space
            callbacks.append(DerivedSpecs(os.path.join(run_dir, "search", "derived")))
            if config.tensorboard:
                callbacks.append(TensorBoardLog(run_dir, space.operations,
                                                [f"{i}->{j}" for i, j in task.kind.alpha_edges(space.nodes)]))
            callbacks.append(HistoryFiles(os.path.join(run_dir, "search")))
        callbacks.append(ProgressBar("search", progress))
        if on_epoch:
            callbacks.append(EpochHook(on_epoch))
        self.loop = Loop(self.steps, self.steps.epochs, callbacks, guard=DivergenceGuard(spec, self.checkpointing))

    def run(self):
        return self.finish(self.loop.run())

    def finish(self, state):
        steps = self.steps
        if steps.derived is None:  # resumed after the last epoch: rebuild the result from the alphas
            steps.alphas = self.task.alphas()
            steps.derived = self.task.derive(steps.alphas, search_origin(self.spec, len(state.history) - 1,
                                                                         steps.alphas))
        if self.run_dir and self.writes:
            rundir.write_npz(os.path.join(self.run_dir, "search", "alphas.npz"), steps.alphas)
            rundir.write_yaml(os.path.join(self.run_dir, "derived.yaml"), steps.derived.to_document())
            if state.stopped_by:
                rundir.write_json(os.path.join(self.run_dir, "search", "stopped.json"),
                                  {"rule": state.stopped_by, "epoch": len(state.history)})
            # Last: the mark that the search's results above are complete.
            rundir.write_json(os.path.join(self.run_dir, SEARCH_FINISHED),
                              {"epochs": len(state.history), "stopped_by": state.stopped_by})
        return SearchResult(derived=steps.derived, alphas=steps.alphas, history=state.history,
                            model=self.task.bilevel.model, stopped_by=state.stopped_by)
