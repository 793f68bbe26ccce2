"""The run directory: where each artifact of a run goes.

Spec, data, history, derived-spec and alpha files are written atomically
(temporary file and rename); the Keras model and the SavedModel are written
by Keras and TensorFlow.

    <run>/spec.yaml                 the resolved spec (extends and overrides applied)
    <run>/data.json                 dataset name, shape, classes, normalisation
    <run>/search/history.json|.csv  per-epoch losses, accuracies, learning rates, alphas, genotype
    <run>/search/alphas.npz         final architecture parameters
    <run>/search/derived/epoch_NNN.yaml
    <run>/derived.yaml              the derived spec of the search's last epoch
    <run>/search/finished.json      written last when the search finishes: its results above are complete
    <run>/retrain/model.keras, history.json|.csv, metrics.json
                                    (model.keras: the network behind its input normalisation)
    <run>/export/saved_model/
"""

import csv
import io
import json
import os
import shutil
import tempfile

import numpy as np

from keras_darts.spec import RunDirectoryError, dump_yaml

MARKER = "spec.yaml"


def atomic_write(path, write, mode="w"):
    """Write ``path`` through ``write(handle)`` into a temporary file, then rename:
    a crash leaves the old file or the new one, never half of one."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def atomic_write_text(path, text):
    atomic_write(path, lambda out: out.write(text))


def write_npz(path, arrays):
    atomic_write(path, lambda out: np.savez(out, **arrays), mode="wb")


def write_yaml(path, document):
    atomic_write_text(path, dump_yaml(document))


def write_json(path, document):
    atomic_write_text(path, json.dumps(document, indent=2, sort_keys=False) + "\n")


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_history_csv(path, history):
    """Scalar columns of a list of per-epoch records as CSV."""
    if not history:
        return
    columns = []
    for record in history:  # later epochs may add columns (an early-stopping rule that fired)
        columns += [k for k, v in record.items() if isinstance(v, (int, float, str)) and k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


def default_run_dir(spec):
    return os.path.join("runs", spec.name)


def prepare_new_run(path, overwrite=False):
    """Make ``path`` ready for a new run; refuse to clobber an earlier run's results.

    A directory that exists and is not empty is only emptied with
    ``overwrite=True``; otherwise ``RunDirectoryError``, and nothing is touched.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirectoryError.single(path, "--run-dir", "exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise RunDirectoryError.single(
                path, "--run-dir", f"already holds a run ({', '.join(sorted(os.listdir(path))[:4])}); "
                "pass --overwrite to start over, or choose another --run-dir"
            )
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    return path


def holds_run_of(path, spec):
    """Whether ``path`` holds a run of ``spec`` (its ``spec.yaml`` has the same canonical hash)."""
    from keras_darts.spec import canonical_sha256, read_yaml_file

    marker = os.path.join(path, MARKER)
    return os.path.isfile(marker) and canonical_sha256(read_yaml_file(marker)) == spec.sha256


def prepare_run(path, spec, overwrite=False):
    """Make ``path`` ready for ``spec``'s run; return True when it resumes an earlier run of the same spec.

    A run directory whose ``spec.yaml`` is the same spec (same canonical hash)
    is resumed. Any other non-empty directory is refused unless
    ``overwrite``, which starts over; nothing is touched before that decision.
    """
    if not overwrite and os.path.isfile(os.path.join(path, MARKER)):
        if holds_run_of(path, spec):
            return True
        raise RunDirectoryError.single(
            path, "--run-dir", f"holds a run of another spec (its {MARKER} differs from {spec.source}); "
            "pass --overwrite to start over, or choose another --run-dir"
        )
    prepare_new_run(path, overwrite=overwrite)
    return False


def require_run(path, *needed):
    """Check that ``path`` is a run directory holding ``needed`` (relative paths)."""
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise RunDirectoryError.single(path, MARKER, "missing: not a keras-darts run directory")
    for item in needed:
        if not os.path.exists(os.path.join(path, item)):
            raise RunDirectoryError.single(path, item, "missing; run the step that makes it first")
