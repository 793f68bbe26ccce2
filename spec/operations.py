"""The candidate operations a spec may use: one registry for spec validation and the compiler.

A name maps to an ``OpDefinition`` whose factory the compiler calls; this
module stores factories without calling them, so a spec can be checked
without importing TensorFlow. ``keras_darts.compiler.register_op`` is the
public way to add an op.
"""

import dataclasses

DARTS_CONV_OPERATIONS = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)

DARTS_RECURRENT_OPERATIONS = ("none", "tanh", "relu", "sigmoid", "identity")

# The operation that outputs zeros: a search candidate, never derived.
ZERO_OPERATION = "none"



@dataclasses.dataclass(frozen=True)
class OpDefinition:
    """How to build one named convolutional op.

    ``factory(channels, stride, affine, name)`` returns a Keras layer (the
    compiler calls it; this layer never does, so it needs no TensorFlow).
    ``batch_norm_in_search`` adds a non-affine BN after it in the search
    network (the reference does this for pooling). The built-in names are
    known from the start; the compiler gives them their factories on import.
    """

    name: str
    factory: object = None
    batch_norm_in_search: bool = False


# The one registry of conv ops: spec validation reads its names, the compiler its factories.
_CONV_OPERATIONS = {name: OpDefinition(name) for name in DARTS_CONV_OPERATIONS}


def register_conv_operation(name, factory, batch_norm_in_search=False, builtin=False):
    """Register (or, for a built-in name with ``builtin=True``, define) the conv op ``name``."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"An op name must be a non-empty string without '/'. Received: name={name!r}")
    if not callable(factory):
        raise ValueError(f"factory must be callable. Received: factory={factory!r}")
    if name in DARTS_CONV_OPERATIONS and not builtin:
        raise ValueError(f"Built-in ops cannot be replaced. Received: name={name!r}")
    _CONV_OPERATIONS[name] = OpDefinition(name, factory, batch_norm_in_search)


def unregister_conv_operation(name):
    """Forget an op added with ``register_conv_operation`` (built-in ops stay)."""
    if name in DARTS_CONV_OPERATIONS:
        raise ValueError(f"Built-in ops cannot be unregistered. Received: name={name!r}")
    _CONV_OPERATIONS.pop(name, None)


def conv_operation(name):
    """The ``OpDefinition`` of conv op ``name``."""
    try:
        return _CONV_OPERATIONS[name]
    except KeyError:
        raise ValueError(f"Unknown op. Expected one of {list(_CONV_OPERATIONS)}. Received: name={name!r}") from None


def known_conv_operations():
    """All conv op names, built-in ones first in DARTS order."""
    return tuple(_CONV_OPERATIONS)


def known_recurrent_operations():
    """The activations a recurrent cell's edges may apply."""
    return DARTS_RECURRENT_OPERATIONS
