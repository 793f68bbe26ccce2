"""Mixed precision: Keras dtype policies on a built model, and dynamic loss scaling.

``search.precision`` and ``retrain.precision`` take ``float32`` (the
default), ``mixed_bfloat16`` or ``mixed_float16``: Keras' policies, under
which every layer keeps its variables in float32 and computes in the
16-bit type. What stays in float32 whatever the policy:

* the weights, the alphas (read without autocasting, so their softmax is
  float32 too), the method's schedule, and every optimiser's state;
* the loss: the logits are cast to float32 before the cross-entropy;
* the second-order arithmetic: the virtual step, the finite-difference
  radius and the Hessian-vector product's difference. The two perturbed
  passes of the finite difference run in float32 as well: their weights
  differ by ``R v`` (0.01 over ``||v||``, about 1e-4 per weight in a
  small supernet), below the resolution of a weight of 0.1 in bfloat16
  (8 significant bits: 4e-4), so in 16 bits both passes would often see the
  same weights.

Under ``mixed_float16`` the loss is scaled before every backward pass and
the gradients unscaled after it, by Keras' rule for ``LossScaleOptimizer``
(which wraps Keras optimisers, not these): start at 2^15; a step whose
gradients are not all finite is skipped and halves the scale; 2000 finite
steps in a row double it.
"""

import contextlib

import tensorflow as tf

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
INITIAL_LOSS_SCALE = 2.0**15
LOSS_SCALE_GROWTH_STEPS = 2000


def layers_of(model):
    """The model and every layer inside it."""
    return list(model._flatten_layers(include_self=True, recursive=True))


def set_precision(model, precision):
    """Give every layer of a built ``model`` the dtype policy ``precision``; returns the model.

    Variables are float32 under every policy in ``PRECISIONS``, so a built
    model changes only what its layers compute in. ``float32`` resets only
    layers under a mixed policy: a model built under another uniform policy
    (float64, as gradient checks use) keeps it.
    """
    for layer in _layers_to_set(model, precision):
        layer.dtype_policy = precision
    return model


def _layers_to_set(model, precision):
    """The layers ``precision`` changes: all of them, or under ``float32`` those with a mixed policy."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}. Received: precision={precision!r}")
    return [layer for layer in layers_of(model)
            if precision != "float32" or layer.compute_dtype != layer.variable_dtype]


def precision_note(precision):
    """What a log line adds for ``precision``: nothing for float32."""
    return "" if precision == "float32" else f", {precision}"


@contextlib.contextmanager
def computing_in(model, precision):
    """Trace ``model`` under ``precision`` inside the block (as ``set_precision`` sets it); its policies after it."""
    layers = _layers_to_set(model, precision)
    previous = [layer.dtype_policy for layer in layers]
    try:
        for layer in layers:
            layer.dtype_policy = precision
        yield
    finally:
        for layer, policy in zip(layers, previous):
            layer.dtype_policy = policy


def all_finite(tensors):
    """One boolean: every element of every tensor is finite."""
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])


class NoLossScale:
    """Float32 and bfloat16: losses and gradients as they are, every step taken."""

    enabled = False

    def scale(self, value):
        return value

    def unscale(self, gradients):
        return gradients

    def apply(self, optimizer, gradients, learning_rate):
        return optimizer.apply(gradients, learning_rate)


class DynamicLossScale(tf.Module):
    """Float16 loss scaling (see the module's docstring); its state is checkpointed with the optimisers."""

    enabled = True

    def __init__(self, initial=INITIAL_LOSS_SCALE, growth_steps=LOSS_SCALE_GROWTH_STEPS, name="loss_scale"):
        super().__init__(name=name)
        self.growth_steps = int(growth_steps)
        self.value = tf.Variable(float(initial), dtype=tf.float32, trainable=False, name="scale",
                                 aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.finite_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="finite_steps",
                                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def scale(self, value):
        """The value to differentiate: ``value`` times the scale."""
        return value * tf.cast(self.value, value.dtype)

    def unscale(self, gradients):
        """Gradients of a scaled value divided back, in their own (float32) dtype."""
        return [None if g is None else g / tf.cast(self.value, g.dtype) for g in gradients]

    def apply(self, optimizer, gradients, learning_rate):
        """``optimizer.apply`` if every gradient is finite, else nothing; then the scale's update.

        Returns the optimiser's gradient norm (NaN for a skipped step).
        """
        finite = all_finite([g for g in gradients if g is not None])
        norm = tf.cond(finite, lambda: tf.cast(optimizer.apply(gradients, learning_rate), tf.float32),
                       lambda: tf.constant(float("nan"), tf.float32))
        grown = self.finite_steps + 1 >= self.growth_steps
        self.value.assign(tf.where(finite, tf.where(grown, self.value * 2.0, self.value), self.value / 2.0))
        self.finite_steps.assign(tf.where(finite & ~grown, self.finite_steps + 1, tf.zeros_like(self.finite_steps)))
        return norm


def loss_scale_for(precision):
    """``DynamicLossScale()`` under ``mixed_float16``, else ``NoLossScale()``."""
    return DynamicLossScale() if precision == "mixed_float16" else NoLossScale()
