"""One training loop for search, image retraining and language-model retraining, with callbacks.

``Loop(task, epochs, callbacks).run()`` runs epochs of steps:

    checkpointing.resume                (restores the latest checkpoint, before any callback)
    on_train_begin
    per epoch: task.begin_epoch, on_epoch_begin
        per step: task.step -> (values, weight); the guard may roll back or stop;
                  task.accept; state.step, state.iteration += 1; on_train_batch_end
        task.end_epoch -> record; appended to the history; on_epoch_end
    on_train_end

The task supplies the steps; everything around them (progress, history files,
checkpoints, TensorBoard, diagnostics, early stopping) is a ``Callback``, in
Keras' idiom, so that the three loops share it. ``LoopState`` is the
position and what the loop carries, written into every checkpoint as JSON; a
task keeps its own arrays (hidden states, averaged weights) in the
checkpoint through ``arrays``/``load_arrays``.
"""

import dataclasses
import logging
import os
import time

from tqdm.auto import tqdm

from . import rundir
from .distribution import check_workers_agree

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoopState:
    """Where a loop is and what it carries; ``to_document`` is its checkpoint form."""

    epoch: int = 0  # epochs finished
    step: int = 0  # steps finished in the current epoch
    iteration: int = 0  # steps finished in all
    history: list = dataclasses.field(default_factory=list)  # one record per finished epoch
    sums: dict = dataclasses.field(default_factory=dict)  # weighted sums of step values in this epoch
    weight: float = 0.0  # the weight behind ``sums``
    stopped_by: object = None  # the early-stopping rule that fired
    rollbacks: int = 0
    lr_scale: float = 1.0
    extra: dict = dataclasses.field(default_factory=dict)  # what a task keeps from epoch to epoch (JSON)

    def to_document(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_document(cls, document):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in document.items() if k in known})

    def means(self):
        return {key: value / max(self.weight, 1e-12) for key, value in self.sums.items()}


class Callback:
    """Hooks at the loop's boundaries; ``loop.state`` is the current ``LoopState``."""

    def on_train_begin(self, loop):
        pass

    def on_epoch_begin(self, loop, epoch):
        pass

    def on_train_batch_end(self, loop, logs):
        pass

    def on_epoch_end(self, loop, record):
        pass

    def on_train_end(self, loop):
        pass


class Loop:
    """Runs ``task`` for ``epochs`` with ``callbacks``; ``guard(loop, values)`` may replace the state (a rollback).

    A ``Checkpointing`` callback among them resumes the loop before any
    callback's ``on_train_begin``, and saves after the others' hooks (it
    runs last), so a checkpoint holds what they added to the record.
    """

    def __init__(self, task, epochs, callbacks=(), guard=None, state=None):
        self.task = task
        self.epochs = epochs
        resuming = [c for c in callbacks if isinstance(c, Checkpointing)]
        self.callbacks = [c for c in callbacks if not isinstance(c, Checkpointing)] + resuming
        self.checkpointing = resuming[0] if resuming else None
        self.guard = guard
        self.state = state or LoopState()

    def _call(self, hook, *args):
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def run(self):
        if self.checkpointing is not None:
            self.checkpointing.resume(self)
        self._call("on_train_begin")
        while self.state.epoch < self.epochs and not self.state.stopped_by:
            state = self.state
            epoch = state.epoch
            started = time.perf_counter()
            self.task.begin_epoch(state)
            self._call("on_epoch_begin", epoch)
            rolled_back = False
            for inputs in self.task.batches(state):
                began = time.perf_counter()
                values, weight = self.task.step(inputs, state)
                seconds = time.perf_counter() - began
                if self.guard is not None:
                    restored = self.guard(self, values)
                    if restored is not None:
                        self.state = restored
                        rolled_back = True
                        break
                self.task.accept()
                for key, value in values.items():
                    state.sums[key] = state.sums.get(key, 0.0) + value * weight
                state.weight += weight
                state.step += 1
                state.iteration += 1
                self._call("on_train_batch_end", {**values, "step_seconds": seconds})
            if rolled_back:
                continue
            record = self.task.end_epoch(state, time.perf_counter() - started)
            state.history.append(record)
            state.epoch, state.step, state.sums, state.weight = epoch + 1, 0, {}, 0.0
            self._call("on_epoch_end", record)
        self._call("on_train_end")
        return self.state


class ProgressBar(Callback):
    """A tqdm bar per epoch with the running mean training loss."""

    def __init__(self, label, enabled=True):
        self.label = label
        self.enabled = enabled
        self.bar = None

    def on_epoch_begin(self, loop, epoch):
        if self.bar is not None:  # a rollback left the epoch without its on_epoch_end
            self.bar.close()
        self.bar = tqdm(total=loop.task.steps_in_epoch(epoch), initial=loop.state.step,
                        desc=f"{self.label} {epoch + 1}/{loop.epochs}", disable=not self.enabled, leave=False,
                        unit="step")

    def on_train_batch_end(self, loop, logs):
        self.bar.update(1)
        means = loop.state.means()
        if "train_loss" in means:
            self.bar.set_postfix(loss=f"{means['train_loss']:.3f}")

    def on_epoch_end(self, loop, record):
        self.bar.close()


class HistoryFiles(Callback):
    """``history.json`` (every record) and ``history.csv`` (their scalar columns) in ``folder``, after every epoch."""

    def __init__(self, folder):
        self.folder = folder

    def on_epoch_end(self, loop, record):
        rundir.write_json(os.path.join(self.folder, "history.json"), loop.state.history)
        rundir.write_history_csv(os.path.join(self.folder, "history.csv"), loop.state.history)


class Checkpointing(Callback):
    """Resume from the latest checkpoint; save every ``every_steps`` iterations and after every epoch.

    ``keep_start`` holds the starting state in memory when there is no
    checkpoint yet (a search keeps it to roll back to before its first
    checkpoint); the first checkpoint on disk follows the first steps.
    """

    def __init__(self, checkpoints, every_steps=None, keep_start=False, name="run"):
        self.checkpoints = checkpoints
        self.every_steps = every_steps
        self.keep_start = keep_start
        self.name = name

    def save(self, loop):
        if self.checkpoints.writes:
            self.checkpoints.save(loop.state.to_document(), loop.task.arrays())

    def restore(self, loop, name=None):
        """Load checkpoint ``name`` (default: the latest on disk) into the variables and the task; return its state."""
        document, arrays = self.checkpoints.restore(name)
        loop.task.load_arrays(arrays)
        return LoopState.from_document(document)

    def latest(self):
        return self.checkpoints.latest()

    def last_good(self):
        """What a rollback restores: the newest checkpoint, or the start held in memory (``checkpoint.START``)."""
        return self.checkpoints.last_good()

    def resume(self, loop):
        """Before any callback runs: restore the latest checkpoint, or save the start where asked."""
        if self.checkpoints.latest():
            loop.state = self.restore(loop)
            state = loop.state
            if state.epoch >= loop.epochs or state.stopped_by:
                log.info("%s finished in an earlier run (%d epochs); its checkpoint gives the result", self.name,
                         state.epoch)
            else:
                log.info("resuming %s from its checkpoint: epoch %d, step %d (iteration %d)", self.name,
                         state.epoch + 1, state.step, state.iteration)
        elif self.keep_start:
            self.checkpoints.keep_start(loop.state.to_document(), loop.task.arrays())

    def on_train_batch_end(self, loop, logs):
        if self.every_steps and loop.state.iteration % self.every_steps == 0:
            self.save(loop)

    def on_epoch_end(self, loop, record):
        self.save(loop)


class WorkersAgree(Callback):
    """Every worker starts at the same iteration, or all stop (``RunDirectoryError``)."""

    def __init__(self, strategy, what, run_dir):
        self.strategy, self.what, self.run_dir = strategy, what, run_dir

    def on_train_begin(self, loop):
        check_workers_agree(self.strategy, loop.state.iteration, self.what, self.run_dir)
