"""The DARTS search: bilevel iterations, a derived spec every epoch, and what makes a long run trustworthy.

``SearchDriver`` runs any search task (images: ``ImageSearchTask``;
language modelling: ``language_search.LanguageSearchTask``) epoch by epoch:

* every ``checkpoint_every_steps`` iterations and after every epoch it writes
  an atomic checkpoint (weights, alphas, both optimisers, position, counters,
  carried arrays); a run directory with a checkpoint resumes from it. Data
  order and augmentation are functions of (seed, epoch, position), so a
  resumed epoch replays exactly; ``search.deterministic`` also turns on
  TensorFlow's op determinism, and then a killed and resumed search ends with
  the same alphas as an uninterrupted one;
* a loss or gradient norm that is NaN or infinite stops the search
  (``DivergenceError``, naming the step and the value) and leaves the last
  good checkpoint as it was, or, with ``on_divergence: rollback``, restores it
  and continues with the learning rate times ``divergence_lr_factor``;
* each epoch it records losses, metrics, learning rate, alpha softmaxes, the
  genotype and collapse diagnostics (skip connections and parameter-free ops
  of the derived cell, the dominant eigenvalue of the alpha Hessian of the
  validation loss) in CSV, JSON and TensorBoard, and applies the early-stopping
  rules, recording the one that fired.
"""

import contextlib
import dataclasses
import logging
import math
import os
import time

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from keras_darts.compiler import CELL_TYPES, build_supernet, derived_spec_from_search
from keras_darts.compiler.methods.base import softmax
from keras_darts.compiler.methods import search_method
from keras_darts.spec import DivergenceError

from . import rundir
from .bilevel import Bilevel
from .checkpoint import SearchCheckpoints
from .data import pipeline, search_split
from .distribution import check_workers_agree
from .footprint import format_bytes, static_estimate
from .metrics import evaluate
from .optimizers import CoupledAdam, CoupledSGD, cosine_learning_rate

log = logging.getLogger(__name__)

@dataclasses.dataclass
class SearchResult:
    derived: object
    alphas: dict
    history: list
    model: object = None
    stopped_by: object = None


def genotype_text(derived):
    parts = []
    for cell_type, cell in derived.cells.items():
        nodes = "; ".join(", ".join(f"{e.op}<-{e.input}" for e in node) for node in cell.nodes)
        parts.append(f"{cell_type}: {nodes}")
    return " | ".join(parts)


def build_search(spec, model=None, strategy=None, model_builder=build_supernet):
    """The supernet (``model``, or ``model_builder(spec)``), its two optimisers and the bilevel iteration.

    Built under ``strategy``'s scope.
    """
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = model or model_builder(spec)
        config = spec.search
        return Bilevel(
            model,
            CoupledSGD.from_config(model.weight_variables, config.weights_optimizer),
            CoupledAdam.from_config(model.arch_variables, config.arch_optimizer),
            hvp_epsilon=config.hvp_epsilon,
            strategy=strategy,
            reuse_virtual_gradient=config.reuse_virtual_gradient,
        )


class ImageSearchTask:
    """Batches, evaluation and records of a search on images (of ``kind``, with ``bilevel``)."""

    metric = "accuracy"

    def __init__(self, spec, data, bilevel, kind):
        config = spec.search
        self.spec = spec
        self.kind = kind
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
        return derived_spec_from_search(self.spec, alphas, retrain=self.spec.retrain.enabled, origin=origin)

    def summarise(self, sums, weight):
        return {key: value / max(weight, 1e-12) for key, value in sums.items()}


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


class SearchDriver:
    def __init__(self, spec, task, run_dir=None, progress=False, on_epoch=None, writes=True):
        self.spec = spec
        self.writes = writes
        self.config = spec.search
        self.task = task
        self.bilevel = task.bilevel
        self.run_dir = run_dir
        self.progress = progress
        self.on_epoch = on_epoch
        self.checkpoints = None
        self.board = None
        if run_dir:
            self.checkpoints = SearchCheckpoints(
                os.path.join(run_dir, "search", "checkpoints"), self.bilevel.model,
                self.bilevel.weights_optimizer, self.bilevel.arch_optimizer, writes=writes,
            )

    # -- state --------------------------------------------------------------------
    def fresh_state(self):
        return {"epoch": 0, "step": 0, "iteration": 0, "sums": {}, "weight": 0.0, "lr_scale": 1.0,
                "rollbacks": 0, "history": [], "stopped_by": None}

    def save(self, state):
        if self.checkpoints and self.writes:
            self.checkpoints.save(state, self.task.arrays())

    def restore(self):
        state, arrays = self.checkpoints.restore()
        self.task.load_arrays(arrays)
        return state

    # -- the loop -----------------------------------------------------------------
    def run(self):
        config = self.config
        if self.checkpoints and self.checkpoints.latest():
            state = self.restore()
            log.info("resuming %s from its checkpoint: epoch %d, step %d (iteration %d)", self.spec.name,
                     state["epoch"] + 1, state["step"], state["iteration"])
            check_workers_agree(self.bilevel.strategy, state["iteration"], "search", self.run_dir)
        else:
            state = self.fresh_state()
            check_workers_agree(self.bilevel.strategy, state["iteration"], "search", self.run_dir)
            self.save(state)
        if self.run_dir and self.writes and self.config.tensorboard:
            from .monitor import TensorBoard

            space = self.spec.search_space
            self.board = TensorBoard(self.run_dir, space.operations,
                                     [f"{i}->{j}" for i, j in self.task.kind.alpha_edges(space.nodes)])
        log.info("search %s: %s, %s order%s, %d epochs", self.spec.name, self.task.describe(), config.order,
                 f" ({config.second_order_mode})" if config.order == "second" else "", config.epochs)
        counts = static_estimate(self.spec, self.bilevel, self.task.kind)
        log.info("estimate: %s weights, %s architecture parameters, %s of activations per forward pass at batch %d",
                 f"{counts['weights']:,}", f"{counts['alphas']:,}", format_bytes(counts["activation_bytes"]),
                 self.spec.data.batch_size)
        timings = []
        step = self.bilevel.compiled_iteration(config.order, config.second_order_mode)
        if state["epoch"] < config.epochs and not state["stopped_by"]:
            log.info("the first iteration builds and optimises the step's graph; on a CPU this takes a while")
        arch_lr = tf.constant(config.arch_optimizer.learning_rate, tf.float32)
        weights_cfg = config.weights_optimizer
        while state["epoch"] < config.epochs and not state["stopped_by"]:
            epoch = state["epoch"]
            lr = state["lr_scale"] * cosine_learning_rate(
                epoch, config.epochs, weights_cfg.learning_rate, weights_cfg.learning_rate_min
            )
            self.bilevel.model.set_epoch(epoch)
            started = time.perf_counter()
            total = self.task.steps_in_epoch(epoch)
            bar = tqdm(total=total, initial=state["step"], desc=f"search {epoch + 1}/{config.epochs}",
                       disable=not self.progress, leave=False, unit="step")
            diverged = False
            for train, val, factor, weight in self.task.batches(epoch, state["step"], state["iteration"]):
                began = time.perf_counter()
                metrics, train_state, val_state = step(train, val, tf.constant(lr * factor, tf.float32), arch_lr)
                values = {key: float(value) for key, value in metrics.items()}
                timings.append(time.perf_counter() - began)
                if len(timings) == 4:
                    self.log_cost(timings)
                bad = next(((k, v) for k, v in values.items() if not math.isfinite(v)), None)
                if bad:
                    state = self.diverged(state, bad)
                    diverged = True
                    break
                self.task.carry(train_state, val_state)
                for key, value in values.items():
                    state["sums"][key] = state["sums"].get(key, 0.0) + value * weight
                state["weight"] += weight
                state["step"] += 1
                state["iteration"] += 1
                if self.board:
                    self.board.step(state["iteration"], values)
                if config.checkpoint_every_steps and state["iteration"] % config.checkpoint_every_steps == 0:
                    self.save(state)
                bar.update(1)
                bar.set_postfix(loss=f"{state['sums']['train_loss'] / state['weight']:.3f}")
            bar.close()
            if diverged:
                continue
            record = self.end_epoch(state, lr, time.perf_counter() - started)
            state["history"].append(record)
            state.update(epoch=epoch + 1, step=0, sums={}, weight=0.0)
            state["stopped_by"] = record.get("stopped_by")
            self.write_epoch(state["history"])
            self.save(state)
            if self.on_epoch:
                self.on_epoch(record)
        return self.finish(state)

    def log_cost(self, timings):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
        remaining = self.config.epochs * self.task.steps_in_epoch(0)
        log.info("measured: first iteration %.1f s (tracing), then %.3f s per iteration (about %.1f min for %d "
                 "iterations); peak memory so far %.2f GiB", timings[0], float(np.median(timings[1:])),
                 float(np.median(timings[1:])) * remaining / 60, remaining, peak)

    def diverged(self, state, bad):
        key, value = bad
        where = f"epoch {state['epoch'] + 1}, step {state['step'] + 1} (iteration {state['iteration'] + 1})"
        kept = self.checkpoints.latest() if self.checkpoints else None
        if self.config.on_divergence == "rollback" and kept and state["rollbacks"] < self.config.max_rollbacks:
            restored = self.restore()
            restored["lr_scale"] *= self.config.divergence_lr_factor
            restored["rollbacks"] = state["rollbacks"] + 1
            log.warning("search diverged at %s: %s = %s; rolled back to %s and scaled the learning rate by %g",
                        where, key, value, kept, restored["lr_scale"])
            return restored
        message = f"the search diverged at {where}: {key} = {value}"
        if kept:
            message += f"; the last good checkpoint is {os.path.join(self.checkpoints.directory, kept)}"
        if self.config.on_divergence == "rollback":
            message += f" (after {state['rollbacks']} rollbacks)"
        raise DivergenceError.single(self.spec.source, "$.search.on_divergence", message)

    def end_epoch(self, state, lr, seconds):
        epoch = state["epoch"]
        record = {"epoch": epoch + 1, "learning_rate": lr, **self.task.summarise(state["sums"], state["weight"]),
                  **self.bilevel.model.method.schedule(epoch)}
        record.update(self.task.evaluate())
        alphas = self.task.alphas()
        derived = self.task.derive(alphas, search_origin(self.spec, epoch, alphas))
        self.derived, self.last_alphas = derived, alphas
        record.update(self.diagnostics(derived))
        record["seconds"] = seconds
        record["genotype"] = genotype_text(derived)
        record["alpha_softmax"] = {t: softmax(a).round(4).tolist() for t, a in alphas.items()}
        rule = self.stopping_rule(record, state["history"])
        if rule:
            record["stopped_by"] = rule
        metric = self.task.metric
        log.info(
            "search epoch %d/%d: train loss %.4f | val loss %.4f %s %.4g | lr %.4g | skip %s | eigenvalue %s | %.1fs",
            epoch + 1, self.config.epochs, record.get("train_loss", float("nan")), record["val_loss"], metric,
            record[f"val_{metric}"], lr, record["skip_connections"],
            "-" if record.get("hessian_eigenvalue") is None else f"{record['hessian_eigenvalue']:.4g}", seconds,
        )
        log.info("genotype: %s", record["genotype"])
        if rule:
            log.warning("early stopping: %s", rule)
        if self.run_dir and self.writes:
            rundir.write_yaml(os.path.join(self.run_dir, "search", "derived", f"epoch_{epoch + 1:03d}.yaml"),
                              derived.to_document())
        if self.board:
            self.board.epoch(record)
        return record

    def diagnostics(self, derived):
        found = self.task.kind.collapse(derived)
        settings = self.config.diagnostics
        if settings.hessian_eigenvalue:
            found["hessian_eigenvalue"] = self.bilevel.alpha_hessian_eigenvalue(
                self.task.diagnostic_batch(), settings.hessian_iterations, settings.hessian_radius, self.config.seed
            )
        return found

    def stopping_rule(self, record, history):
        rules = self.config.early_stopping
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

    def write_epoch(self, history):
        if not self.run_dir or not self.writes:
            return
        rundir.write_json(os.path.join(self.run_dir, "search", "history.json"), history)
        rundir.write_history_csv(os.path.join(self.run_dir, "search", "history.csv"), history)

    def finish(self, state):
        history = state["history"]
        if not hasattr(self, "derived"):  # resumed after the last epoch: rebuild the result from the alphas
            alphas = self.task.alphas()
            self.last_alphas = alphas
            self.derived = self.task.derive(alphas, search_origin(self.spec, len(history) - 1, alphas))
        if self.run_dir and self.writes:
            rundir.write_npz(os.path.join(self.run_dir, "search", "alphas.npz"), self.last_alphas)
            rundir.write_yaml(os.path.join(self.run_dir, "derived.yaml"), self.derived.to_document())
            if state["stopped_by"]:
                rundir.write_json(os.path.join(self.run_dir, "search", "stopped.json"),
                                  {"rule": state["stopped_by"], "epoch": len(history)})
        if self.board:
            self.board.close()
        return SearchResult(derived=self.derived, alphas=self.last_alphas, history=history,
                            model=self.bilevel.model, stopped_by=state["stopped_by"])
