"""The candidate operations, as Keras layers, and the registry of op names.

Every op maps a ``(batch, H, W, C)`` tensor to ``(batch, H/stride, W/stride,
channels)``. Convolutions have no bias and run ReLU -> conv -> BN. Padding is
symmetric as in the reference (for a stride-2 window the reference pads both
sides; Keras' ``"same"`` would pad only the bottom/right), so stride-2 ops pad
explicitly and use ``"valid"``; at stride 1 ``"same"`` is the same thing.

``affine`` chooses the flavour: the search network's BNs have no affine
parameters (``affine=False``), derived networks' BNs do.
"""

import dataclasses

import keras
from keras import ops

from keras_darts.spec import DARTS_CONV_OPERATIONS, ZERO_OPERATION, register_conv_operation_name

PACKAGE = "keras_darts"
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1
BN_EPSILON = 1e-5


def batch_norm(affine, name):
    return keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, center=affine, scale=affine, name=name
    )


def _pad(x, amount, value=0.0):
    return ops.pad(x, [[0, 0], [amount, amount], [amount, amount], [0, 0]], constant_values=value)


class Op(keras.layers.Layer):
    """Base of the built-in ops: stores ``channels``, ``stride``, ``affine``."""

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

    def sub(self, suffix):
        return f"{self.name}__{suffix}"

    def build(self, input_shape):
        self.built = True

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "stride": self.stride, "affine": self.affine}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ReLUConvBN(Op):
    """ReLU -> kxk conv (no bias) -> BN."""

    def __init__(self, channels, stride=1, affine=True, kernel_size=1, padding=0, **kwargs):
        super().__init__(channels, stride, affine, **kwargs)
        self.kernel_size = kernel_size
        self.padding = padding
        self.conv = keras.layers.Conv2D(
            channels, kernel_size, strides=stride, padding="valid", use_bias=False, name=self.sub("conv")
        )
        self.bn = batch_norm(affine, self.sub("bn"))

    def call(self, x, training=None):
        x = ops.relu(x)
        if self.padding:
            x = _pad(x, self.padding)
        return self.bn(self.conv(x), training=training)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "padding": self.padding}


class _DepthwisePointwise(keras.layers.Layer):
    """Depthwise kxk (optionally dilated and strided) then pointwise 1x1, no biases."""

    def __init__(self, channels, kernel_size, stride, dilation, name):
        super().__init__(name=name)
        self.stride = stride
        self.padding = dilation * (kernel_size - 1) // 2
        same = stride == 1
        self.depthwise = keras.layers.DepthwiseConv2D(
            kernel_size,
            strides=stride,
            padding="same" if same else "valid",
            dilation_rate=dilation,
            use_bias=False,
            name=f"{name}__depthwise",
        )
        self.pointwise = keras.layers.Conv2D(channels, 1, use_bias=False, name=f"{name}__pointwise")

    def build(self, input_shape):
        self.built = True

    def call(self, x):
        if self.stride != 1:
            x = _pad(x, self.padding)
        return self.pointwise(self.depthwise(x))


@keras.saving.register_keras_serializable(package=PACKAGE)
class SepConv(Op):
    """The DARTS separable conv: (ReLU, depthwise kxk, pointwise, BN) twice; only the first is strided."""

    def __init__(self, channels, stride=1, affine=True, kernel_size=3, **kwargs):
        super().__init__(channels, stride, affine, **kwargs)
        self.kernel_size = kernel_size
        self.unit1 = _DepthwisePointwise(channels, kernel_size, stride, 1, self.sub("sep1"))
        self.bn1 = batch_norm(affine, self.sub("bn1"))
        self.unit2 = _DepthwisePointwise(channels, kernel_size, 1, 1, self.sub("sep2"))
        self.bn2 = batch_norm(affine, self.sub("bn2"))

    def call(self, x, training=None):
        x = self.bn1(self.unit1(ops.relu(x)), training=training)
        return self.bn2(self.unit2(ops.relu(x)), training=training)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size}


@keras.saving.register_keras_serializable(package=PACKAGE)
class DilConv(Op):
    """ReLU, depthwise kxk with dilation 2 (strided), pointwise 1x1, BN."""

    def __init__(self, channels, stride=1, affine=True, kernel_size=3, dilation=2, **kwargs):
        super().__init__(channels, stride, affine, **kwargs)
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.unit = _DepthwisePointwise(channels, kernel_size, stride, dilation, self.sub("dil"))
        self.bn = batch_norm(affine, self.sub("bn"))

    def call(self, x, training=None):
        return self.bn(self.unit(ops.relu(x)), training=training)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "dilation": self.dilation}


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaxPool3x3(Op):
    """3x3 max pooling, padding 1 (padded cells never win)."""

    def call(self, x, training=None):
        if self.stride == 1:
            return ops.max_pool(x, 3, strides=1, padding="same")
        return ops.max_pool(_pad(x, 1, float("-inf")), 3, strides=2, padding="valid")


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
        half = channels // 2
        self.conv_1 = keras.layers.Conv2D(half, 1, strides=2, use_bias=False, name=self.sub("conv_1"))
        self.conv_2 = keras.layers.Conv2D(half, 1, strides=2, use_bias=False, name=self.sub("conv_2"))
        self.bn = batch_norm(affine, self.sub("bn"))

    def call(self, x, training=None):
        x = ops.relu(x)
        out = ops.concatenate([self.conv_1(x), self.conv_2(x[:, 1:, 1:, :])], axis=-1)
        return self.bn(out, training=training)


@keras.saving.register_keras_serializable(package=PACKAGE)
class PoolBN(keras.layers.Layer):
    """An op followed by a BN without affine parameters (pools in the search network)."""

    def __init__(self, op, **kwargs):
        super().__init__(**kwargs)
        self.op = op if isinstance(op, keras.layers.Layer) else keras.saving.deserialize_keras_object(op)
        self.bn = batch_norm(False, f"{self.name}__bn")
        self.is_identity = False
        self.is_zero = False

    def build(self, input_shape):
        self.built = True

    def call(self, x, training=None):
        return self.bn(self.op(x, training=training), training=training)

    def get_config(self):
        return {**super().get_config(), "op": keras.saving.serialize_keras_object(self.op)}


@dataclasses.dataclass(frozen=True)
class OpDefinition:
    """How to build one named op.

    ``factory(channels, stride, affine, name)`` returns a Keras layer.
    ``batch_norm_in_search`` adds a non-affine BN after it in the search
    network (the reference does this for pooling). ``parameter_free`` marks
    ops with no weights (for collapse diagnostics).
    """

    name: str
    factory: object
    batch_norm_in_search: bool = False
    parameter_free: bool = False


_REGISTRY = {}


def register_op(name, factory, batch_norm_in_search=False, parameter_free=False):
    """Register a candidate op under ``name`` for use in YAML specs.

    ``factory(channels, stride, affine, name)`` must return a Keras layer
    mapping ``(B, H, W, C)`` to ``(B, H/stride, W/stride, channels)``; to save
    and reload models, its class must be registered with
    ``keras.saving.register_keras_serializable``.
    """
    if not callable(factory):
        raise ValueError(f"factory must be callable. Received: factory={factory!r}")
    register_conv_operation_name(name)
    _REGISTRY[name] = OpDefinition(name, factory, batch_norm_in_search, parameter_free)


def op_definition(name):
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown op. Expected one of {sorted(_REGISTRY)}. Received: name={name!r}") from None


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
    register_op(ZERO_OPERATION, lambda c, s, a, n: Zero(c, s, a, name=n), parameter_free=True)
    register_op("max_pool_3x3", lambda c, s, a, n: MaxPool3x3(c, s, a, name=n), True, True)
    register_op("avg_pool_3x3", lambda c, s, a, n: AvgPool3x3(c, s, a, name=n), True, True)
    register_op("skip_connect", _skip, parameter_free=True)
    for k in (3, 5):
        register_op(f"sep_conv_{k}x{k}", lambda c, s, a, n, k=k: SepConv(c, s, a, kernel_size=k, name=n))
    for k in (3, 5):
        register_op(f"dil_conv_{k}x{k}", lambda c, s, a, n, k=k: DilConv(c, s, a, kernel_size=k, name=n))
    if tuple(_REGISTRY) != DARTS_CONV_OPERATIONS:
        raise RuntimeError(f"built-in ops registered out of DARTS order: {tuple(_REGISTRY)}")


_register_builtins()
