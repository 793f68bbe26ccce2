"""The candidate operations, as Keras layers, and the registry of op names.

Every op maps a ``(batch, H, W, C)`` tensor to ``(batch, H/stride, W/stride,
channels)``. Convolutions have no bias and run ReLU -> conv -> BN. Padding is
symmetric as in the reference (for a stride-2 window the reference pads both
sides; Keras' ``"same"`` would pad only the bottom/right), so stride-2 ops pad
explicitly and use ``"valid"``; at stride 1 ``"same"`` is the same thing.

``affine`` chooses the flavour: the search network's BNs have no affine
parameters (``affine=False``), derived networks' BNs do.
"""

import contextlib
import functools
import weakref

import keras
from keras import ops

from keras_darts.spec import (
    DARTS_CONV_OPERATIONS,
    ZERO_OPERATION,
    conv_operation,
    register_conv_operation,
    unregister_conv_operation,
)

PACKAGE = "keras_darts"
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1
BN_EPSILON = 1e-5


def batch_norm(affine, name, synchronized=False):
    """A Keras BN with the reference's epsilon and momentum (stems, heads and derived cells).

    ``synchronized=True`` computes batch statistics over all replicas: a
    derived network trained under a tf.distribute strategy then normalises
    with the global batch's mean and variance, as one device would, and its
    moving averages stay identical on every replica. Outside a strategy such
    a BN behaves as any other.
    """
    return keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, center=affine, scale=affine, name=name,
        synchronized=synchronized,
    )


def _pad(x, amount, value=0.0):
    return ops.pad(x, [[0, 0], [amount, amount], [amount, amount], [0, 0]], constant_values=value)


_FUSED_DTYPES = ("float32", "float16", "bfloat16")
# Set while a step is traced with ``distribute.batch_norm: replica``. A plain flag, not a context
# variable: MirroredStrategy traces each replica's function in a thread of its own.
_REPLICA_STATISTICS = [False]


@contextlib.contextmanager
def replica_batch_statistics(enabled=True):
    """Batch norms traced inside normalise each replica's slice on its own (no all-reduce).

    ``distribute.batch_norm: replica``: what data-parallel PyTorch does without
    SyncBN. Outside it (``global``, the default) a batch norm under a strategy
    all-reduces its statistics and normalises over the global batch.
    """
    with _holding(_REPLICA_STATISTICS, bool(enabled)):
        yield


# Set while a step is traced with ``global`` batch norm on replicas that all-reduce without
# ``merge_call`` (``runtime.distribution.ReplicaAllReduce``): its ``sum`` replaces the
# strategy's own reduction, so the passes holding the batch norms can stay nested functions.
_ALL_REDUCE = [None]


@contextlib.contextmanager
def replica_all_reduce(reducer):
    """Batch norms traced inside all-reduce their statistics with ``reducer.sum`` (``None``: the strategy's)."""
    with _holding(_ALL_REDUCE, reducer):
        yield


# Set while a pass shared by every replica is traced (``runtime.bilevel``, ``batch_norm: replica``): the
# replica's index as the pass's input, where the replica context would give the tracing replica's constant.
_REPLICA_INDEX = [None]


@contextlib.contextmanager
def replica_index(index):
    """Draws traced inside fold in ``index`` (an int32 tensor) as their replica's, not the replica context's."""
    with _holding(_REPLICA_INDEX, index):
        yield


@contextlib.contextmanager
def _holding(cell, value):
    """``cell[0]`` is ``value`` inside, and what it was before after."""
    previous = cell[0]
    cell[0] = value
    try:
        yield
    finally:
        cell[0] = previous


def cross_replica_moments(x, axes):
    """Mean and biased variance of ``x`` over ``axes`` and over all replicas, or ``None`` on one replica.

    Under a tf.distribute strategy each replica holds a slice of the batch;
    batch normalisation must see the whole batch to compute what one device
    would, so the sums are all-reduced (differentiably) across replicas.
    """
    if keras.backend.backend() != "tensorflow" or _REPLICA_STATISTICS[0]:
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), list(axes))), x.dtype)
    reducer = _ALL_REDUCE[0]
    if reducer is not None:  # the sums and the count as one vector: one all-reduce, not two
        summed = reducer.sum(tf.concat([tf.reduce_sum(x, axes), tf.reshape(count, [1])], 0))
        total, count = summed[:-1], summed[-1]
        all_reduce = reducer.sum
    else:
        all_reduce = functools.partial(context.all_reduce, tf.distribute.ReduceOp.SUM)
        total, count = all_reduce([tf.reduce_sum(x, axes), count])
    mean = total / count
    squares = all_reduce(tf.reduce_sum(tf.square(x - mean), axes))
    return mean, squares / count, count


def replica_uniform(shape, seed_generator, dtype):
    """``keras.random.uniform(shape, seed=seed_generator)``, drawn differently on every replica.

    On one device (or one replica) it is exactly that call. Under a tf.distribute
    strategy every replica advances its copy of the generator identically, so
    the replica id is folded into the drawn seed; otherwise each replica's
    slice of the batch would get the same draws.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            seed = tf.cast(tf.math.floormod(seed_generator.next(), tf.int32.max - 1), tf.int32)
            index = context.replica_id_in_sync_group if _REPLICA_INDEX[0] is None else _REPLICA_INDEX[0]
            seed = seed + tf.stack([0, tf.cast(index, tf.int32) * 1_000_003])
            return tf.random.stateless_uniform(shape, seed=seed, dtype=dtype)
    return keras.random.uniform(shape, dtype=dtype, seed=seed_generator)


_CONSTANTS = weakref.WeakKeyDictionary()


def graph_constant(value, dtype="float32"):
    """``value`` as a constant of ``dtype``, one per graph being built and value (TensorFlow backend).

    Every tensor argument an op is given as a Python value becomes a constant
    node of its own, and a supernet's edges repeat the same few hundreds of
    times: the BNs' scale and offset, the dilated convolutions' block shapes
    and paddings, the slices' bounds, the reductions' axes. The graph's
    optimiser would merge them, but a short search on a CPU builds its steps
    without it (``runtime.graph_build``), so they are shared here as they are
    made. Under a MirroredStrategy the replicas trace into one graph and
    share them too; they are a few numbers each.
    """
    import numpy as np
    import tensorflow as tf

    array = np.asarray(value, dtype)
    constants = _CONSTANTS.setdefault(tf.compat.v1.get_default_graph(), {})
    key = (array.dtype.str, array.shape, array.tobytes())
    if key not in constants:
        constants[key] = tf.constant(array)
    return constants[key]


def recorded(name, inputs, forward, backward):
    """``forward()``'s one output, recorded on the gradient tapes as one operation named ``name`` of ``inputs``,
    whose gradients are ``backward(upstream, needed)``: one per input, ``None`` where ``needed[i]`` is false.

    ``needed[i]`` says whether some active tape watches ``inputs[i]``, so
    that only the gradients something can read are built: the alpha pass
    watches no weights, and TensorFlow's own gradients of a convolution build
    the kernel's gradient regardless. ``forward``'s own ops are not recorded,
    as those of a function under ``tf.custom_gradient`` are never
    differentiated. Unlike that decorator inside a traced function, this
    passes nothing through an ``IdentityN``, so the backward pass builds no
    zeros for the inputs (see ``cells.weighted_sum``). TensorFlow has no
    public way to record an operation; this is the call
    ``tf.custom_gradient`` makes (TensorFlow is pinned).
    """
    from tensorflow.python.eager import record

    with record.stop_recording():
        output = forward()
    if not record.could_possibly_record():
        return output
    needed = [record.should_record_backprop([tensor]) for tensor in inputs]
    record.record_operation(name, [output], inputs, lambda upstream: backward(upstream, needed))
    return output


def separately(gradients):
    """A ``recorded`` backward from one function of the upstream gradient per input, calling those needed."""
    return lambda upstream, needed: [gradient(upstream) if need else None for gradient, need in zip(gradients, needed)]


def sum_all(x):
    """``tf.reduce_sum(x)``: the same op, with its axes shared by the graph (``graph_constant``)."""
    import tensorflow as tf

    return tf.reduce_sum(x, graph_constant(range(x.shape.rank), "int32"))


def every(x, stride):
    """``x[:, ::stride, ::stride, :]``, with its constants shared by the graph (``graph_constant``).

    On TensorFlow (channels last), when ``stride`` divides the height and the
    width, it is a ``Slice`` between two ``Reshape``s: the rows and columns
    split into (index // stride, index % stride) and remainder 0 kept. Its
    gradient is a ``Pad``, where the ``StridedSlice``'s (``StridedSliceGrad``)
    was about 1 ms per call on a CPU for a supernet's tensors, several times
    slower, for the same values (``benchmarks/README.md``). Otherwise it is
    the ``StridedSlice`` Keras' slicing builds.
    """
    if not _tensorflow_channels_last():
        return x[:, ::stride, ::stride, :]
    import tensorflow as tf

    height, width, channels = x.shape[1:]
    if None not in (height, width, channels) and height % stride == 0 and width % stride == 0:
        rows, columns = height // stride, width // stride
        grid = tf.reshape(x, graph_constant([-1, rows, stride, columns, stride * channels], "int32"))
        kept = tf.raw_ops.Slice(input=grid, begin=graph_constant([0, 0, 0, 0, 0], "int32"),
                                size=graph_constant([-1, -1, 1, -1, channels], "int32"))
        return tf.reshape(kept, graph_constant([-1, rows, columns, channels], "int32"))
    return tf.raw_ops.StridedSlice(input=x, begin=graph_constant([0, 0, 0, 0], "int32"),
                                   end=graph_constant([0, 0, 0, 0], "int32"),
                                   strides=graph_constant([1, stride, stride, 1], "int32"),
                                   begin_mask=0b1111, end_mask=0b1111)


def shifted(x):
    """``x[:, 1:, 1:, :]``; on TensorFlow (channels last) a ``Slice`` with its bounds shared by the graph.

    Keras' slicing builds a ``StridedSlice``, whose gradient (``StridedSliceGrad``)
    is several times slower on a CPU than a ``Slice``'s (a ``Pad``), for the
    same values (``benchmarks/README.md``).
    """
    if not _tensorflow_channels_last():
        return x[:, 1:, 1:, :]
    import tensorflow as tf

    return tf.raw_ops.Slice(input=x, begin=graph_constant([0, 1, 1, 0], "int32"),
                            size=graph_constant([-1, -1, -1, -1], "int32"))


def fused_batch_norm(dtype):
    """TensorFlow's fused BN op for inputs of ``dtype``: ``FusedBatchNorm`` in float32, else ``FusedBatchNormV3``.

    Both compute the same values (on a CPU the tests compare them and their
    first and second derivatives bit for bit). But for ``FusedBatchNorm``
    TensorFlow's tape hands the gradient no tensors for the outputs nothing
    differentiates (the batch statistics and reserve spaces), where for
    ``FusedBatchNormV3`` it builds a tensor of zeros for each: five per BN
    and backward pass, a tenth of the nodes of a search step (SMALL second
    order: 44,977 nodes with it, 39,627 without). ``FusedBatchNorm`` takes
    no half-precision inputs.
    """
    import tensorflow as tf

    return tf.raw_ops.FusedBatchNorm if dtype == "float32" else tf.raw_ops.FusedBatchNormV3


def batch_normalize(x, gamma=None, beta=None):
    """Normalise ``x`` (NHWC) with its batch statistics; ``gamma``/``beta`` if affine.

    Returns ``(y, mean, unbiased variance)``; ``y`` uses the biased variance,
    as BN does. On the TensorFlow backend this is one fused op with one
    gradient op (which has its own gradient, for exact second order): a
    search supernet holds hundreds of BNs, and the unfused formula's graph
    is some forty ops each. Other backends and float64 take the formula.
    """
    synced = cross_replica_moments(x, (0, 1, 2))
    if synced is not None:
        mean, variance, count = synced
        y = (x - mean) * ops.rsqrt(variance + BN_EPSILON)
        if gamma is not None:
            y = y * gamma + beta
        return y, mean, variance * count / ops.maximum(count - 1.0, 1.0)
    dtype = keras.backend.standardize_dtype(x.dtype)
    if keras.backend.backend() == "tensorflow" and dtype in _FUSED_DTYPES:
        import tensorflow as tf

        channels = x.shape[-1]
        scale = graph_constant([1.0] * channels) if gamma is None else tf.cast(gamma, tf.float32)
        offset = graph_constant([0.0] * channels) if beta is None else tf.cast(beta, tf.float32)
        empty = graph_constant([])
        fused = fused_batch_norm(dtype)
        if gamma is None and beta is None and fused is tf.raw_ops.FusedBatchNorm:
            return _search_batch_norm(x, scale, offset, empty)
        # As tf.compat.v1.nn.fused_batch_norm calls it, with the constant inputs shared by all BNs of a graph.
        y, mean, variance = fused(
            x=x, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=BN_EPSILON,
            data_format="NHWC", is_training=True,
        )[:3]
        return y, mean, variance
    mean = ops.mean(x, axis=(0, 1, 2))
    variance = ops.mean(ops.square(x - mean), axis=(0, 1, 2))
    y = (x - mean) * ops.rsqrt(variance + BN_EPSILON)
    if gamma is not None:
        y = y * gamma + beta
    count = ops.cast(ops.prod(ops.shape(x)[:3]), x.dtype)
    return y, mean, variance * count / ops.maximum(count - 1.0, 1.0)


def _search_batch_norm(x, scale, offset, empty):
    """A search BN (float32, no affine parameters) on TensorFlow: ``FusedBatchNorm`` and, for its gradient,
    ``FusedBatchNormGrad``, as TensorFlow differentiates it, but with a lean second derivative.

    Exact second order differentiates every BN's gradient once more.
    TensorFlow's gradient of ``FusedBatchNormGrad`` builds the unfused
    gradient formula and differentiates it with a tape, over a hundred nodes
    per BN, most of them reshapes, tiles and the shapes they take (a SMALL
    exact step's Hessian-vector pass had 109,436 nodes with it, 58,611
    without). Here the second derivative is its closed form
    (``batch_norm_second_derivatives``). The values and first derivatives
    are TensorFlow's ops, bit for bit; the second derivatives agree to
    rounding (the tests compare both with TensorFlow's, and the closed form
    in float64 with a tape through the formula).
    """
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    outputs = []
    attributes = {"epsilon": BN_EPSILON, "data_format": "NHWC", "is_training": True}

    def forward():
        outputs.extend(tf.raw_ops.FusedBatchNorm(x=x, scale=scale, offset=offset, mean=empty, variance=empty,
                                                 **attributes))
        return outputs[0]

    def backward(upstream, needed):
        def gradient():
            return tf.raw_ops.FusedBatchNormGrad(y_backprop=upstream, x=x, scale=scale, reserve_space_1=outputs[3],
                                                 reserve_space_2=outputs[4], **attributes)[0]

        def second(along, needed):
            by_upstream, by_x = batch_norm_second_derivatives(upstream, x, along, BN_EPSILON, needed)
            return [by_upstream, by_x]

        return [recorded("FusedBatchNormGrad", [upstream, x], gradient, second)]

    y = recorded("FusedBatchNorm", [x], forward, backward)
    return y, outputs[1], outputs[2]


def batch_norm_second_derivatives(upstream, x, along, epsilon, needed=(True, True)):
    """The derivatives of ``<along, dx>`` by ``upstream`` and by ``x``, where ``dx`` is the gradient of a
    training-mode BN without affine parameters (per channel, over every axis but the last) at ``x``, given the
    gradient ``upstream`` of its output: ``None`` where ``needed`` says so.

    With ``h`` the normalised ``x``, ``r = 1 / sqrt(var(x) + epsilon)`` and
    means over the batch and space, ``dx = r (u - mean(u) - h mean(u h))``
    for ``u = upstream``, linear in ``u`` and self-adjoint, so with ``a =
    along``::

        d/du = r (a - mean(a) - h mean(a h))
        d/dx = -r^2 [h (mean(a u) - mean(u) mean(a) - 3 mean(u h) mean(a h))
                     + mean(a h) (u - mean(u)) + mean(u h) (a - mean(a))]

    using ``dh_j/dx_i = r (delta_ij - 1/N - h_i h_j / N)`` and ``dr/dx_i =
    -r^2 h_i / N``. About 35 nodes, its constants shared by the graph.
    """
    import tensorflow as tf

    axes = graph_constant(range(x.shape.rank - 1), "int32")
    epsilon, three = graph_constant(epsilon, x.dtype.name), graph_constant(3.0, x.dtype.name)

    def mean(t):
        return tf.reduce_mean(t, axes, keepdims=True)

    centred = x - mean(x)
    r = tf.math.rsqrt(mean(tf.square(centred)) + epsilon)
    h = centred * r
    mean_a, mean_ah = mean(along), mean(along * h)
    by_upstream = r * (along - mean_a - h * mean_ah) if needed[0] else None
    by_x = None
    if needed[1]:
        mean_u, mean_uh = mean(upstream), mean(upstream * h)
        by_x = -tf.square(r) * (h * (mean(along * upstream) - mean_u * mean_a - three * mean_uh * mean_ah)
                                + mean_ah * (upstream - mean_u) + mean_uh * (along - mean_a))
    return by_upstream, by_x


class Op(keras.layers.Layer):
    """Base of the built-in ops: one layer that owns its weights.

    Ops are single layers calling ``keras.ops`` directly rather than stacks
    of sublayers: a search supernet holds thousands of them, and every layer
    call and every BN op costs graph-tracing time.

    BN inside an op follows the flavour. ``affine=False`` (search): batch
    statistics in every pass, as DARTS uses them throughout search, no
    parameters and no running averages. ``affine=True`` (derived): gamma and
    beta, and running averages (momentum 0.9, unbiased variance as in the
    reference) used at inference.
    """

    is_identity = False
    is_zero = False

    def __init__(self, channels, stride=1, affine=True, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive integer. Received: channels={channels!r}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2. Received: stride={stride!r}")
        self.channels = channels
        self.stride = stride
        self.affine = affine
        self._norms = {}

    def build(self, input_shape):
        self.build_weights(int(input_shape[-1]))
        self.built = True

    def build_weights(self, in_channels):
        """Create the op's weights for ``in_channels`` input channels."""

    def kernel(self, name, shape):
        return self.add_weight(shape=shape, initializer="glorot_uniform", name=name)

    def norm_weights(self, prefix, channels):
        if not self.affine:
            return
        self._norms[prefix] = (
            self.add_weight(shape=(channels,), initializer="ones", name=f"{prefix}_gamma"),
            self.add_weight(shape=(channels,), initializer="zeros", name=f"{prefix}_beta"),
            # Averaged in float32 under mixed precision too (read without autocasting).
            self.add_weight(shape=(channels,), initializer="zeros", trainable=False, name=f"{prefix}_moving_mean",
                            autocast=False),
            self.add_weight(shape=(channels,), initializer="ones", trainable=False,
                            name=f"{prefix}_moving_variance", autocast=False),
        )

    def norm(self, x, prefix, training):
        if not self.affine:
            return batch_normalize(x)[0]
        gamma, beta, moving_mean, moving_variance = self._norms[prefix]
        if training:
            y, mean, unbiased = batch_normalize(x, gamma, beta)
            mean, unbiased = ops.cast(mean, moving_mean.dtype), ops.cast(unbiased, moving_mean.dtype)
            moving_mean.assign(BN_MOMENTUM * moving_mean + (1.0 - BN_MOMENTUM) * mean)
            moving_variance.assign(BN_MOMENTUM * moving_variance + (1.0 - BN_MOMENTUM) * unbiased)
            return y
        mean, variance = ops.cast(moving_mean, x.dtype), ops.cast(moving_variance, x.dtype)
        return (x - mean) * ops.rsqrt(variance + BN_EPSILON) * gamma + beta

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "stride": self.stride, "affine": self.affine}


def _tensorflow_channels_last():
    """Whether Keras runs on TensorFlow with channels last: where this module builds convolutions as TensorFlow's
    ops."""
    return keras.backend.backend() == "tensorflow" and keras.backend.image_data_format() == "channels_last"


def _raw_convolutions(x, dilation_rate):
    """Whether ``conv``/``depthwise_conv`` build TensorFlow's op directly: TensorFlow, channels last, 2-D, undilated."""
    return dilation_rate == 1 and _tensorflow_channels_last() and len(x.shape) == 4


def conv(x, kernel, strides=1, padding="valid", dilation_rate=1):
    """``ops.conv``; on TensorFlow (channels last, undilated) the ``Conv2D`` op it builds, built directly.

    ``ops.conv`` reaches the op through Keras' and TensorFlow's wrappers
    (``tf.nn.convolution``), and ``ops.depthwise_conv`` through
    ``with_space_to_batch`` even undilated: their Python was about a sixth of a
    SMALL second-order step's tracing (``py-spy``). The op and its attributes
    are the same, so the values are too, bit for bit (the tests compare them
    and their gradients). So is its gradient (``_convolution``).
    """
    if not _raw_convolutions(x, dilation_rate):
        return ops.conv(x, kernel, strides=strides, padding=padding, dilation_rate=dilation_rate)
    return _convolution("Conv2D", x, kernel, strides, padding)


def depthwise_conv(x, kernel, strides=1, padding="valid", dilation_rate=1):
    """``ops.depthwise_conv``; on TensorFlow (channels last, undilated) its ``DepthwiseConv2dNative`` op (see
    ``conv``)."""
    if not _raw_convolutions(x, dilation_rate):
        return ops.depthwise_conv(x, kernel, strides=strides, padding=padding, dilation_rate=dilation_rate)
    return _convolution("DepthwiseConv2dNative", x, kernel, strides, padding)


def _convolution(op, x, kernel, strides, padding):
    """TensorFlow's convolution ``op`` (``Conv2D`` or ``DepthwiseConv2dNative``), with the gradient TensorFlow
    registers for it, built leaner where the shapes are static.

    TensorFlow's gradient passes the input's and the kernel's shapes to the
    two backprop ops, computed again for every convolution (a ``ShapeN`` op,
    or two constants), and builds the kernel's gradient even where no tape
    watches the kernel. With static shapes the gradient here is the same two
    ops with the same attributes, given the shapes as constants the graph
    shares (``graph_constant``), and only for the inputs a tape watches
    (``recorded``): at SMALL 3,100 fewer nodes in a second-order step's
    passes. Values and gradients are the same bit for bit (the tests compare
    them, to second order).
    """
    import tensorflow as tf

    # Keras may hand back its variable, which TensorFlow's ops read as a tensor: the tapes need the tensor.
    x, kernel = (tf.convert_to_tensor(ops.convert_to_tensor(t)) for t in (x, kernel))
    by_input, by_kernel = _BACKPROPS[op]
    attributes = {"strides": [1, strides, strides, 1], "padding": padding.upper()}

    def forward():
        return getattr(tf.raw_ops, op)(input=x, filter=kernel, **attributes)

    if not (x.shape.is_fully_defined() and kernel.shape.is_fully_defined()):
        return forward()
    return recorded(op, [x, kernel], forward,
                    separately([
                        lambda upstream: getattr(tf.raw_ops, by_input)(
                            input_sizes=graph_constant(x.shape, "int32"), filter=kernel, out_backprop=upstream,
                            **attributes),
                        lambda upstream: getattr(tf.raw_ops, by_kernel)(
                            input=x, filter_sizes=graph_constant(kernel.shape, "int32"), out_backprop=upstream,
                            **attributes),
                    ]))


# Each convolution op's two backprop ops, as TensorFlow's registered gradient calls them.
_BACKPROPS = {
    "Conv2D": ("Conv2DBackpropInput", "Conv2DBackpropFilter"),
    "DepthwiseConv2dNative": ("DepthwiseConv2dNativeBackpropInput", "DepthwiseConv2dNativeBackpropFilter"),
}


def _symmetric(convolution, x, kernel, stride=1, padding=0, dilation=1):
    """``conv`` or ``depthwise_conv`` with the reference's symmetric padding."""
    if convolution is depthwise_conv and dilation > 1 and _dilated_depthwise_applies(x, stride, dilation):
        return _dilated_depthwise(x if stride == 1 else _pad(x, padding), kernel, stride, dilation)
    if stride == 1:
        return convolution(x, kernel, strides=1, padding="same", dilation_rate=dilation)
    if padding:
        x = _pad(x, padding)
    return convolution(x, kernel, strides=stride, padding="valid", dilation_rate=dilation)


def _dilated_depthwise_applies(x, stride, dilation):
    """Whether ``_dilated_depthwise`` computes this convolution: TensorFlow, channels last, known height and
    width, and a stride of 1 or equal to the dilation."""
    return (_tensorflow_channels_last() and x.shape[1] is not None and x.shape[2] is not None
            and stride in (1, dilation))


def _dilated_depthwise(x, kernel, stride, dilation):
    """A dilated depthwise convolution as at most three TensorFlow ops, without ``ops.depthwise_conv``'s wrappers.

    At stride 1 (``x`` unpadded, padding ``same``, which is symmetric for odd
    kernels) these are the ops ``tf.nn.depthwise_conv2d`` builds for a
    dilation: the grid split into ``dilation``-strided sub-grids stacked in the
    batch (``SpaceToBatchND``), an undilated convolution of each, and the
    sub-grids put back (``BatchToSpaceND``), with the paddings and crops it
    computes, here from the static height and width. Its Python wrapper
    (``with_space_to_batch``) was a tenth of a SMALL second-order step's
    tracing.

    At a stride equal to the dilation (``x`` already padded, ``valid``),
    output ``i`` reads inputs ``stride * (i + k)``: an undilated convolution
    of every ``stride``-th row and column. ``ops.depthwise_conv`` computes the
    dilated convolution at every position and then keeps every
    ``stride``-th, four times the arithmetic at stride 2.

    Both give the values of ``ops.depthwise_conv`` and their gradients bit for
    bit, but for the kernel's gradient at a stride, which is a sum over fewer
    positions (``ops.depthwise_conv``'s also adds the zeros of the positions
    it discards) and may differ in the last bit (the tests compare them).
    """
    import tensorflow as tf

    kernel = ops.convert_to_tensor(kernel)  # as ops.depthwise_conv reads it (autocast under mixed precision)

    def convolve(inputs):
        return _convolution("DepthwiseConv2dNative", inputs, kernel, 1, "valid")

    if stride > 1:
        return convolve(every(x, stride))
    reach = dilation * (int(kernel.shape[0]) - 1), dilation * (int(kernel.shape[1]) - 1)
    before = [r // 2 for r in reach]
    extra = [-(int(n) + r) % dilation for n, r in zip(x.shape[1:3], reach)]
    paddings = [[b, r - b + e] for b, r, e in zip(before, reach, extra)]
    block_shape = graph_constant([dilation, dilation], "int32")
    blocks = tf.raw_ops.SpaceToBatchND(input=x, block_shape=block_shape, paddings=graph_constant(paddings, "int32"))
    return tf.raw_ops.BatchToSpaceND(input=convolve(blocks), block_shape=block_shape,
                                     crops=graph_constant([[0, e] for e in extra], "int32"))


@keras.saving.register_keras_serializable(package=PACKAGE)
class ReLUConvBN(Op):
    """ReLU -> kxk conv (no bias) -> BN."""

    def __init__(self, channels, stride=1, affine=True, kernel_size=1, padding=0, **kwargs):
        super().__init__(channels, stride, affine, **kwargs)
        self.kernel_size = kernel_size
        self.padding = padding

    def build_weights(self, in_channels):
        k = self.kernel_size
        self.conv_kernel = self.kernel("conv", (k, k, in_channels, self.channels))
        self.norm_weights("bn", self.channels)

    def call(self, x, training=None):
        x = _symmetric(conv, ops.relu(x), self.conv_kernel, self.stride, self.padding)
        return self.norm(x, "bn", training)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "padding": self.padding}


@keras.saving.register_keras_serializable(package=PACKAGE)
class SepConv(Op):
    """The DARTS separable conv: (ReLU, depthwise kxk, pointwise 1x1, BN) twice; only the first is strided."""

    def __init__(self, channels, stride=1, affine=True, kernel_size=3, **kwargs):
        super().__init__(channels, stride, affine, **kwargs)
        self.kernel_size = kernel_size

    def build_weights(self, in_channels):
        k = self.kernel_size
        self.depthwise_1 = self.kernel("depthwise_1", (k, k, in_channels, 1))
        self.pointwise_1 = self.kernel("pointwise_1", (1, 1, in_channels, in_channels))
        self.norm_weights("bn_1", in_channels)
        self.depthwise_2 = self.kernel("depthwise_2", (k, k, in_channels, 1))
        self.pointwise_2 = self.kernel("pointwise_2", (1, 1, in_channels, self.channels))
        self.norm_weights("bn_2", self.channels)

    def call(self, x, training=None):
        pad = (self.kernel_size - 1) // 2
        x = _symmetric(depthwise_conv, ops.relu(x), self.depthwise_1, self.stride, pad)
        x = self.norm(conv(x, self.pointwise_1), "bn_1", training)
        x = _symmetric(depthwise_conv, ops.relu(x), self.depthwise_2, 1, pad)
        return self.norm(conv(x, self.pointwise_2), "bn_2", training)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size}


@keras.saving.register_keras_serializable(package=PACKAGE)
class DilConv(Op):
    """ReLU, depthwise kxk with dilation 2 (strided), pointwise 1x1, BN."""

    def __init__(self, channels, stride=1, affine=True, kernel_size=3, dilation=2, **kwargs):
        super().__init__(channels, stride, affine, **kwargs)
        self.kernel_size = kernel_size
        self.dilation = dilation

    def build_weights(self, in_channels):
        k = self.kernel_size
        self.depthwise = self.kernel("depthwise", (k, k, in_channels, 1))
        self.pointwise = self.kernel("pointwise", (1, 1, in_channels, self.channels))
        self.norm_weights("bn", self.channels)

    def call(self, x, training=None):
        pad = self.dilation * (self.kernel_size - 1) // 2
        x = _symmetric(depthwise_conv, ops.relu(x), self.depthwise, self.stride, pad, self.dilation)
        return self.norm(conv(x, self.pointwise), "bn", training)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "dilation": self.dilation}


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaxPool3x3(Op):
    """3x3 max pooling, padding 1 (padded cells never win).

    At stride 2, in training the border is padded with minus infinity; in
    inference with a mirror of the edge row and column (``symmetric``). Each
    mirrored cell copies a cell of its own window, so the maxima (and the
    elements their gradients reach) are the same, and the graphs that are
    exported hold no infinite constant, which integer quantisation cannot
    represent. Training keeps the constant pad: its gradient is 2.5x faster
    on a CPU than the mirror pad's.
    """

    def call(self, x, training=None):
        if self.stride == 1:
            return ops.max_pool(x, 3, strides=1, padding="same")
        if training:
            padded = _pad(x, 1, float("-inf"))
        else:
            padded = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="symmetric")
        return ops.max_pool(padded, 3, strides=2, padding="valid")


@keras.saving.register_keras_serializable(package=PACKAGE)
class AvgPool3x3(Op):
    """3x3 average pooling, padding 1, padded cells excluded from the mean."""

    def call(self, x, training=None):
        if self.stride == 1:
            return ops.average_pool(x, 3, strides=1, padding="same")
        total = ops.average_pool(_pad(x, 1), 3, strides=2, padding="valid")
        count = ops.average_pool(_pad(ops.ones_like(x[:1, :, :, :1]), 1), 3, strides=2, padding="valid")
        return total / count


@keras.saving.register_keras_serializable(package=PACKAGE)
class Identity(Op):
    is_identity = True

    def call(self, x, training=None):
        return x


@keras.saving.register_keras_serializable(package=PACKAGE)
class IdentityConv1x1(Op):
    """A 1x1 convolution without bias whose kernel starts as the identity (DARTS-' ``conv1`` auxiliary path)."""

    def build_weights(self, in_channels):
        if in_channels != self.channels:
            raise ValueError(f"An identity-initialised 1x1 convolution needs as many input as output channels. "
                             f"Received: in_channels={in_channels}, channels={self.channels}")
        self.kernel_1 = self.add_weight(shape=(1, 1, in_channels, self.channels), initializer=_identity_kernel,
                                        name="conv")

    def call(self, x, training=None):
        return conv(x, self.kernel_1, strides=1, padding="valid")


def _identity_kernel(shape, dtype=None):
    return ops.reshape(ops.eye(shape[2], shape[3], dtype=dtype), shape)


@keras.saving.register_keras_serializable(package=PACKAGE)
class Zero(Op):
    """Zeros of the output shape. Mixtures skip it: its term is exactly zero."""

    is_zero = True

    def call(self, x, training=None):
        if self.stride == 1:
            return ops.zeros_like(x)
        return ops.zeros_like(x[:, :: self.stride, :: self.stride, :])


@keras.saving.register_keras_serializable(package=PACKAGE)
class FactorizedReduce(Op):
    """ReLU, two 1x1 stride-2 convs (C/2 outputs each, the second on x shifted by one pixel), concat, BN."""

    def __init__(self, channels, stride=2, affine=True, **kwargs):
        super().__init__(channels, stride, affine, **kwargs)
        if channels % 2:
            raise ValueError(f"FactorizedReduce needs an even channel count. Received: channels={channels}")

    def build_weights(self, in_channels):
        half = self.channels // 2
        self.kernel_1 = self.kernel("conv_1", (1, 1, in_channels, half))
        self.kernel_2 = self.kernel("conv_2", (1, 1, in_channels, half))
        self.norm_weights("bn", self.channels)

    def call(self, x, training=None):
        x = ops.relu(x)
        left = conv(x, self.kernel_1, strides=2, padding="valid")
        right = conv(shifted(x), self.kernel_2, strides=2, padding="valid")
        return self.norm(ops.concatenate([left, right], axis=-1), "bn", training)


@keras.saving.register_keras_serializable(package=PACKAGE)
class PoolBN(keras.layers.Layer):
    """An op followed by a BN without affine parameters (pools in the search network)."""

    def __init__(self, op, **kwargs):
        super().__init__(**kwargs)
        self.op = op if isinstance(op, keras.layers.Layer) else keras.saving.deserialize_keras_object(op)
        self.is_identity = False
        self.is_zero = False

    def build(self, input_shape):
        self.built = True

    def call(self, x, training=None):
        return batch_normalize(self.op(x, training=training))[0]

    def get_config(self):
        return {**super().get_config(), "op": keras.saving.serialize_keras_object(self.op)}


def register_op(name, factory, batch_norm_in_search=False):
    """Register a candidate op under ``name`` for use in YAML specs.

    ``factory(channels, stride, affine, name)`` must return a Keras layer
    mapping ``(B, H, W, C)`` to ``(B, H/stride, W/stride, channels)``; to save
    and reload models, its class must be registered with
    ``keras.saving.register_keras_serializable``. A spec can import the
    module that calls this with ``plugins: [module]``.
    """
    register_conv_operation(name, factory, batch_norm_in_search)


def unregister_op(name):
    """Remove an op registered with ``register_op``; built-in ops stay."""
    unregister_conv_operation(name)


def op_definition(name):
    return conv_operation(name)


def build_op(name, channels, stride, affine, layer_name, search=False):
    """Build op ``name``; in the search flavour, wrap it with a BN if its definition asks."""
    definition = op_definition(name)
    if search and definition.batch_norm_in_search:
        inner = definition.factory(channels, stride, affine, f"{layer_name}__op")
        return PoolBN(inner, name=layer_name)
    return definition.factory(channels, stride, affine, layer_name)


def _skip(channels, stride, affine, name):
    if stride == 1:
        return Identity(channels, stride, affine, name=name)
    return FactorizedReduce(channels, stride, affine, name=name)


def _register_builtins():
    builtins = {
        ZERO_OPERATION: (lambda c, s, a, n: Zero(c, s, a, name=n), False),
        "max_pool_3x3": (lambda c, s, a, n: MaxPool3x3(c, s, a, name=n), True),
        "avg_pool_3x3": (lambda c, s, a, n: AvgPool3x3(c, s, a, name=n), True),
        "skip_connect": (_skip, False),
        **{f"sep_conv_{k}x{k}": (lambda c, s, a, n, k=k: SepConv(c, s, a, kernel_size=k, name=n), False)
           for k in (3, 5)},
        **{f"dil_conv_{k}x{k}": (lambda c, s, a, n, k=k: DilConv(c, s, a, kernel_size=k, name=n), False)
           for k in (3, 5)},
    }
    if tuple(builtins) != DARTS_CONV_OPERATIONS:
        raise RuntimeError(f"built-in ops defined out of DARTS order: {tuple(builtins)}")
    for name, (factory, batch_norm_in_search) in builtins.items():
        register_conv_operation(name, factory, batch_norm_in_search, builtin=True)


_register_builtins()
