"""Checkpoints of a search or a retraining that a crash cannot break.

A checkpoint holds every variable of the model (weights, alphas, BN moving
averages, random-generator states), the optimisers' states, the loop's
position and counters (``state.json``) and any arrays the task carries
between steps (hidden states). It is written
into a hidden temporary directory, which is then renamed into place, and only
then does ``latest.json`` (itself replaced atomically) point at it. A crash
at any moment leaves ``latest.json`` naming a complete checkpoint; stray
temporary directories are removed when the directory is opened again. The
last ``keep`` checkpoints are kept.

``keep_start`` holds the starting state in memory, not on disk, so that a
search can roll back before its first checkpoint (``restore(START)``).
"""

import glob
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from . import rundir

LATEST = "latest.json"
START = "the start of this run"  # the name ``restore`` takes for the state ``keep_start`` holds


class Checkpoints:
    """The checkpoints in ``directory`` of ``model``'s variables and the named ``optimizers``.

    ``loss_scale``: a run's loss scale (``runtime/precision.py``), kept beside
    the optimisers when it has state (float16). ``writes=False`` opens it to
    read only (a worker that is not the chief): nothing in ``directory`` is
    created, cleaned or written.
    """

    def __init__(self, directory, model, keep=2, writes=True, loss_scale=None, **optimizers):
        if getattr(loss_scale, "enabled", False):
            optimizers["loss_scale"] = loss_scale
        self.directory = directory
        self.keep = keep
        self.writes = writes
        self.checkpoint = tf.train.Checkpoint(variables={_key(v): v for v in model.variables}, **optimizers)
        self._variables = list(model.variables) + [v for o in optimizers.values() for v in o.variables]
        self._start = None
        if writes:
            os.makedirs(directory, exist_ok=True)
            for stray in glob.glob(os.path.join(directory, ".tmp-*")):
                shutil.rmtree(stray, ignore_errors=True)

    def latest(self):
        """The name of the newest complete checkpoint, or ``None``."""
        pointer = os.path.join(self.directory, LATEST)
        if not os.path.exists(pointer):
            return None
        name = rundir.read_json(pointer)["checkpoint"]
        return name if os.path.isdir(os.path.join(self.directory, name)) else None

    def save(self, state, arrays=None):
        """Write a checkpoint of the variables, ``state`` (JSON) and ``arrays``; return its name."""
        if not self.writes:
            raise RuntimeError(f"{self.directory} was opened to read only")
        name = f"iteration_{state['iteration']:09d}"
        final = os.path.join(self.directory, name)
        temporary = tempfile.mkdtemp(prefix=".tmp-", dir=self.directory)
        self.checkpoint.write(os.path.join(temporary, "variables"))
        np.savez(os.path.join(temporary, "arrays.npz"), **(arrays or {}))
        rundir.write_json(os.path.join(temporary, "state.json"), state)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(temporary, final)
        rundir.write_json(os.path.join(self.directory, LATEST), {"checkpoint": name})
        self._prune(name)
        return name

    def keep_start(self, state, arrays=None):
        """Hold the variables' values, ``state`` and ``arrays`` in memory as the checkpoint ``START``."""
        self._start = ([v.numpy() for v in self._variables], dict(state), dict(arrays or {}))

    def last_good(self):
        """The newest checkpoint on disk, else ``START`` where the start is kept, else ``None``."""
        return self.latest() or (START if self._start is not None else None)

    def restore(self, name=None):
        """Load checkpoint ``name`` (default: the latest) into the variables; return ``(state, arrays)``."""
        name = name or self.latest()
        if name == START:
            values, state, arrays = self._start
            for variable, value in zip(self._variables, values):
                variable.assign(value)
            return dict(state), dict(arrays)
        folder = os.path.join(self.directory, name)
        self.checkpoint.read(os.path.join(folder, "variables")).assert_existing_objects_matched()
        with np.load(os.path.join(folder, "arrays.npz")) as arrays:
            loaded = {key: arrays[key] for key in arrays.files}
        return rundir.read_json(os.path.join(folder, "state.json")), loaded

    def _prune(self, newest):
        names = sorted(n for n in os.listdir(self.directory) if n.startswith("iteration_"))
        for name in names[: -self.keep]:
            if name != newest:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)


class SearchCheckpoints(Checkpoints):
    """A search's checkpoints: the supernet, both optimisers and the float16 loss scale (if any)."""

    def __init__(self, directory, model, weights_optimizer, arch_optimizer, keep=2, writes=True, loss_scale=None):
        super().__init__(directory, model, keep, writes, loss_scale, weights_optimizer=weights_optimizer,
                         arch_optimizer=arch_optimizer)


def _key(variable):
    # Checkpoint keys may not contain '/'; variable paths are unique within a model.
    return variable.path.replace("/", "__")
