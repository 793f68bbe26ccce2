"""The whole path for one run directory: search -> derived spec -> retrain -> SavedModel."""

import dataclasses
import logging
import os

import numpy as np

from keras_darts.spec import dump_yaml

from . import rundir

log = logging.getLogger(__name__)

# Where a run found the plugins its spec names (a JSON file in the run directory).
PLUGINS = "plugins.json"


@dataclasses.dataclass
class RunReport:
    run_dir: str
    artifacts: dict = dataclasses.field(default_factory=dict)
    search: object = None
    retrain: object = None


def is_recurrent(spec):
    return spec.search_space.kind == "recurrent_cell"


def load_data(spec):
    """The spec's data: images for a convolutional search, text for a recurrent one."""
    if is_recurrent(spec):
        from .text_data import load_text_data

        return load_text_data(spec)
    from .data import load_image_data

    return load_image_data(spec)


def write_run_header(spec, data, run_dir):
    rundir.atomic_write_text(os.path.join(run_dir, rundir.MARKER), dump_yaml(spec.document))
    if spec.plugins:
        from keras_darts.spec.plugins import plugin_folders

        # The run's copy of the spec lies elsewhere than the plugins: say where they were found.
        rundir.write_json(os.path.join(run_dir, PLUGINS), {"modules": list(spec.plugins),
                                                           "folders": plugin_folders(spec.plugins)})
    if is_recurrent(spec):
        rundir.write_json(os.path.join(run_dir, "data.json"), {"task": "language_model", **data.to_document()})
        rundir.atomic_write_text(os.path.join(run_dir, "vocabulary.txt"), "\n".join(data.vocabulary) + "\n")
        return
    rundir.write_json(
        os.path.join(run_dir, "data.json"),
        {
            "name": data.name,
            "image_shape": list(data.image_shape),
            "num_classes": int(spec.search_space.network.num_classes),
            "train_examples": int(len(data.y_train)),
            "test_examples": int(len(data.y_test)),
            "mean": data.mean.tolist(),
            "std": data.std.tolist(),
        },
    )


def run_compile_and_search(spec, run_dir, overwrite=False, search_only=False, progress=False):
    """Validate-compile-search-derive, then retrain and export as the spec asks.

    A run directory that already holds this spec's run is resumed: the search
    from its last checkpoint, and steps already finished are not repeated.
    """
    from .distribution import is_chief, make_strategy
    from .search_loop import search, serialize_kernels_if_needed

    serialize_kernels_if_needed(spec)  # before TensorFlow starts its runtime
    # A multi-worker strategy must exist before TensorFlow does anything else.
    strategy = make_strategy(spec.distribute, spec.source)
    data = load_data(spec)  # fails before anything is written
    if strategy is not None and not is_chief(strategy):
        # It reads the chief's checkpoints when run_dir is on a filesystem both share.
        log.info("this worker takes part in the search and retraining and writes nothing; the chief writes %s",
                 run_dir)
        report = RunReport(run_dir)
        report.search = search(spec, run_dir=run_dir, data=data, progress=progress, strategy=strategy)
        if not search_only and spec.retrain.enabled and not is_recurrent(spec):
            report.retrain = retrain_run(spec, report.search.derived, data, run_dir, progress, strategy, writes=False)
        return report
    resuming = rundir.prepare_run(run_dir, spec, overwrite=overwrite)
    if resuming:
        log.info("%s holds this spec's run: resuming it (--overwrite starts over)", run_dir)
    else:
        write_run_header(spec, data, run_dir)
    report = RunReport(run_dir)
    report.artifacts["spec"] = os.path.join(run_dir, rundir.MARKER)
    report.search = search(spec, run_dir=run_dir, data=data, progress=progress, strategy=strategy)
    report.artifacts["search history"] = os.path.join(run_dir, "search", "history.csv")
    report.artifacts["derived spec"] = os.path.join(run_dir, "derived.yaml")
    report.artifacts["pictures"] = plot_run(run_dir)
    report.artifacts["tensorboard"] = os.path.join(run_dir, "tensorboard")
    if search_only or not spec.retrain.enabled:
        return report
    if resuming and os.path.exists(os.path.join(run_dir, "retrain", "metrics.json")):
        report.retrain = load_retrain_result(run_dir)
        log.info("retraining finished in an earlier run: %s", retrain_summary(report.retrain))
    else:
        report.retrain = retrain_run(spec, report.search.derived, data, run_dir, progress, strategy)
    report.artifacts["retrained model"] = os.path.join(run_dir, "retrain", "model.keras")
    report.artifacts["test metrics"] = os.path.join(run_dir, "retrain", "metrics.json")
    saved_model = os.path.join(run_dir, "export", "saved_model")
    if spec.export.enabled and resuming and os.path.exists(os.path.join(saved_model, "saved_model.pb")):
        report.artifacts["saved model"] = saved_model
    elif spec.export.enabled:
        report.artifacts["saved model"] = export_run(run_dir, model=report.retrain.model, data=data)
    return report


def plot_run(run_dir):
    """The pictures of a run's search under ``run_dir/plots``."""
    from .plots import make_plots

    for item in (os.path.join("search", "history.json"), "derived.yaml"):
        if not os.path.exists(os.path.join(run_dir, item)):
            raise rundir.RunDirectoryError.single(run_dir, item, "missing; run a search into it first")
    make_plots(run_dir)
    return os.path.join(run_dir, "plots")


def import_run_plugins(run_dir):
    """Import the plugins the run's spec names (and the compiler's layers), so its saved models reload."""
    import keras_darts.compiler  # noqa: F401 - registers the custom layers model.keras refers to
    from keras_darts.spec import read_yaml_file
    from keras_darts.spec.plugins import import_plugins

    marker = os.path.join(run_dir, rundir.MARKER)
    found = os.path.join(run_dir, PLUGINS)
    folders = rundir.read_json(found)["folders"] if os.path.exists(found) else ()
    import_plugins(read_yaml_file(marker).get("plugins"), marker, folders=folders)


def load_retrain_result(run_dir):
    """The result of a finished retraining, read back from ``run_dir/retrain``."""
    import keras

    import_run_plugins(run_dir)

    from .language_retraining import LanguageRetrainResult
    from .retraining import RetrainResult

    metrics = rundir.read_json(os.path.join(run_dir, "retrain", "metrics.json"))
    history = rundir.read_json(os.path.join(run_dir, "retrain", "history.json"))
    model = keras.saving.load_model(os.path.join(run_dir, "retrain", "model.keras"))
    if "test_perplexity" in metrics:
        return LanguageRetrainResult(model, history, metrics["test_loss"], metrics["test_perplexity"],
                                     metrics["parameters"], metrics.get("switched_to_averaging_after_epoch"))
    return RetrainResult(model, history, metrics["test_loss"], metrics["test_accuracy"], metrics["parameters"])


def derived_for_run(spec, derived, **network):
    """``derived``'s cells in the network ``spec`` retrains (its data, channels, depth, head or LM sizes)."""
    from keras_darts.spec import derived_with_network

    check_retrainable(spec, derived)
    return derived_with_network(derived, **spec.derived_network(retrain=True), **network)


def check_retrainable(spec, derived):
    """Raise ``SpecError`` unless ``spec`` can retrain ``derived`` (same cell kind and operations)."""
    from keras_darts.spec import SpecError

    space = spec.search_space
    if derived.kind != space.kind:
        raise SpecError.single(
            derived.source, "$.kind", f"a derived spec of kind '{derived.kind}' cannot be retrained by a '{space.kind}' spec"
        )
    unknown = sorted({e.op for cell in derived.cells.values() for node in cell.nodes for e in node} - set(space.operations))
    if unknown and space.kind == "recurrent_cell":
        raise SpecError.single(
            derived.source, "$.cells", f"operations {', '.join(unknown)} are not in the spec's operations"
        )


def retrain_run(spec, derived, data, run_dir, progress=False, strategy=None, writes=True):
    """Retrain ``derived`` as ``spec`` says, under ``strategy`` (a language model: on one device)."""
    if is_recurrent(spec):
        from .language_retraining import retrain_language_model

        if strategy is not None:
            log.warning("a language model retrains on one device; the distribute setting applies to its search")
        derived = derived_for_run(spec, derived, vocabulary_size=data.vocabulary_size)
        return retrain_language_model(spec, derived, data, run_dir=run_dir, progress=progress)
    from .retraining import retrain

    return retrain(spec, derived_for_run(spec, derived), data, run_dir=run_dir, progress=progress,
                   strategy=strategy, writes=writes)


def export_run(run_dir, model=None, data=None):
    """Export ``run_dir``'s retrained model as a SavedModel and verify it in a fresh process."""
    import keras

    from .export import export_saved_model, verify_saved_model, write_signature_note

    rundir.require_run(run_dir, "data.json")
    import_run_plugins(run_dir)
    info = rundir.read_json(os.path.join(run_dir, "data.json"))
    if info.get("task") == "language_model":
        return _export_language_model(run_dir, model, data)
    mean = np.asarray(info["mean"], np.float32)
    std = np.asarray(info["std"], np.float32)
    if model is None:
        rundir.require_run(run_dir, os.path.join("retrain", "model.keras"))
        model = keras.saving.load_model(os.path.join(run_dir, "retrain", "model.keras"))
    path = os.path.join(run_dir, "export", "saved_model")
    export_saved_model(model, path, mean, std)
    write_signature_note(path, info["image_shape"], info["num_classes"])
    if data is not None:
        sample = data.x_test[:16]
    else:
        sample = np.random.default_rng(0).uniform(0, 1, (4, *info["image_shape"])).astype(np.float32)
    difference = verify_saved_model(path, model, sample, mean, std)
    log.info("SavedModel verified in a fresh process: max |difference| %.2e", difference)
    return path


def _export_language_model(run_dir, model=None, data=None):
    import keras

    from .export import export_language_model, verify_language_model, write_language_signature_note

    if model is None:
        rundir.require_run(run_dir, os.path.join("retrain", "model.keras"))
        model = keras.saving.load_model(os.path.join(run_dir, "retrain", "model.keras"))
    with open(os.path.join(run_dir, "vocabulary.txt"), encoding="utf-8") as handle:
        vocabulary = handle.read().splitlines()
    path = os.path.join(run_dir, "export", "saved_model")
    export_language_model(model, path)
    write_language_signature_note(path, model.hidden_size, vocabulary)
    if data is not None:
        sample = data.test[: 4 * 12].reshape(4, 12)
    else:
        sample = np.random.default_rng(0).integers(0, len(vocabulary), (4, 12))
    difference = verify_language_model(path, model, sample)
    log.info("SavedModel verified in a fresh process, run statefully in pieces: max |difference| %.2e", difference)
    return path


def load_run_spec(run_dir, overrides=()):
    """The resolved spec a run directory holds, with ``overrides`` (``key.path=value``) applied."""
    from keras_darts.spec import load_spec

    rundir.require_run(run_dir)
    import_run_plugins(run_dir)
    return load_spec(os.path.join(run_dir, rundir.MARKER), overrides=list(overrides))


def summary_lines(report):
    lines = []
    if report.search and report.search.history:
        last = report.search.history[-1]
        if "val_perplexity" in last:
            measure = f"final val perplexity {last['val_perplexity']:.2f}"
        else:
            measure = f"final val accuracy {last['val_accuracy']:.4f}"
        lines.append(f"search: {len(report.search.history)} epochs, {measure}")
        lines.append(f"genotype: {last['genotype']}")
    if report.retrain:
        lines.append(retrain_summary(report.retrain))
    for name, path in report.artifacts.items():
        lines.append(f"{name + ':':18s}{path}")
    return lines



def retrain_summary(result):
    if hasattr(result, "test_perplexity"):
        return f"retrain: {result.parameters} parameters, test perplexity {result.test_perplexity:.2f}"
    return f"retrain: {result.parameters} parameters, test accuracy {result.test_accuracy:.4f}"
