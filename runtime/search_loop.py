"""The DARTS search: data, supernet, bilevel iterations, derivation every epoch."""

import dataclasses
import logging
import os
import time

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from keras_darts.compiler import CELL_TYPES, build_supernet, derived_spec_from_search
from keras_darts.compiler.derive import softmax

from . import rundir
from .bilevel import Bilevel
from .data import load_image_data, pipeline, search_split
from .metrics import evaluate
from .optimizers import CoupledAdam, CoupledSGD, cosine_learning_rate

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SearchResult:
    derived: object
    alphas: dict
    history: list
    model: object = None


def genotype_text(derived):
    parts = []
    for cell_type, cell in derived.cells.items():
        nodes = "; ".join(", ".join(f"{e.op}<-{e.input}" for e in node) for node in cell.nodes)
        parts.append(f"{cell_type}: {nodes}")
    return " | ".join(parts)


def build_search(spec, model=None):
    """The supernet, its two optimisers and the bilevel iteration for ``spec``."""
    model = model or build_supernet(spec)
    config = spec.search
    bilevel = Bilevel(
        model,
        CoupledSGD.from_config(model.weight_variables, config.weights_optimizer),
        CoupledAdam.from_config(model.arch_variables, config.arch_optimizer),
        hvp_epsilon=config.hvp_epsilon,
    )
    return bilevel


def search(spec, run_dir=None, data=None, progress=False, on_epoch=None):
    """Run the search ``spec`` describes; write artifacts under ``run_dir`` if given.

    Returns a ``SearchResult`` with the derived spec of the last epoch.
    """
    if spec.search_space.kind == "recurrent_cell":
        from .language_search import search_language_model

        return search_language_model(spec, run_dir=run_dir, data=data, progress=progress, on_epoch=on_epoch)
    config = spec.search
    keras.utils.set_random_seed(config.seed)
    data = data or load_image_data(spec)
    weight_index, alpha_index = search_split(data, spec)
    batch = spec.data.batch_size
    augment = spec.data.augment
    weights_ds = pipeline(data, data.x_train[weight_index], data.y_train[weight_index], batch, True, augment,
                          config.seed, drop_remainder=True)
    alphas_ds = pipeline(data, data.x_train[alpha_index], data.y_train[alpha_index], batch, True, augment,
                         config.seed + 1, drop_remainder=True)
    eval_ds = pipeline(data, data.x_train[alpha_index], data.y_train[alpha_index], batch)
    steps = min(len(weight_index), len(alpha_index)) // batch
    if config.steps_per_epoch:
        steps = min(steps, config.steps_per_epoch)

    bilevel = build_search(spec)
    model = bilevel.model
    log.info(
        "search %s: %d weights, alphas %s, %s order%s, %d epochs of %d steps",
        spec.name, sum(int(np.prod(v.shape)) for v in bilevel.weight_vars),
        "+".join(str(tuple(v.shape)) for v in bilevel.arch_vars), config.order,
        f" ({config.second_order_mode})" if config.order == "second" else "", config.epochs, steps,
    )
    step = bilevel.compiled_iteration(config.order, config.second_order_mode)
    log.info("the first iteration builds and optimises the step's graph; on a CPU this takes a minute or more")
    weights_cfg = config.weights_optimizer
    history = []
    derived = None
    for epoch in range(config.epochs):
        lr = cosine_learning_rate(epoch, config.epochs, weights_cfg.learning_rate, weights_cfg.learning_rate_min)
        started = time.perf_counter()
        sums = {}
        bar = tqdm(total=steps, desc=f"search {epoch + 1}/{config.epochs}", disable=not progress, leave=False,
                   unit="step")
        for i, ((x_t, y_t), (x_v, y_v)) in enumerate(zip(weights_ds, alphas_ds)):
            if i >= steps:
                break
            metrics, _, _ = step((x_t, y_t), (x_v, y_v), tf.constant(lr, tf.float32),
                                 tf.constant(config.arch_optimizer.learning_rate, tf.float32))
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['train_loss'] / (i + 1):.3f}")
        bar.close()
        val_loss, val_accuracy = evaluate(lambda x, y: bilevel.evaluate_batch((x, y))[:2], eval_ds)
        alphas = {t: model.alphas[t].numpy() for t in CELL_TYPES}
        derived = derived_spec_from_search(spec, alphas, retrain=spec.retrain.enabled,
                                           origin=search_origin(spec, epoch, alphas))
        record = {
            "epoch": epoch + 1,
            "learning_rate": lr,
            **{key: value / max(steps, 1) for key, value in sums.items()},
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "seconds": time.perf_counter() - started,
            "genotype": genotype_text(derived),
            "alpha_softmax": {t: softmax(a).round(4).tolist() for t, a in alphas.items()},
        }
        history.append(record)
        log.info(
            "search epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f | lr %.5f | %.1fs",
            epoch + 1, config.epochs, record.get("train_loss", float("nan")), record.get("train_accuracy", 0.0),
            record["val_loss"], record["val_accuracy"], lr, record["seconds"],
        )
        log.info("genotype: %s", record["genotype"])
        write_epoch(run_dir, epoch, derived, history)
        if on_epoch:
            on_epoch(record)
    return finish_search(run_dir, derived, alphas, history, model)


def search_origin(spec, epoch, alphas):
    """The ``origin`` block of a derived spec written after ``epoch`` epochs."""
    config = spec.search
    return {
        "spec_name": spec.name,
        "spec_sha256": spec.sha256,
        "seed": config.seed,
        "epoch": epoch + 1,
        "order": config.order,
        "source": spec.source,
        "alphas": {t: a.tolist() for t, a in alphas.items()},
    }


def write_epoch(run_dir, epoch, derived, history):
    """The epoch's derived spec and the history so far, under ``run_dir/search``."""
    if not run_dir:
        return
    rundir.write_yaml(os.path.join(run_dir, "search", "derived", f"epoch_{epoch + 1:03d}.yaml"), derived.to_document())
    rundir.write_json(os.path.join(run_dir, "search", "history.json"), history)
    rundir.write_history_csv(os.path.join(run_dir, "search", "history.csv"), history)


def finish_search(run_dir, derived, alphas, history, model):
    """The last epoch's alphas and derived spec are the search's result."""
    if run_dir:
        rundir.write_npz(os.path.join(run_dir, "search", "alphas.npz"), alphas)
        rundir.write_yaml(os.path.join(run_dir, "derived.yaml"), derived.to_document())
    return SearchResult(derived=derived, alphas=alphas, history=history, model=model)
