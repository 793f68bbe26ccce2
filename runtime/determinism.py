"""How TensorFlow runs kernels during a run: op determinism, and one kernel at a time where a run needs it.

Both are process-wide TensorFlow settings. ``op_determinism`` turns
determinism on for a block and back off after it. Inter-op threading cannot
be changed once TensorFlow has started its runtime: ``compile-and-search``
(``run_compile_and_search``) calls ``serialize_kernels_if_needed`` before
anything else; from Python, call it first or set ``TF_NUM_INTEROP_THREADS=1``,
and ``search`` warns when it is missing.
"""

import contextlib
import logging
import os

import tensorflow as tf

log = logging.getLogger(__name__)


def _why_serial(spec):
    """Why ``spec``'s run needs TensorFlow's kernels one at a time, or ``None``."""
    if spec.search.deterministic:
        return ("search.deterministic needs TensorFlow's kernels run one at a time (op determinism does not fix "
                "the order in which concurrently run kernels' gradients are summed: a language-model search "
                "then differs from run to run in the last bits, and the differences grow)")
    return None


def _serial():
    return tf.config.threading.get_inter_op_parallelism_threads() == 1 or os.environ.get("TF_NUM_INTEROP_THREADS") == "1"


def serialize_kernels_if_needed(spec):
    """Run TensorFlow's kernels one at a time where the run needs it; True if they do.

    Measured on TensorFlow 2.21's CPU kernels: with concurrent kernels a
    language-model search step differs from run to run in the last bits
    (about 1e-7) even under op determinism, so ``search.deterministic`` runs
    one kernel at a time.

    It must be set before TensorFlow starts its runtime (the CLI does so);
    later, a warning says how (``TF_NUM_INTEROP_THREADS=1``).
    """
    why = _why_serial(spec)
    if why is None:
        return False
    if _serial():
        return True
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        log.warning("%s; TensorFlow has started already, so set TF_NUM_INTEROP_THREADS=1 before starting Python",
                    why)
        return False
    log.info("%s: TensorFlow runs one kernel at a time", why.split(" needs ")[0])
    return True


@contextlib.contextmanager
def op_determinism(enabled):
    """TensorFlow's op determinism on inside the block when ``enabled``, as it was after it.

    TensorFlow's public API can only switch it on; the switch back uses its
    internal ``disable_op_determinism`` (TensorFlow is pinned).
    """
    from tensorflow.python.framework import config as tf_config

    was_enabled = tf_config.is_op_determinism_enabled()
    if enabled and not was_enabled:
        tf_config.enable_op_determinism()
    try:
        yield
    finally:
        if enabled and not was_enabled:
            tf_config.disable_op_determinism()


def warn_unless_kernels_serialized(spec):
    """Warn when the run needs one kernel at a time (see ``serialize_kernels_if_needed``) and kernels run concurrently."""
    why = _why_serial(spec)
    if why is not None and not _serial():
        log.warning("%s: call serialize_kernels_if_needed(spec) before TensorFlow runs anything, or set "
                    "TF_NUM_INTEROP_THREADS=1 before starting Python", why)
