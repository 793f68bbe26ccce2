"""Max pooling's second derivative: TensorFlow's CPU kernel can be wrong; the replacement is right."""

import numpy as np
import pytest
import tensorflow as tf

from keras_darts.runtime import second_derivatives


def first_maxima(x, values, stride, padding):
    """``values`` at the first maximum of ``x`` in each 3x3 window (NHWC), by loops."""
    batch, rows, cols, channels = x.shape
    if padding == "SAME":
        out_rows, out_cols = -(-rows // stride), -(-cols // stride)
        pad_rows = max((out_rows - 1) * stride + 3 - rows, 0) // 2
        pad_cols = max((out_cols - 1) * stride + 3 - cols, 0) // 2
    else:
        out_rows, out_cols, pad_rows, pad_cols = (rows - 3) // stride + 1, (cols - 3) // stride + 1, 0, 0
    out = np.zeros((batch, out_rows, out_cols, channels))
    for b, i, j, c in np.ndindex(out.shape):
        window = [(h, w) for h in range(i * stride - pad_rows, i * stride - pad_rows + 3)
                  for w in range(j * stride - pad_cols, j * stride - pad_cols + 3)
                  if 0 <= h < rows and 0 <= w < cols]
        h, w = max(window, key=lambda hw: (x[b, hw[0], hw[1], c], -window.index(hw)))
        out[b, i, j, c] = values[b, h, w, c]
    return out


def test_tensorflows_max_pool_grad_grad_is_wrong_when_its_grad_input_is_used_by_it_alone():
    # The reason for runtime/second_derivatives.py: inside a graph, the CPU kernel takes the buffer of a
    # `grad` input that nothing else uses for its output and zeroes it before reading it.
    rng = np.random.default_rng(0)
    x, u = tf.constant(rng.normal(size=(2, 5, 5, 3))), tf.constant(rng.normal(size=(2, 5, 5, 3)))
    pooled = tf.nn.max_pool2d(x, 3, 1, "SAME")
    options = dict(ksize=[1, 3, 3, 1], strides=[1, 1, 1, 1], padding="SAME")

    @tf.function
    def alone(x, pooled, u):
        return tf.raw_ops.MaxPoolGradGrad(orig_input=x, orig_output=pooled, grad=u * 2.0, **options)

    @tf.function
    def kept(x, pooled, u):
        doubled = u * 2.0
        return tf.raw_ops.MaxPoolGradGrad(orig_input=x, orig_output=pooled, grad=doubled, **options), doubled

    expected = first_maxima(x.numpy(), 2 * u.numpy(), 1, "SAME")
    np.testing.assert_allclose(kept(x, pooled, u)[0].numpy(), expected, rtol=1e-12)
    assert np.abs(alone(x, pooled, u).numpy() - expected).max() > 1.0


POOLS = {
    "stride 1, same": lambda x: tf.nn.max_pool2d(x, 3, 1, "SAME"),
    "stride 2, valid": lambda x: tf.nn.max_pool2d(x, 3, 2, "VALID"),
    "stride 2, same, window in tensors": lambda x: tf.raw_ops.MaxPoolV2(
        input=x, ksize=tf.constant([1, 3, 3, 1]), strides=tf.constant([1, 2, 2, 1]), padding="SAME"),
}


@pytest.mark.parametrize("pool", POOLS)
def test_mixed_second_derivative_through_max_pooling_matches_central_differences(pool):
    # d/da [dL(x a)/dx . v] with L the cubed pooled values, by double back-propagation inside a graph
    # (where TensorFlow's kernel gets `grad` alone) against central differences of the first derivative.
    second_derivatives.install()
    rng = np.random.default_rng(1)
    x, v = tf.constant(rng.normal(size=(2, 7, 7, 3))), tf.constant(rng.normal(size=(2, 7, 7, 3)))

    def loss(x, a):
        return tf.reduce_sum(POOLS[pool](x * a) ** 3)

    def directional(a):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = loss(x, a)
        return tf.reduce_sum(tape.gradient(value, x) * v)

    @tf.function
    def mixed(a):
        with tf.GradientTape() as outer:
            outer.watch(a)
            dot = directional(a)
        return outer.gradient(dot, a)

    a, h = tf.constant(1.3, tf.float64), 1e-5
    value = mixed(a)
    op_types = {op.type for op in mixed.get_concrete_function(a).graph.get_operations()}
    numeric = (float(directional(a + h)) - float(directional(a - h))) / (2 * h)
    assert float(value) == pytest.approx(numeric, rel=1e-7)
    assert "MaxPoolWithArgmax" in op_types and not {"MaxPoolGradGrad", "MaxPoolGradGradV2"} & op_types


def test_the_replacement_picks_the_first_maximum_of_each_window_as_tensorflows_kernel_does():
    # Ties are the rule's only freedom: integer inputs, so many windows hold their maximum twice.
    second_derivatives.install()
    rng = np.random.default_rng(2)
    x = tf.constant(rng.integers(0, 3, size=(2, 6, 6, 2)).astype("float64"))
    u = tf.constant(rng.normal(size=(2, 6, 6, 2)))
    for stride, padding in ((1, "SAME"), (2, "SAME"), (2, "VALID")):
        pooled = tf.nn.max_pool2d(x, 3, stride, padding)

        @tf.function
        def picked(g):
            # d/dg [MaxPoolGrad(x, pooled, g) . u] is u at each window's maximum.
            with tf.GradientTape() as outer:
                outer.watch(g)
                with tf.GradientTape() as inner:
                    inner.watch(x)
                    pooled = tf.nn.max_pool2d(x, 3, stride, padding)
                dot = tf.reduce_sum(inner.gradient(pooled, x, output_gradients=g) * u)
            return outer.gradient(dot, g)

        g = tf.zeros_like(pooled)
        assert "MaxPoolWithArgmax" in {op.type for op in picked.get_concrete_function(g).graph.get_operations()}
        expected = first_maxima(x.numpy(), u.numpy(), stride, padding)
        np.testing.assert_array_equal(picked(g).numpy(), expected)
        # TensorFlow's kernel, run where it cannot take u's buffer (eagerly, u held here).
        kernel = tf.raw_ops.MaxPoolGradGrad(orig_input=x, orig_output=pooled, grad=u, ksize=[1, 3, 3, 1],
                                            strides=[1, stride, stride, 1], padding=padding)
        np.testing.assert_array_equal(kernel.numpy(), expected)


def test_an_op_placed_on_a_gpu_keeps_tensorflows_rule():
    # Only TensorFlow's CPU kernel reuses its input; a GPU's does not, and XLA has no MaxPoolWithArgmax.
    # Traced only: the graph needs no GPU to be built.
    second_derivatives.install()
    x = tf.constant(np.random.default_rng(3).normal(size=(2, 5, 5, 3)))

    def second(x):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                cubed = tf.reduce_sum(tf.nn.max_pool2d(x, 3, 1, "SAME") ** 3)
            dot = tf.reduce_sum(inner.gradient(cubed, x))
        return outer.gradient(dot, x)

    def on(device):
        def traced(x):
            with tf.device(device):
                return second(x)
        graph = tf.function(traced).get_concrete_function(x).graph
        return {op.type for op in graph.get_operations()}

    assert "MaxPoolGradGrad" in on("/device:GPU:0") and "MaxPoolWithArgmax" not in on("/device:GPU:0")
    assert "MaxPoolWithArgmax" in on("/device:CPU:0") and "MaxPoolGradGrad" not in on("/device:CPU:0")
