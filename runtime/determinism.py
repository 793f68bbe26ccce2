"""How TensorFlow runs kernels during a run: its CPU threads, op determinism, one kernel at a time.

All are process-wide TensorFlow settings. ``op_determinism`` turns
determinism on for a block and back off after it. The threads
(``distribute.threads``, and one kernel at a time for ``search.deterministic``)
cannot be changed once TensorFlow has started its runtime:
``compile-and-search`` (``run_compile_and_search``) calls
``configure_kernel_threads`` before anything else; from Python, call it first
(or set ``TF_NUM_INTEROP_THREADS`` / ``TF_NUM_INTRAOP_THREADS``), and
``search`` warns when a deterministic run's kernels are not one at a time.
"""

import contextlib
import logging
import os

import tensorflow as tf

log = logging.getLogger(__name__)

# ``auto`` runs one thread per kernel on CPU-only machines with at most this many cores. Measured on 2
# cores (benchmarks/README.md, 2026-12-06): a SMALL second-order search iteration 1.89x faster than with
# TensorFlow's own threads, PAPER's 1.12x, the quickstart's about 1.5x. A supernet has at least 14
# independent kernel chains per node (2 inputs x 7 operations), so up to 4 cores stay busy without
# splitting a kernel; beyond, it is not measured.
ONE_THREAD_PER_KERNEL_CORES = 4
THREAD_VARIABLES = ("TF_NUM_INTEROP_THREADS", "TF_NUM_INTRAOP_THREADS")


def cores():
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_kernel_threads():
    """``(inter_op, intra_op)`` for ``distribute.threads: auto``; 0 is TensorFlow's own choice."""
    if any(os.environ.get(name) for name in THREAD_VARIABLES):
        return 0, 0
    count = cores()
    if count > ONE_THREAD_PER_KERNEL_CORES or tf.config.list_physical_devices("GPU"):
        return 0, 0
    return count, 1


def kernel_threads(spec):
    """``(inter_op, intra_op)`` for ``spec``'s run (``distribute.threads``, ``search.deterministic``); 0: TensorFlow's."""
    threads = spec.distribute.threads
    inter, intra = threads.inter_op, threads.intra_op
    if _why_serial(spec) is not None:
        return 1, (0 if intra == "auto" else intra)
    if "auto" in (inter, intra):
        auto_inter, auto_intra = auto_kernel_threads()
        inter = auto_inter if inter == "auto" else inter
        intra = auto_intra if intra == "auto" else intra
    return inter, intra


def set_kernel_threads(inter_op, intra_op):
    """Set TensorFlow's inter-op and intra-op threads (0 leaves one as it is); False when its runtime already runs
    with others."""
    try:
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    except RuntimeError:  # TensorFlow's runtime has started with other values
        return False
    return True


def configure_kernel_threads(spec):
    """Set TensorFlow's threads for ``spec``'s run, before TensorFlow starts its runtime; ``(inter_op, intra_op)``.

    Measured on TensorFlow 2.21's CPU kernels: with concurrent kernels a
    language-model search step differs from run to run in the last bits
    (about 1e-7) even under op determinism, so ``search.deterministic`` runs
    one kernel at a time. Called after TensorFlow's start, the run keeps the
    threads it has; a warning says so when the spec asked for other numbers
    or for one kernel at a time (``auto`` only saves time, so it says nothing).
    """
    inter, intra = kernel_threads(spec)
    why = _why_serial(spec)
    threads = spec.distribute.threads
    if not set_kernel_threads(inter, intra):
        if why is not None and not _serial():
            log.warning("%s; TensorFlow has started already, so set TF_NUM_INTEROP_THREADS=1 before starting Python",
                        why)
        elif why is None and (threads.inter_op, threads.intra_op) != ("auto", "auto"):
            log.warning("distribute.threads asks for %s inter-op and %s intra-op threads, but TensorFlow has started "
                        "already with others; set TF_NUM_INTEROP_THREADS and TF_NUM_INTRAOP_THREADS before starting "
                        "Python", inter or "TensorFlow's", intra or "TensorFlow's")
    elif why is not None:
        log.info("%s: TensorFlow runs one kernel at a time", why.split(" needs ")[0])
    elif inter or intra:
        log.info("threads: %s at once, %s each (distribute.threads; %d CPU cores)",
                 _count(inter, "kernel"), _count(intra, "thread"), cores())
    return inter, intra


def _count(number, noun):
    return f"{number} {noun}{'' if number == 1 else 's'}" if number else f"TensorFlow's number of {noun}s"


def _why_serial(spec):
    """Why ``spec``'s run needs TensorFlow's kernels one at a time, or ``None``."""
    if spec.search.deterministic:
        return ("search.deterministic needs TensorFlow's kernels run one at a time (op determinism does not fix "
                "the order in which concurrently run kernels' gradients are summed: a language-model search "
                "then differs from run to run in the last bits, and the differences grow)")
    return None


def _serial():
    return tf.config.threading.get_inter_op_parallelism_threads() == 1 or os.environ.get("TF_NUM_INTEROP_THREADS") == "1"


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
    """Warn when the run needs one kernel at a time (see ``configure_kernel_threads``) and kernels run concurrently."""
    why = _why_serial(spec)
    if why is not None and not _serial():
        log.warning("%s: call configure_kernel_threads(spec) before TensorFlow runs anything, or set "
                    "TF_NUM_INTEROP_THREADS=1 before starting Python", why)
