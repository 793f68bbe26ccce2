"""Second derivatives through max pooling that do not depend on the order kernels run in.

TensorFlow 2.21 differentiates a max pooling's gradient (``MaxPoolGrad``)
with the ``MaxPoolGradGrad`` kernel. On a CPU that kernel takes its
``grad`` input's buffer for its output whenever no other kernel still holds
that buffer and the pooling keeps the shape (stride 1, ``SAME``, as the
normal cells' ``max_pool_3x3``), then zeroes the output before reading the
input: the second derivative comes out wrong. Whether it does depends on
the order in which the graph's kernels ran, so exact second order's
mixed Hessian-vector product was right in some runs and wrong in others.
Inside a ``tf.function`` whose only use of that ``grad`` is the kernel, it
is wrong every time (``tests/runtime/test_second_derivatives.py``).

``install()`` gives ``MaxPoolGrad`` (and ``MaxPoolGradV2``) a gradient
that computes the same thing without that kernel: the incoming gradient
picked at each window's maximum, located by ``MaxPoolWithArgmax``, which
takes the first maximum in a window as ``MaxPoolGrad`` and
``MaxPoolGradGrad`` do. The gradients of the pooling's input and output
are zero, as in TensorFlow's own rule, but given as none, so the tape has
no tensors of zeros to build and add. TensorFlow has no public way to
replace a registered gradient, so the entry in its registry is swapped
(TensorFlow is pinned). The swap is process-wide and only ever gives the
right value. TensorFlow's rule stays where its kernel is not the CPU's
(an op placed on a GPU or TPU, or placed by TensorFlow on a machine that
has one: their kernels do not reuse that input, and XLA has no
``MaxPoolWithArgmax``) and what the replacement does not cover (``NCHW``,
explicit padding, window sizes known only at run time).
"""

import threading

import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops

from .graph_build import accelerated

_LOCK = threading.Lock()
_ORIGINAL = {}


def _on_cpu(op):
    """Whether ``op``'s pooling runs on a CPU: placed there, or unplaced on a machine without GPU or TPU.

    Tapes pass a stand-in for the op without its device; its inputs' tensors have theirs.
    """
    device = op.inputs[1].device  # the pooling's output
    if device:
        return tf.DeviceSpec.from_string(device).device_type == "CPU"
    return not accelerated()


def _window_of_attributes(op):
    return op.get_attr("ksize"), op.get_attr("strides")


def _window_of_inputs(op):
    return tf.get_static_value(op.inputs[3]), tf.get_static_value(op.inputs[4])


# Each replaced op's type, and where its window's size and strides are.
_WINDOWS = {"MaxPoolGrad": _window_of_attributes, "MaxPoolGradV2": _window_of_inputs}


def _picked_at_maxima(op, grad, ksize, strides):
    """``grad`` at each pooling window's first maximum of ``op``'s input, or ``None`` where not covered."""
    padding = op.get_attr("padding")
    if (not _on_cpu(op) or op.get_attr("data_format") != b"NHWC" or padding not in (b"SAME", b"VALID")
            or ksize is None or strides is None):
        return None
    pooled_input, pooled = op.inputs[0], op.inputs[1]
    _, argmax = tf.nn.max_pool_with_argmax(pooled_input, list(ksize), list(strides), padding.decode(),
                                           include_batch_in_index=True)
    return tf.reshape(tf.gather(tf.reshape(grad, [-1]), argmax), tf.shape(pooled))


def _max_pool_grad_grad(op, grad):
    """The gradient of ``MaxPoolGrad`` or ``MaxPoolGradV2`` (``op.type``), TensorFlow's where not covered."""
    picked = _picked_at_maxima(op, grad, *_WINDOWS[op.type](op))
    if picked is None:
        return _ORIGINAL[op.type](op, grad)
    # Zero for the pooling's input and output, where TensorFlow's builds tensors of zeros for the tape to add;
    # none for V2's window tensors.
    return (None, None, picked) + (None,) * (len(op.inputs) - 3)


def install():
    """Give ``MaxPoolGrad`` and ``MaxPoolGradV2`` the gradient above, once per process (idempotent)."""
    registry = tf_ops._gradient_registry._registry
    with _LOCK:
        for name in _WINDOWS:
            if name not in _ORIGINAL:
                _ORIGINAL[name] = registry[name]["type"]
                registry[name] = {**registry[name], "type": _max_pool_grad_grad}
