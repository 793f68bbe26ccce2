"""Names of the candidate operations a spec may use.

The compiler owns what an operation *is* (a Keras layer factory); this module
only knows which names exist, so that a spec can be checked without importing
TensorFlow. Registering an op with the compiler registers its name here too.
"""

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

_conv_operation_names = dict.fromkeys(DARTS_CONV_OPERATIONS)


def register_conv_operation_name(name):
    """Make ``name`` a valid op name in conv_cell specs."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"An op name must be a non-empty string without '/'. Received: name={name!r}")
    _conv_operation_names[name] = None


def unregister_conv_operation_name(name):
    """Forget a name added with ``register_conv_operation_name`` (built-in names stay)."""
    if name in DARTS_CONV_OPERATIONS:
        raise ValueError(f"Built-in ops cannot be unregistered. Received: name={name!r}")
    _conv_operation_names.pop(name, None)


def known_conv_operations():
    """All conv op names, built-in ones first in DARTS order."""
    return tuple(_conv_operation_names)


def known_recurrent_operations():
    """The activations a recurrent cell's edges may apply."""
    return DARTS_RECURRENT_OPERATIONS
