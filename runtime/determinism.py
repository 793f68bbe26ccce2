"""How TensorFlow runs kernels during a search: op determinism, and one kernel at a time where exact second order needs it.

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

RACING_OPERATIONS = {"max_pool_3x3", "avg_pool_3x3"}


def _races(spec):
    config = spec.search
    return (config.order == "second" and config.second_order_mode == "exact"
            and RACING_OPERATIONS <= set(spec.search_space.operations))


def serialize_kernels_if_needed(spec):
    """Run TensorFlow's kernels one at a time when exact second order would race; True if they do.

    Measured on TensorFlow 2.21's CPU kernels: the double back-propagation of
    a supernet holding both max and average pooling gives a different, wrong
    mixed Hessian-vector product from run to run when independent kernels run
    concurrently, in float32 and float64 alike; with one inter-op thread it is
    deterministic and matches float64 and central differences. It must be set
    before TensorFlow starts its runtime (the CLI does so); later, a warning
    says how (``TF_NUM_INTEROP_THREADS=1``).
    """
    if not _races(spec):
        return False
    if tf.config.threading.get_inter_op_parallelism_threads() == 1 or os.environ.get("TF_NUM_INTEROP_THREADS") == "1":
        return True
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        log.warning("exact second order with max and average pooling needs TensorFlow's kernels run one at a "
                    "time (concurrent kernels give wrong Hessian-vector products); TensorFlow has started "
                    "already, so set TF_NUM_INTEROP_THREADS=1 before starting Python")
        return False
    log.info("exact second order with max and average pooling: TensorFlow runs one kernel at a time")
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
    """Warn when exact second order would race (see ``serialize_kernels_if_needed``) and kernels run concurrently."""
    if not _races(spec):
        return
    if tf.config.threading.get_inter_op_parallelism_threads() != 1 and os.environ.get("TF_NUM_INTEROP_THREADS") != "1":
        log.warning("exact second order with max and average pooling needs TensorFlow's kernels run one at a time "
                    "(concurrent kernels give wrong Hessian-vector products): call serialize_kernels_if_needed(spec) "
                    "before TensorFlow runs anything, or set TF_NUM_INTEROP_THREADS=1 before starting Python")
