"""The whole path for one run directory: search -> derived spec -> retrain -> SavedModel."""

import dataclasses
import logging
import os

import numpy as np

from keras_darts.spec import dump_yaml

from . import rundir

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunReport:
    run_dir: str
    artifacts: dict = dataclasses.field(default_factory=dict)
    search: object = None
    retrain: object = None


def write_run_header(spec, data, run_dir):
    rundir.atomic_write_text(os.path.join(run_dir, rundir.MARKER), dump_yaml(spec.document))
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
    """Validate-compile-search-derive, then retrain and export as the spec asks."""
    from .data import load_image_data
    from .search_loop import search

    data = load_image_data(spec)  # fails before anything is written
    rundir.prepare_new_run(run_dir, overwrite=overwrite)
    write_run_header(spec, data, run_dir)
    report = RunReport(run_dir)
    report.artifacts["spec"] = os.path.join(run_dir, rundir.MARKER)
    report.search = search(spec, run_dir=run_dir, data=data, progress=progress)
    report.artifacts["search history"] = os.path.join(run_dir, "search", "history.csv")
    report.artifacts["derived spec"] = os.path.join(run_dir, "derived.yaml")
    if search_only or not spec.retrain.enabled:
        return report
    report.retrain = retrain_run(spec, report.search.derived, data, run_dir, progress)
    report.artifacts["retrained model"] = os.path.join(run_dir, "retrain", "model.keras")
    report.artifacts["test metrics"] = os.path.join(run_dir, "retrain", "metrics.json")
    if spec.export.enabled:
        report.artifacts["saved model"] = export_run(run_dir, model=report.retrain.model, data=data)
    return report


def derived_for_run(spec, derived):
    """``derived``'s cells stacked into the network ``spec`` retrains (its data, channels, depth, head)."""
    from keras_darts.spec import derived_with_network

    return derived_with_network(derived, **spec.derived_network(retrain=True))


def retrain_run(spec, derived, data, run_dir, progress=False):
    from .retraining import retrain

    return retrain(spec, derived_for_run(spec, derived), data, run_dir=run_dir, progress=progress)


def export_run(run_dir, model=None, data=None):
    """Export ``run_dir``'s retrained model as a SavedModel and verify it in a fresh process."""
    import keras

    import keras_darts.compiler  # noqa: F401 - registers the custom layers model.keras refers to

    from .export import export_saved_model, verify_saved_model, write_signature_note

    rundir.require_run(run_dir, "data.json")
    info = rundir.read_json(os.path.join(run_dir, "data.json"))
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


def load_run_spec(run_dir):
    from keras_darts.spec import load_spec

    rundir.require_run(run_dir)
    return load_spec(os.path.join(run_dir, rundir.MARKER))


def summary_lines(report):
    lines = []
    if report.search and report.search.history:
        last = report.search.history[-1]
        lines.append(f"search: {len(report.search.history)} epochs, final val accuracy {last['val_accuracy']:.4f}")
        lines.append(f"genotype: {last['genotype']}")
    if report.retrain:
        lines.append(
            f"retrain: {report.retrain.parameters} parameters, test accuracy {report.retrain.test_accuracy:.4f}"
        )
    for name, path in report.artifacts.items():
        lines.append(f"{name + ':':18s}{path}")
    return lines

