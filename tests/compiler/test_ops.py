"""The DARTS ops: shapes, parameter counts by hand, and the reference's padding semantics."""

import keras
import numpy as np
import pytest

import keras_darts as kd

from keras_darts.compiler import build_op
from keras_darts.compiler.ops import FactorizedReduce, ReLUConvBN, batch_normalize, fused_batch_norm
from keras_darts.spec import DARTS_CONV_OPERATIONS


def trainable(layer):
    return sum(int(np.prod(v.shape)) for v in layer.trainable_variables)


@pytest.mark.parametrize("name", DARTS_CONV_OPERATIONS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 7])
def test_output_shapes(name, stride, size):
    if name == "skip_connect" and stride == 2 and size % 2:
        pytest.skip("the factorized reduce needs an even size (the spec checks refuse odd sizes)")
    op = build_op(name, 6, stride, affine=True, layer_name=f"op_{name}")
    x = np.random.default_rng(0).normal(size=(2, size, size, 6)).astype("float32")
    out = op(x, training=True)
    expected = -(-size // stride)  # ceil
    assert tuple(out.shape) == (2, expected, expected, 6)


@pytest.mark.parametrize(
    "name, affine, expected",
    [
        # sep_conv_3x3 on C=4: depthwise 3*3*4, pointwise 4*4, BN 2*4, twice.
        ("sep_conv_3x3", True, 2 * (3 * 3 * 4 + 4 * 4 + 2 * 4)),
        ("sep_conv_3x3", False, 2 * (3 * 3 * 4 + 4 * 4)),
        ("sep_conv_5x5", True, 2 * (5 * 5 * 4 + 4 * 4 + 2 * 4)),
        # dil_conv_5x5: one depthwise 5x5, pointwise, BN.
        ("dil_conv_5x5", True, 5 * 5 * 4 + 4 * 4 + 2 * 4),
        ("dil_conv_3x3", False, 3 * 3 * 4 + 4 * 4),
        ("max_pool_3x3", True, 0),
        ("avg_pool_3x3", True, 0),
        ("skip_connect", True, 0),
        ("none", True, 0),
    ],
)
def test_parameter_counts(name, affine, expected):
    op = build_op(name, 4, 1, affine=affine, layer_name="op")
    op(np.zeros((1, 8, 8, 4), "float32"), training=True)
    assert trainable(op) == expected


def test_factorized_reduce_and_preprocessing_counts():
    reduce = FactorizedReduce(4, affine=True, name="fr")
    out = reduce(np.ones((2, 8, 8, 6), "float32"), training=True)
    assert tuple(out.shape) == (2, 4, 4, 4)
    assert trainable(reduce) == 2 * (6 * 2) + 2 * 4  # two 1x1 convs 6->2, BN on 4
    pre = ReLUConvBN(4, affine=False, name="pre")
    pre(np.ones((2, 8, 8, 6), "float32"), training=True)
    assert trainable(pre) == 6 * 4


def test_factorized_reduce_uses_both_pixel_offsets():
    reduce = FactorizedReduce(2, affine=False, name="fr_offsets")
    reduce.build((1, 4, 4, 1))
    reduce.kernel_1.assign(np.ones((1, 1, 1, 1), "float32"))
    reduce.kernel_2.assign(np.ones((1, 1, 1, 1), "float32"))
    x = np.arange(16, dtype="float32").reshape(1, 4, 4, 1)
    # Raw convolutions before BN: left samples (0,0),(0,2)..; right samples (1,1),(1,3)...
    import keras.ops as ops

    left = ops.conv(x, reduce.kernel_1, strides=2)
    right = ops.conv(x[:, 1:, 1:, :], reduce.kernel_2, strides=2)
    np.testing.assert_array_equal(np.asarray(left)[0, :, :, 0], [[0, 2], [8, 10]])
    np.testing.assert_array_equal(np.asarray(right)[0, :, :, 0], [[5, 7], [13, 15]])


def test_factorized_reduce_shifts_by_a_slice_with_the_values_and_gradients_of_keras_slicing():
    import tensorflow as tf

    from keras_darts.compiler.ops import shifted

    rng = np.random.default_rng(0)
    for shape in [(2, 9, 9, 6), (3, 8, 8, 4)]:
        x = tf.constant(rng.normal(size=shape), tf.float32)
        upstream = tf.constant(rng.normal(size=(shape[0], shape[1] - 1, shape[2] - 1, shape[3])), tf.float32)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            ours, theirs = shifted(x), x[:, 1:, 1:, :]
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
        np.testing.assert_array_equal(tape.gradient(ours, x, output_gradients=upstream).numpy(),
                                      tape.gradient(theirs, x, output_gradients=upstream).numpy())

    reduce = FactorizedReduce(4, affine=False, name="fr_slice")
    graph = tf.function(lambda x: reduce(x, training=True)).get_concrete_function(
        tf.TensorSpec((2, 8, 8, 6), tf.float32)).graph
    types = [op.type for op in graph.get_operations()]
    assert "Slice" in types and "StridedSlice" not in types


@pytest.mark.parametrize("shape, stride, op", [((2, 12, 8, 3), 2, "Slice"), ((3, 9, 9, 2), 3, "Slice"),
                                               ((2, 11, 12, 3), 2, "StridedSlice"), ((2, 8, 7, 3), 2, "StridedSlice")])
def test_every_strided_row_and_column_by_a_slice_where_the_stride_divides_the_sides_else_as_keras(shape, stride, op):
    import tensorflow as tf

    from keras_darts.compiler.ops import every

    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=shape), tf.float32)
    sides = [-(-n // stride) for n in shape[1:3]]
    upstream = tf.constant(rng.normal(size=(shape[0], *sides, shape[3])), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours, theirs = every(x, stride), x[:, ::stride, ::stride, :]
    assert ours.shape == (shape[0], *sides, shape[3])
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    np.testing.assert_array_equal(tape.gradient(ours, x, output_gradients=upstream).numpy(),
                                  tape.gradient(theirs, x, output_gradients=upstream).numpy())
    graph = tf.function(lambda x: every(x, stride)).get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph
    types = {o.type for o in graph.get_operations()}
    assert op in types and ({"Slice", "StridedSlice"} - {op}).isdisjoint(types)


def _reference_pool(x, stride, reduce):
    """3x3 pooling with padding 1 on both sides, padded cells ignored (numpy, one channel)."""
    size = x.shape[0]
    out = -(-size // stride)
    result = np.zeros((out, out))
    for i in range(out):
        for j in range(out):
            r0, c0 = i * stride - 1, j * stride - 1
            window = x[max(r0, 0):r0 + 3, max(c0, 0):c0 + 3]
            result[i, j] = reduce(window)
    return result


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name, reduce", [("avg_pool_3x3", np.mean), ("max_pool_3x3", np.max)])
def test_pooling_matches_the_reference_padding(name, reduce, stride):
    x = np.random.default_rng(1).normal(size=(6, 6)).astype("float32")
    op = build_op(name, 1, stride, affine=True, layer_name="pool")
    out = np.asarray(op(x[None, :, :, None]))[0, :, :, 0]
    np.testing.assert_allclose(out, _reference_pool(x, stride, reduce), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("size", [6, 7])
def test_strided_max_pool_and_its_gradient_equal_padding_with_minus_infinity(size, training):
    # In inference the op pads with a mirror of the border (no infinite constant
    # for integer quantisation); the reference pads with -inf. Both pick the same maxima.
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(5).normal(size=(2, size, size, 3)).astype("float32"))
    weights = tf.constant(np.random.default_rng(6).normal(size=(2, size // 2 + size % 2, size // 2 + size % 2, 3))
                          .astype("float32"))
    op = build_op("max_pool_3x3", 3, 2, affine=True, layer_name="pool")

    def reference(z):
        padded = tf.pad(z, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=float("-inf"))
        return tf.nn.max_pool2d(padded, 3, 2, "VALID")

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours, theirs = op(x, training=training), reference(x)
        ours_loss, theirs_loss = tf.reduce_sum(ours * weights), tf.reduce_sum(theirs * weights)
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    np.testing.assert_array_equal(tape.gradient(ours_loss, x).numpy(), tape.gradient(theirs_loss, x).numpy())


def test_search_flavour_pools_are_followed_by_batch_norm():
    op = build_op("avg_pool_3x3", 3, 1, affine=False, layer_name="pool_bn", search=True)
    out = np.asarray(op(np.random.default_rng(2).normal(3.0, 2.0, size=(4, 6, 6, 3)).astype("float32")))
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.var(axis=(0, 1, 2)), 1.0, atol=1e-3)
    assert trainable(op) == 0


def test_fused_and_formula_batch_norm_agree():
    x = np.random.default_rng(3).normal(2.0, 3.0, size=(4, 5, 5, 3))
    fused = batch_normalize(x.astype("float32"))
    formula = batch_normalize(x.astype("float64"))  # float64 takes the formula path
    for a, b in zip(fused, formula):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    n = 4 * 5 * 5
    np.testing.assert_allclose(np.asarray(formula[2]), x.var(axis=(0, 1, 2)) * n / (n - 1), rtol=1e-10)


def test_derived_flavour_keeps_running_statistics():
    op = build_op("sep_conv_3x3", 2, 1, affine=True, layer_name="sep")
    x = np.random.default_rng(4).normal(size=(3, 6, 6, 2)).astype("float32")
    op(x, training=True)
    moving = [v for v in op.non_trainable_variables if "moving_mean" in v.path]
    assert len(moving) == 2 and np.any(np.asarray(moving[0]) != 0.0)
    inference = np.asarray(op(x, training=False))
    assert np.all(np.isfinite(inference))


def test_register_a_custom_op():
    from keras_darts.compiler import register_op
    from keras_darts.spec import known_conv_operations

    @keras.saving.register_keras_serializable(package="tests")
    class Conv1x1(keras.layers.Layer):
        def __init__(self, channels, **kwargs):
            super().__init__(**kwargs)
            self.conv = keras.layers.Conv2D(channels, 1, name=f"{self.name}__conv")

        def call(self, x, training=None):
            return self.conv(x)

    from keras_darts.compiler import unregister_op

    register_op("conv_1x1", lambda c, s, a, n: Conv1x1(c, name=n) if s == 1 else FactorizedReduce(c, s, a, name=n))
    try:
        assert "conv_1x1" in known_conv_operations()
        op = build_op("conv_1x1", 4, 1, affine=False, layer_name="custom")
        assert tuple(op(np.zeros((1, 4, 4, 4), "float32")).shape) == (1, 4, 4, 4)
        spec = kd.load_spec({"version": 1, "name": "x", "retrain": {"enabled": False},
                             "search_space": {"kind": "conv_cell", "operations": ["none", "conv_1x1"]}})
        assert spec.search_space.operations == ("none", "conv_1x1")
    finally:
        unregister_op("conv_1x1")
    assert "conv_1x1" not in known_conv_operations()
    with pytest.raises(ValueError, match="Built-in ops cannot be unregistered"):
        unregister_op("sep_conv_3x3")


def test_weighted_sum_has_the_plain_expressions_gradients_to_second_order():
    import tensorflow as tf

    from keras_darts.compiler.cells import weighted_sum

    rng = np.random.default_rng(0)
    scalars = [tf.constant(rng.normal(), tf.float64) for _ in range(3)]
    tensors = [tf.constant(rng.normal(size=(2, 3, 3, 4)), tf.float64) for _ in range(3)]
    upstream = tf.constant(rng.normal(size=(2, 3, 3, 4)), tf.float64)
    vector = [tf.constant(rng.normal(size=(2, 3, 3, 4)), tf.float64) for _ in range(3)]

    def plain(scalars, tensors):
        return scalars[0] * tensors[0] + scalars[1] * tensors[1] + scalars[2] * tensors[2]

    def derivatives(combine):
        # The loss is nonlinear in the sum, so the mixed second derivative is not trivially zero.
        with tf.GradientTape() as outer:
            outer.watch(scalars)
            with tf.GradientTape() as inner:
                inner.watch([scalars, tensors])
                loss = tf.reduce_sum(tf.sin(upstream * combine(scalars, tensors)))
            by_scalar, by_tensor = inner.gradient(loss, [scalars, tensors])
            dot = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(by_tensor, vector)])
        mixed = outer.gradient(dot, scalars)
        return [t.numpy() for t in [combine(scalars, tensors), *by_scalar, *by_tensor, *mixed]]

    for got, want in zip(derivatives(weighted_sum), derivatives(plain)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_weighted_sums_gradient_builds_no_zeros_for_the_inputs_it_passes_through():
    import tensorflow as tf

    from keras_darts.compiler.cells import weighted_sum

    rng = np.random.default_rng(1)
    scalars = [tf.constant(rng.normal(), tf.float32) for _ in range(3)]
    tensors = [tf.constant(rng.normal(size=(2, 3, 3, 4)), tf.float32) for _ in range(3)]

    def custom_gradient_sum(scalars, tensors):  # what weighted_sum built with tf.custom_gradient
        @tf.custom_gradient
        def run(*inputs):
            def gradient(upstream):
                return [tf.reduce_sum(upstream * t) for t in tensors] + [s * upstream for s in scalars]

            return tf.add_n([s * t for s, t in zip(scalars, tensors)]), gradient

        return run(*scalars, *tensors)

    @tf.function(autograph=False)
    def gradients(combine):
        with tf.GradientTape() as tape:
            tape.watch([scalars, tensors])
            loss = tf.reduce_sum(tf.sin(combine(scalars, tensors)))
        return tape.gradient(loss, [scalars, tensors])

    def zeros(combine):
        operations = gradients.get_concrete_function(combine).graph.get_operations()
        return [op.name for op in operations if op.type == "Fill" or op.type == "Const" and op.outputs[0].shape
                in ((), (2, 3, 3, 4)) and op.outputs[0].dtype == tf.float32
                and not tf.make_ndarray(op.get_attr("value")).any()]

    for got, want in zip(tf.nest.flatten(gradients(weighted_sum)), tf.nest.flatten(gradients(custom_gradient_sum))):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert zeros(weighted_sum) == []
    assert len(zeros(custom_gradient_sum)) == 6  # one per input passed through its IdentityN


def test_fused_batch_norm_adds_the_reference_epsilon_exactly():
    # Batch variance about 1e-5, as large as epsilon: 1.001e-5 instead would move y by 2.5e-4 relative.
    x = np.random.default_rng(5).normal(0.0, 3e-3, size=(8, 5, 5, 2))
    y = np.asarray(batch_normalize(x.astype("float32"))[0])
    expected = (x - x.mean(axis=(0, 1, 2))) / np.sqrt(x.var(axis=(0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=2e-5, atol=1e-5)


def _batch_norm_derivatives(x, upstream, direction):
    """``d/dx sum(upstream * y)`` and the derivative of its dot with ``direction`` (exact mode's double pass)."""
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            loss = tf.reduce_sum(tf.cast(upstream, x.dtype) * batch_normalize(x)[0])
        gradient = inner.gradient(loss, x)
        dot = tf.reduce_sum(gradient * tf.cast(direction, x.dtype))
    return gradient, outer.gradient(dot, x)


def test_fused_batch_norm_matches_the_formula_to_second_order():
    import tensorflow as tf

    rng = np.random.default_rng(6)
    x, upstream, direction = (rng.normal(1.0, 2.0, size=(4, 5, 5, 3)) for _ in range(3))
    fused = tf.function(_batch_norm_derivatives, autograph=False)
    got = fused(x.astype("float32"), upstream, direction)
    want = _batch_norm_derivatives(x, upstream, direction)  # float64: the formula
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-3)
    kinds = {op.type for op in fused.get_concrete_function(x.astype("float32"), upstream, direction)
             .graph.get_operations()}
    assert {"FusedBatchNorm", "FusedBatchNormGrad"} <= kinds, kinds


def test_fused_batch_norm_gradient_fills_no_zeros_for_the_statistics():
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((4, 5, 5, 3))], autograph=False)
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = batch_normalize(x)[0]
        return tape.gradient(y, x)

    operations = gradient.get_concrete_function().graph.get_operations()
    # A vector of zeros as long as the channels: the BN's shared offset alone. With FusedBatchNormV3
    # the tape adds one for each output the loss does not use (mean, variance, two reserve spaces)
    # and a ZerosLike for the third reserve space.
    zero_vectors = [op.name for op in operations if op.type == "Const" and op.outputs[0].shape == (3,)
                    and not tf.make_ndarray(op.get_attr("value")).any()]
    assert len(zero_vectors) == 1, zero_vectors
    assert "ZerosLike" not in [op.type for op in operations]


def test_batch_norm_second_derivatives_equal_a_tape_through_the_formula_in_float64():
    import tensorflow as tf

    from keras_darts.compiler.ops import batch_norm_second_derivatives

    rng = np.random.default_rng(11)
    x, upstream, along = (tf.constant(rng.normal(0.5, 2.0, size=(4, 3, 3, 2)), tf.float64) for _ in range(3))
    epsilon = 1e-3  # large enough to matter against the variances

    with tf.GradientTape() as outer:
        outer.watch([upstream, x])
        with tf.GradientTape() as inner:
            inner.watch(x)
            mean = tf.reduce_mean(x, (0, 1, 2))
            y = (x - mean) / tf.sqrt(tf.reduce_mean(tf.square(x - mean), (0, 1, 2)) + epsilon)
            loss = tf.reduce_sum(upstream * y)
        dot = tf.reduce_sum(along * inner.gradient(loss, x))
    want = outer.gradient(dot, [upstream, x])

    got = batch_norm_second_derivatives(upstream, x, along, epsilon)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-10, atol=1e-12)
    assert batch_norm_second_derivatives(upstream, x, along, epsilon, (False, True))[0] is None


def test_a_search_batch_norm_is_tensorflows_bit_for_bit_and_its_second_derivatives_agree_with_a_leaner_graph():
    import tensorflow as tf

    rng = np.random.default_rng(12)
    x, weights, direction = (tf.constant(rng.normal(1.0, 2.0, size=(4, 5, 5, 3)), tf.float32) for _ in range(3))
    scale, offset, empty = tf.ones([3]), tf.zeros([3]), tf.zeros([0])

    def tensorflows(x):  # the op alone, differentiated by TensorFlow's registered gradients
        return fused_batch_norm("float32")(x=x, scale=scale, offset=offset, mean=empty, variance=empty,
                                           epsilon=1e-5, is_training=True)[0]

    @tf.function(autograph=False)
    def derivatives(normalize):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(tf.sin(normalize(x)) * weights)  # not linear in y
            gradient = inner.gradient(loss, x)
            dot = tf.reduce_sum(gradient * direction)
        return normalize(x), gradient, outer.gradient(dot, x)

    ours, theirs = derivatives(lambda x: batch_normalize(x)[0]), derivatives(tensorflows)
    np.testing.assert_array_equal(ours[0].numpy(), theirs[0].numpy())
    np.testing.assert_array_equal(ours[1].numpy(), theirs[1].numpy())
    np.testing.assert_allclose(ours[2].numpy(), theirs[2].numpy(), rtol=1e-4, atol=1e-4 * np.abs(theirs[2]).max())

    def kinds(normalize):
        return [op.type for op in derivatives.get_concrete_function(normalize).graph.get_operations()]

    # TensorFlow differentiates its unfused gradient formula: its reductions' gradients reshape and tile.
    lean, tensorflow = kinds(lambda x: batch_normalize(x)[0]), kinds(tensorflows)
    assert lean.count("Tile") == 2 and tensorflow.count("Tile") > 2  # 2: the gradients of loss and dot's sums
    assert len(lean) < len(tensorflow) / 2


def test_float32_fused_batch_norm_equals_the_third_version_bit_for_bit_to_second_order():
    import tensorflow as tf

    rng = np.random.default_rng(7)
    x, upstream, direction = (tf.constant(rng.normal(1.0, 2.0, size=(4, 5, 5, 3)), tf.float32) for _ in range(3))
    scale, offset, empty = tf.ones([3]), tf.zeros([3]), tf.zeros([0])

    @tf.function(autograph=False)
    def run(x, third):
        op = tf.raw_ops.FusedBatchNormV3 if third else fused_batch_norm("float32")
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y, mean, variance = op(x=x, scale=scale, offset=offset, mean=empty, variance=empty,
                                       epsilon=1e-5, is_training=True)[:3]
                loss = tf.reduce_sum(upstream * y)
            gradient = inner.gradient(loss, x)
            dot = tf.reduce_sum(gradient * direction)
        return y, mean, variance, gradient, outer.gradient(dot, x)

    assert fused_batch_norm("float32") is tf.raw_ops.FusedBatchNorm
    assert fused_batch_norm("bfloat16") is tf.raw_ops.FusedBatchNormV3
    for first, third in zip(run(x, False), run(x, True)):
        np.testing.assert_array_equal(first.numpy(), third.numpy())


@pytest.mark.parametrize("size", [8, 7])
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_dilated_depthwise_convolution_and_its_gradients_equal_keras_bit_for_bit_but_a_strided_kernel_gradient(
        size, kernel_size, stride):
    import tensorflow as tf

    from keras_darts.compiler.ops import _dilated_depthwise, _pad

    rng = np.random.default_rng(8)
    x = tf.constant(rng.normal(size=(2, size, size, 3)), tf.float32)
    kernel = tf.constant(rng.normal(size=(kernel_size, kernel_size, 3, 1)), tf.float32)
    pad = kernel_size - 1  # dilation 2

    def keras_path(x, kernel):
        if stride == 1:
            return keras.ops.depthwise_conv(x, kernel, strides=1, padding="same", dilation_rate=2)
        return keras.ops.depthwise_conv(_pad(x, pad), kernel, strides=2, padding="valid", dilation_rate=2)

    def ours(x, kernel):
        return _dilated_depthwise(x if stride == 1 else _pad(x, pad), kernel, stride, 2)

    @tf.function(autograph=False)
    def derivatives(x, kernel, use_ours):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x, kernel])
            y = (ours if use_ours else keras_path)(x, kernel)
            loss = tf.reduce_sum(tf.sin(y))
        return [y, *tape.gradient(loss, [x, kernel])]

    got, want = derivatives(x, kernel, True), derivatives(x, kernel, False)
    side = size if stride == 1 else (size + 1) // 2
    assert got[0].shape == (2, side, side, 3)
    for a, b in zip(got[:2], want[:2]):  # the output and its gradient with respect to the input
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The kernel's gradient sums over the output positions: at stride 2 Keras' sum also runs over the
    # positions it computes and discards (zeros), so its order, and the last bit, may differ.
    if stride == 1:
        np.testing.assert_array_equal(got[2].numpy(), want[2].numpy())
    else:
        np.testing.assert_allclose(got[2].numpy(), want[2].numpy(), rtol=1e-6, atol=1e-6)
    kinds = {op.type for op in derivatives.get_concrete_function(x, kernel, True).graph.get_operations()}
    assert ("SpaceToBatchND" in kinds) == (stride == 1) and "DepthwiseConv2dNative" in kinds


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_convolutions_built_as_tensorflow_ops_equal_keras_ops_bit_for_bit_to_second_order(depthwise, stride):
    import tensorflow as tf

    from keras_darts.compiler import ops as compiler_ops

    rng = np.random.default_rng(9)
    x, along_x = (tf.constant(rng.normal(size=(2, 7, 7, 3)), tf.float32) for _ in range(2))
    kernel, along_kernel = (tf.constant(rng.normal(size=(3, 3, 3, 1 if depthwise else 5)), tf.float32)
                            for _ in range(2))
    padding = "same" if stride == 1 else "valid"
    ours = compiler_ops.depthwise_conv if depthwise else compiler_ops.conv
    theirs = keras.ops.depthwise_conv if depthwise else keras.ops.conv

    @tf.function(autograph=False)
    def derivatives(x, kernel, convolution):
        with tf.GradientTape() as outer:
            outer.watch([x, kernel])
            with tf.GradientTape() as inner:
                inner.watch([x, kernel])
                y = convolution(x, kernel, strides=stride, padding=padding)
                loss = tf.reduce_sum(tf.sin(y))  # not linear in y, so the second derivatives are not zero
            by_x, by_kernel = inner.gradient(loss, [x, kernel])
            dot = tf.reduce_sum(by_x * along_x) + tf.reduce_sum(by_kernel * along_kernel)
        return [y, by_x, by_kernel, *outer.gradient(dot, [x, kernel])]

    got, want = derivatives(x, kernel, ours), derivatives(x, kernel, theirs)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert np.abs(got[3].numpy()).max() > 0 and np.abs(got[4].numpy()).max() > 0

    def kinds(convolution):
        return sorted(op.type for op in derivatives.get_concrete_function(x, kernel, convolution).graph
                      .get_operations() if op.type != "Const")

    # The same ops, but for the shapes TensorFlow's gradient computes again (Keras' depthwise path also adds
    # constants for a space-to-batch it then skips).
    assert kinds(ours) == [kind for kind in kinds(theirs) if kind not in ("Shape", "ShapeN")]


@pytest.mark.parametrize("depthwise", [False, True])
def test_a_convolution_builds_the_gradient_of_only_what_a_tape_watches(depthwise):
    import tensorflow as tf

    from keras_darts.compiler import ops as compiler_ops

    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=(2, 6, 6, 4)), tf.float32)
    kernel = tf.constant(rng.normal(size=(3, 3, 4, 1 if depthwise else 2)), tf.float32)
    ours = compiler_ops.depthwise_conv if depthwise else compiler_ops.conv
    theirs = keras.ops.depthwise_conv if depthwise else keras.ops.conv
    backprop = "DepthwiseConv2dNativeBackprop" if depthwise else "Conv2DBackprop"

    @tf.function(autograph=False)
    def gradient(x, kernel, convolution, watched):
        with tf.GradientTape() as tape:
            tape.watch(x if watched == "input" else kernel)
            loss = tf.reduce_sum(tf.square(convolution(x, kernel, padding="same")))
        return tape.gradient(loss, x if watched == "input" else kernel)

    for watched, other in (("input", "Filter"), ("kernel", "Input")):
        np.testing.assert_array_equal(gradient(x, kernel, ours, watched).numpy(),
                                      gradient(x, kernel, theirs, watched).numpy())
        kinds = [{op.type for op in gradient.get_concrete_function(x, kernel, convolution, watched).graph
                  .get_operations()} for convolution in (ours, theirs)]
        # TensorFlow's own gradient builds both backprop ops whatever the tape watches.
        assert backprop + other not in kinds[0] and backprop + other in kinds[1]
        assert backprop + ("Input" if other == "Filter" else "Filter") in kinds[0]
