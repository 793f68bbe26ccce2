"""The whole path for one run directory: search -> derived spec -> retrain -> SavedModel.

Everything that differs between search-space kinds is the kind's
(``kinds.kind_of(spec)``); this module only orders the steps and keeps the
run directory.
"""

import dataclasses
import logging
import os

import keras

import keras_darts.compiler  # noqa: F401 - registers the custom layers saved models refer to
from keras_darts.spec import dump_yaml, load_spec, read_yaml_file
from keras_darts.spec.plugins import import_plugins, plugin_folders

from . import rundir
from .deploy import REPORT, report_lines
from .determinism import configure_kernel_threads, op_determinism, warn_unless_kernels_serialized
from .distribution import check_batch, is_chief, make_strategy
from .kinds import kind_of
from .search_loop import SEARCH_FINISHED, SearchDriver, finished_search

log = logging.getLogger(__name__)

# Where a run found the plugins its spec names (a JSON file in the run directory).
PLUGINS = "plugins.json"


@dataclasses.dataclass
class RunReport:
    run_dir: str
    kind: object = None
    artifacts: dict = dataclasses.field(default_factory=dict)
    search: object = None
    retrain: object = None
    comparison: object = None  # the searched cell against random cells (retrain.compare_random)


def load_data(spec):
    """The spec's data, as its kind loads it."""
    return kind_of(spec).load_data(spec)


def search(spec, run_dir=None, data=None, progress=False, on_epoch=None, strategy=None):
    """Run (or resume, when ``run_dir`` holds a checkpoint) the search ``spec`` describes.

    ``strategy`` (default: the one ``spec.distribute`` names) runs it data-parallel;
    only the chief writes ``run_dir``. With ``search.deterministic``,
    TensorFlow's op determinism is on for the search and as it was after it;
    inter-op threading is left as it is (see ``determinism``). Returns a
    ``SearchResult`` with the derived spec of the last epoch.
    """
    warn_unless_kernels_serialized(spec)
    strategy = strategy or make_strategy(spec.distribute, spec.source)
    check_batch(spec, strategy)
    kind = kind_of(spec)
    with op_determinism(spec.search.deterministic):
        keras.utils.set_random_seed(spec.search.seed)
        data = kind.load_data(spec) if data is None else data
        chief = strategy is None or is_chief(strategy)
        task = kind.search_task(spec, data, strategy, **kind.search_context(spec, run_dir if chief else None))
        return SearchDriver(spec, task, run_dir, progress, on_epoch, writes=chief).run()


def write_run_header(spec, data, run_dir):
    """The run directory's record of the spec, the plugins' folders and the data (for later steps)."""
    kind = kind_of(spec)
    rundir.atomic_write_text(os.path.join(run_dir, rundir.MARKER), dump_yaml(spec.document))
    if spec.plugins:
        # The run's copy of the spec lies elsewhere than the plugins: say where they were found.
        rundir.write_json(os.path.join(run_dir, PLUGINS), {"modules": list(spec.plugins),
                                                           "folders": plugin_folders(spec.plugins)})
    rundir.write_json(os.path.join(run_dir, "data.json"), kind.data_document(spec, data))
    for name, text in kind.data_files(spec, data).items():
        rundir.atomic_write_text(os.path.join(run_dir, name), text)


def run_compile_and_search(spec, run_dir, overwrite=False, search_only=False, progress=False):
    """Validate-compile-search-derive, then retrain and export as the spec asks.

    A run directory that already holds this spec's run is resumed: the search
    from its last checkpoint, and steps already finished are not repeated.
    With ``search.deterministic`` the whole run (search and retraining) runs
    with TensorFlow's op determinism on and one kernel at a time.
    """
    configure_kernel_threads(spec)  # before TensorFlow starts its runtime
    with op_determinism(spec.search.deterministic):
        return _run(spec, run_dir, overwrite, search_only, progress)


def _run(spec, run_dir, overwrite, search_only, progress):
    # A multi-worker strategy must exist before TensorFlow does anything else.
    strategy = make_strategy(spec.distribute, spec.source)
    kind = kind_of(spec)
    if strategy is not None and not is_chief(strategy):
        # It reads the chief's checkpoints when run_dir is on a filesystem both share.
        log.info("this worker takes part in the search and retraining and writes nothing; the chief writes %s",
                 run_dir)
        data = kind.load_data(spec)
        report = RunReport(run_dir, kind)
        report.search = search(spec, run_dir=run_dir, data=data, progress=progress, strategy=strategy)
        if not search_only and spec.retrain.enabled and kind.distributed_retraining:
            report.retrain = retrain_run(spec, report.search.derived, data, run_dir, progress, strategy, writes=False)
        return report
    # What an earlier run finished, from the run directory alone (only a run of this spec is resumed).
    # Workers of a cluster go through every stage together, each agreeing on where it starts.
    cluster = strategy is not None and getattr(strategy, "cluster_resolver", None) is not None
    done = _finished_stages(spec, run_dir, overwrite or cluster, search_only)
    data = kind.load_data(spec) if not all(done.values()) else None  # fails before anything is written
    resuming = rundir.prepare_run(run_dir, spec, overwrite=overwrite)
    if resuming:
        log.info("%s holds this spec's run: resuming it (--overwrite starts over)", run_dir)
    else:
        write_run_header(spec, data, run_dir)
    report = RunReport(run_dir, kind)
    report.artifacts["spec"] = os.path.join(run_dir, rundir.MARKER)
    if done["search"]:
        report.search = finished_search(run_dir)
        log.info("the search finished in an earlier run (%d epochs); derived.yaml holds its result",
                 len(report.search.history))
    else:
        report.search = search(spec, run_dir=run_dir, data=data, progress=progress, strategy=strategy)
    report.artifacts["search history"] = os.path.join(run_dir, "search", "history.csv")
    report.artifacts["derived spec"] = os.path.join(run_dir, "derived.yaml")
    report.artifacts["pictures"] = os.path.join(run_dir, "plots") if done["search"] else plot_run(run_dir)
    report.artifacts["tensorboard"] = os.path.join(run_dir, "tensorboard")
    if search_only or not spec.retrain.enabled:
        return report
    if done["retrain"]:
        report.retrain = load_retrain_result(run_dir, model=not done["export"])
        log.info("the retraining finished in an earlier run")
    else:
        report.retrain = retrain_run(spec, report.search.derived, data, run_dir, progress, strategy)
    report.artifacts["retrained model"] = os.path.join(run_dir, "retrain", "model.keras")
    report.artifacts["test metrics"] = os.path.join(run_dir, "retrain", "metrics.json")
    exported = None
    if spec.export.enabled and done["export"]:
        exported = rundir.read_json(os.path.join(run_dir, "export", REPORT))
    elif spec.export.enabled:
        exported = export_run(run_dir, model=report.retrain.model, data=data)
        for line in report_lines(exported):
            log.info("%s", line)
    if exported:
        report.artifacts.update({form.replace("_", " "): entry["path"]
                                 for form, entry in exported["formats"].items()})
        report.artifacts["export report"] = os.path.join(run_dir, "export", REPORT)
    if spec.retrain.compare_random:
        from .compare import compare_with_random

        log.info("comparing the searched cell with %d random cells of its space (retrain.compare_random)",
                 spec.retrain.compare_random)
        report.comparison = compare_with_random(spec, run_dir, report.search.derived, report.retrain, data, progress)
        report.artifacts["comparison"] = os.path.join(run_dir, "compare", "results.md")
    return report


def _finished_stages(spec, run_dir, overwrite, search_only):
    """Which stages a resumed run directory of ``spec`` holds finished: search, retrain, export.

    A stage that will not run counts as finished. Nothing is finished in a run
    directory that will be emptied, or that holds another spec's run (which
    ``prepare_run`` refuses), or for a worker of a cluster (``overwrite`` true).
    """
    resumable = not overwrite and rundir.holds_run_of(run_dir, spec)
    retrains = not search_only and spec.retrain.enabled

    def holds(item):
        return resumable and os.path.exists(os.path.join(run_dir, item))

    search_done = holds(SEARCH_FINISHED)
    retrain_done = search_done and (not retrains or holds(os.path.join("retrain", "metrics.json")))
    export_done = retrain_done and (not retrains or not spec.export.enabled or holds(os.path.join("export", REPORT)))
    return {"search": search_done, "retrain": retrain_done, "export": export_done}


def plot_run(run_dir):
    """The pictures of a run's search under ``run_dir/plots``."""
    from .plots import make_plots  # matplotlib: only where pictures are drawn

    for item in (os.path.join("search", "history.json"), "derived.yaml"):
        if not os.path.exists(os.path.join(run_dir, item)):
            raise rundir.RunDirectoryError.single(run_dir, item, "missing; run a search into it first")
    make_plots(run_dir)
    return os.path.join(run_dir, "plots")


def import_run_plugins(run_dir):
    """Import the plugins the run's spec names, so its saved models reload; return the run's kind."""
    marker = os.path.join(run_dir, rundir.MARKER)
    found = os.path.join(run_dir, PLUGINS)
    folders = rundir.read_json(found)["folders"] if os.path.exists(found) else ()
    document = read_yaml_file(marker)
    import_plugins(document.get("plugins"), marker, folders=folders)
    return kind_of(document["search_space"]["kind"])


def load_retrain_result(run_dir, model=True):
    """The result of a finished retraining, read back from ``run_dir/retrain`` (``model=False``: without the model)."""
    kind = import_run_plugins(run_dir)
    metrics = rundir.read_json(os.path.join(run_dir, "retrain", "metrics.json"))
    history = rundir.read_json(os.path.join(run_dir, "retrain", "history.json"))
    loaded = keras.saving.load_model(os.path.join(run_dir, "retrain", "model.keras")) if model else None
    return kind.retrain_result(run_dir, loaded, metrics, history)


def retrain_run(spec, derived, data, run_dir, progress=False, strategy=None, writes=True):
    """Retrain ``derived`` as ``spec`` says, under ``strategy`` where the kind retrains distributed."""
    return kind_of(spec).retrain(spec, derived, data, run_dir=run_dir, progress=progress, strategy=strategy,
                                 writes=writes)


def check_retrainable(spec, derived):
    """Raise ``SpecError`` unless ``spec`` can retrain ``derived``."""
    kind_of(spec).check_retrainable(spec, derived)


def export_run(run_dir, model=None, data=None, formats=None):
    """Export ``run_dir``'s retrained model in the spec's ``export.formats`` (or ``formats``).

    Every file is verified in a fresh process and timed; returns the report
    that ``export/report.json`` holds. The data is loaded when a TFLite or
    ONNX file needs it (calibration, accuracy on the test split) and not given.
    """
    from .deploy import check_requirements, converted_formats
    from .precision import set_precision

    # Formats asked for are checked as the spec's own would be (a kind may refuse some).
    spec = load_run_spec(run_dir, [f"export.formats=[{', '.join(formats)}]"] if formats else [])
    rundir.require_run(run_dir, "data.json")
    kind = kind_of(spec)
    config = spec.export
    check_requirements(config.formats, os.path.join(run_dir, rundir.MARKER))  # before anything is loaded
    info = rundir.read_json(os.path.join(run_dir, "data.json"))
    if model is None:
        rundir.require_run(run_dir, os.path.join("retrain", "model.keras"))
        model = keras.saving.load_model(os.path.join(run_dir, "retrain", "model.keras"))
    if data is None and converted_formats(config.formats):
        data = kind.load_data(spec)
    # A network retrained in mixed precision is exported computing in float32 (its weights are float32).
    set_precision(model, "float32")
    document = kind.export(run_dir, info, model=model, data=data, config=config)
    path = os.path.join(run_dir, "export", REPORT)
    if os.path.exists(path):  # an export of some formats keeps what an earlier one said of the others
        earlier = rundir.read_json(path)["formats"]
        document["formats"] = {**{form: entry for form, entry in earlier.items() if os.path.exists(entry["path"])},
                               **document["formats"]}
    rundir.write_json(path, document)
    return document


def load_run_spec(run_dir, overrides=()):
    """The resolved spec a run directory holds, with ``overrides`` (``key.path=value``) applied."""
    rundir.require_run(run_dir)
    import_run_plugins(run_dir)
    return load_spec(os.path.join(run_dir, rundir.MARKER), overrides=list(overrides))


def summary_lines(report):
    lines = []
    kind = report.kind
    if report.search and report.search.history:
        last = report.search.history[-1]
        value = kind.metric_format.format(last[f"val_{kind.metric}"])
        lines.append(f"search: {len(report.search.history)} epochs, final val {kind.metric} {value}")
        lines.append(f"genotype: {last['genotype']}")
    if report.retrain:
        lines.append(kind.retrain_summary(report.retrain))
    if report.comparison:
        from .compare import comparison_lines, summary_rows

        lines += comparison_lines(kind, summary_rows(kind, report.comparison))
    for name, path in report.artifacts.items():
        lines.append(f"{name + ':':18s}{path}")
    return lines
