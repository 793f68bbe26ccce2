"""TensorFlow's start without its start-up noise in the user's terminal.

Importing TensorFlow and probing for CUDA write lines straight to file
descriptor 2, before any Python logging is set up: absl's notice that it is
not initialised, oneDNN's note, "Could not find cuda drivers" and "failed
call to cuInit" on a machine without a GPU. ``import_tensorflow_quietly``
runs that start with descriptor 2 sent to a temporary file, then writes back
every line that is not one of those known notices, so a real warning or
error still reaches the terminal. ``KERAS_DARTS_DEBUG=1`` shows everything.
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


def import_tensorflow_quietly():
    """Import TensorFlow and list its devices (CUDA's probe) without the start-up notices; return the module."""
    if os.environ.get("KERAS_DARTS_DEBUG") == "1" or "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    with descriptor_2_filtered():
        import tensorflow as tf

        tf.config.list_physical_devices()
    return tf
