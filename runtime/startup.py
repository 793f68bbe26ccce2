"""TensorFlow's start without its start-up noise in the user's terminal.

Importing TensorFlow and probing for CUDA write lines straight to file
descriptor 2, before any Python logging is set up: absl's notice that it is
not initialised, oneDNN's note, "Could not find cuda drivers" and "failed
call to cuInit" on a machine without a GPU. ``import_tensorflow_quietly``
runs that start with descriptor 2 sent to a temporary file, then writes back
every line that is not one of those known notices, so a real warning or
error still reaches the terminal. ``KERAS_DARTS_DEBUG=1`` shows everything.

Keras, imported with TensorFlow, imports scikit-learn (for its scikit-learn
wrappers) and matplotlib's pyplot (for its image gallery) where they are
installed, as they are beside keras_darts: a second and a half of a 5 s start
on a 2-core AMD EPYC. keras_darts uses neither of those Keras features, so its
own processes (the CLI) start TensorFlow with the two kept out of Keras'
import (``without_keras_extras``); they import as usual afterwards, for
keras_darts' plots and built-in digits data or a plugin's own use. Only
Keras' scikit-learn wrappers (``keras.wrappers``) stay unusable in such a
process, as if scikit-learn was not installed.
"""

import contextlib
import os
import re
import sys
import tempfile

# The lines TensorFlow 2.21 writes at every start on a CPU-only machine, and nothing else.
START_NOTICES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
    r"|^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags"
)


@contextlib.contextmanager
def descriptor_2_filtered(pattern=START_NOTICES):
    """Send file descriptor 2 to a temporary file; afterwards write back the lines ``pattern`` does not match."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not pattern.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


# What Keras imports at its own import, where installed, for features keras_darts does not use.
KERAS_EXTRAS = ("sklearn", "matplotlib")


@contextlib.contextmanager
def modules_kept_out(names):
    """Within, importing any of ``names`` (or a submodule) raises ImportError as if it was not installed.

    Names already imported are left alone, and afterwards every name imports as usual.
    """
    kept_out = [name for name in names if name not in sys.modules]
    for name in kept_out:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in kept_out:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def import_tensorflow_quietly(without_keras_extras=False):
    """Import TensorFlow and list its devices (CUDA's probe) without the start-up notices; return the module.

    ``without_keras_extras``: Keras' import leaves out scikit-learn and pyplot (``KERAS_EXTRAS``, see above),
    for a process of keras_darts' own.
    """
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    with modules_kept_out(KERAS_EXTRAS if without_keras_extras else ()):
        if os.environ.get("KERAS_DARTS_DEBUG") == "1":
            import tensorflow as tf
        else:
            with descriptor_2_filtered():
                import tensorflow as tf

                tf.config.list_physical_devices()
    return tf
