"""The reference optimisers, stated exactly.

Keras' SGD keeps its momentum buffer scaled by the learning rate and its
``weight_decay`` is decoupled; DARTS' reference (PyTorch) does neither. These
two small optimisers reproduce the reference semantics:

SGD (weights), per step, on gradients ``g`` of the loss:
    g <- g * min(1, clip / (||g||_2 + 1e-6))     (global norm, if clip is set)
    d <- g + weight_decay * w                     (coupled L2)
    m <- momentum * m + d                         (m = 0 before the first step)
    w <- w - lr * m

Adam (architecture), per step:
    d <- g + weight_decay * a                     (coupled L2)
    m1 <- b1 m1 + (1 - b1) d;  m2 <- b2 m2 + (1 - b2) d^2;  t <- t + 1
    a <- a - lr / (1 - b1^t) * m1 / (sqrt(m2) / sqrt(1 - b2^t) + eps)

Each optimiser is built on its own list of variables and only ever updates
those: ``apply`` takes gradients in that list's order.

A supernet has hundreds of weights but few distinct shapes, so the arithmetic
on lists of them stacks each group of equal shape and computes it once
(``elementwise``): the same values, bit for bit, from a traced graph with a
few operations per shape instead of per tensor, which builds faster. Norms
stay per tensor (``tf.linalg.global_norm``): a norm summed in another order
differs in its last bits, and one epoch of retraining on digits turned such a
difference into test losses 1.8e-3 apart.
"""

import math

import tensorflow as tf


def cosine_learning_rate(epoch, epochs, maximum, minimum):
    """The per-epoch cosine schedule: ``min + (max - min) (1 + cos(pi e / E)) / 2``."""
    return minimum + (maximum - minimum) * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0


def clip_coefficient(norm, max_norm):
    """PyTorch's clipping factor ``min(1, max_norm / (norm + 1e-6))``, in ``norm``'s dtype."""
    return tf.minimum(tf.ones((), norm.dtype), max_norm / (norm + 1e-6))


def shape_groups(tensors):
    """The positions of ``tensors`` grouped by static shape and dtype, groups in order of first appearance.

    A tensor whose shape is not fully known when traced is a group of its own.
    """
    groups = {}
    for position, tensor in enumerate(tensors):
        key = (tuple(tensor.shape), tensor.dtype) if tensor.shape.is_fully_defined() else position
        groups.setdefault(key, []).append(position)
    return list(groups.values())


def elementwise(function, *lists):
    """``[function(*items) for items in zip(*lists)]``, with one call per group of equal shape.

    ``function`` takes and returns tensors of one shape, element by element
    (arithmetic, no reduction); it may return a tuple, and then so does this,
    one list per output. The tensors of each group (``shape_groups`` of the
    first list) are stacked, ``function`` runs once on the stacks, and the
    results are unstacked into their places: every element is computed by the
    same operations as alone, so the values are the same. What changes is the
    traced graph: a few operations per shape instead of a few per tensor, which
    in a second-order search step is most of its nodes, each one costing time
    to trace and to build (the stacks copy the weights a few times per step).
    The lists must not be empty.
    """
    lists = [[tf.convert_to_tensor(item) for item in items] for items in lists]
    results = None
    for positions in shape_groups(lists[0]):
        if len(positions) == 1:
            outputs = function(*(items[positions[0]] for items in lists))
            pieces = [[value] for value in (outputs if isinstance(outputs, tuple) else (outputs,))]
        else:
            outputs = function(*(tf.stack([items[p] for p in positions]) for items in lists))
            pieces = [tf.unstack(value, num=len(positions))
                      for value in (outputs if isinstance(outputs, tuple) else (outputs,))]
        if results is None:
            results = [[None] * len(lists[0]) for _ in pieces]
        for result, values in zip(results, pieces):
            for position, value in zip(positions, values):
                result[position] = value
    return results if isinstance(outputs, tuple) else results[0]


def clip_by_global_norm(gradients, max_norm):
    """PyTorch's ``clip_grad_norm_``: scale by ``clip_coefficient``; returns the clipped gradients and the norm."""
    norm = tf.linalg.global_norm(gradients)
    scale = tf.cast(clip_coefficient(norm, max_norm), gradients[0].dtype)
    return elementwise(lambda g: g * scale, gradients), norm


def scalar(value, dtype):
    """``value`` as a scalar tensor of ``dtype``; Python numbers go straight to it, not via float32."""
    if isinstance(value, (int, float)):
        return tf.constant(value, dtype)
    return tf.cast(value, dtype)


def _handle(variable):
    """The variable's resource handle: in a replica context, that replica's own copy."""
    return variable.handle


def assign(variable, value):
    tf.raw_ops.AssignVariableOp(resource=_handle(variable), value=tf.cast(value, variable.dtype))


def assign_sub(variable, value):
    tf.raw_ops.AssignSubVariableOp(resource=_handle(variable), value=tf.cast(value, variable.dtype))


def _dense(gradients, variables):
    return [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(gradients, variables)]


class _Optimizer(tf.Module):
    def __init__(self, variables, name):
        super().__init__(name=name)
        self.variables_list = list(variables)
        if not self.variables_list:
            raise ValueError(f"{name} needs at least one variable to optimise.")
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")

    def _check(self, gradients):
        if len(gradients) != len(self.variables_list):
            raise ValueError(
                f"{self.name} was built on {len(self.variables_list)} variables. Received: {len(gradients)} gradients"
            )

    def _slots(self, suffix):
        return [
            tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name=f"{suffix}_{i}")
            for i, v in enumerate(self.variables_list)
        ]


class CoupledSGD(_Optimizer):
    """SGD with PyTorch momentum, coupled weight decay and global-norm clipping."""

    def __init__(self, variables, momentum=0.9, weight_decay=3e-4, grad_clip=5.0, name="weights_optimizer"):
        super().__init__(variables, name)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.momentum_buffers = self._slots("momentum")

    @classmethod
    def from_config(cls, variables, config, name="weights_optimizer"):
        return cls(variables, config.momentum, config.weight_decay, config.grad_clip, name=name)

    def apply(self, gradients, learning_rate):
        """One real step; returns the gradient norm before clipping."""
        self._check(gradients)
        gradients = _dense(gradients, self.variables_list)
        norm = tf.linalg.global_norm(gradients)
        # Scalars are made once, not once per variable: a supernet has >1000 variables.
        dtype = self.variables_list[0].dtype
        lr = scalar(learning_rate, dtype)
        momentum = tf.constant(self.momentum, dtype)
        decay = tf.constant(self.weight_decay, dtype)
        scale = None if self.grad_clip is None else tf.cast(clip_coefficient(norm, self.grad_clip), dtype)
        if self.weight_decay:
            directions = elementwise(lambda g, w: (g if scale is None else g * scale) + decay * w, gradients,
                                     self.variables_list)
        else:
            directions = gradients if scale is None else elementwise(lambda g: g * scale, gradients)
        for variable, direction, buffer in zip(self.variables_list, directions, self.momentum_buffers):
            # One fused kernel: buffer <- momentum * buffer + direction; w <- w - lr * buffer.
            tf.raw_ops.ResourceApplyMomentum(
                var=_handle(variable), accum=_handle(buffer), lr=lr, grad=direction, momentum=momentum
            )
        tf.raw_ops.AssignAddVariableOp(resource=_handle(self.iterations), value=tf.constant(1, tf.int64))
        return norm

    def virtual_step(self, values, gradients, learning_rate):
        """The next SGD iterate from ``values`` without clipping (DARTS' unrolled step).

        ``w' = w - lr * (momentum * m + g + weight_decay * w)``; no variable changes.
        """
        self._check(gradients)
        gradients = _dense(gradients, self.variables_list)
        dtype = self.variables_list[0].dtype
        lr = scalar(learning_rate, dtype)
        momentum = tf.constant(self.momentum, dtype)
        decay = tf.constant(self.weight_decay, dtype)
        return elementwise(lambda w, g, m: w - lr * (momentum * m + g + decay * w), values, gradients,
                           self.momentum_buffers)


class CoupledAdam(_Optimizer):
    """Adam with PyTorch's epsilon placement and coupled weight decay."""

    def __init__(self, variables, beta_1=0.5, beta_2=0.999, epsilon=1e-8, weight_decay=1e-3, name="arch_optimizer"):
        super().__init__(variables, name)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.weight_decay = float(weight_decay)
        self.first_moments = self._slots("m")
        self.second_moments = self._slots("v")

    @classmethod
    def from_config(cls, variables, config, name="arch_optimizer"):
        return cls(variables, config.beta_1, config.beta_2, config.epsilon, config.weight_decay, name=name)

    def apply(self, gradients, learning_rate):
        self._check(gradients)
        gradients = _dense(gradients, self.variables_list)
        tf.raw_ops.AssignAddVariableOp(resource=_handle(self.iterations), value=tf.constant(1, tf.int64))
        dtype = self.variables_list[0].dtype
        t = tf.cast(self.iterations.read_value(), dtype)
        beta_1 = tf.constant(self.beta_1, dtype)
        beta_2 = tf.constant(self.beta_2, dtype)
        decay = tf.constant(self.weight_decay, dtype)
        step_size = scalar(learning_rate, dtype) / (1.0 - tf.pow(beta_1, t))
        root_correction_2 = tf.sqrt(1.0 - tf.pow(beta_2, t))
        for variable, gradient, m1, m2 in zip(
            self.variables_list, gradients, self.first_moments, self.second_moments
        ):
            direction = gradient + decay * variable
            first = beta_1 * m1 + (1.0 - beta_1) * direction
            second = beta_2 * m2 + (1.0 - beta_2) * tf.square(direction)
            assign(m1, first)
            assign(m2, second)
            assign_sub(variable, step_size * first / (tf.sqrt(second) / root_correction_2 + self.epsilon))
        return tf.linalg.global_norm(gradients)
