"""The bilevel DARTS iteration under ``tf.GradientTape``.

One iteration on a (train batch, alpha batch) pair, as the reference does it:

1. Architecture step (Adam on alpha) with one of
   * first order:   g = dL_val(w, a)/da
   * second order, finite difference (the paper's eq. 7-8, the default):
       w'  = w - eta (momentum m + dL_train(w, a)/dw + wd w)      (no clipping)
       v   = dL_val(w', a)/dw',   g1 = dL_val(w', a)/da
       R   = hvp_epsilon / ||v||,  w+- = w +- R v
       hvp = (dL_train(w+, a)/da - dL_train(w-, a)/da) / (2R)
       g   = g1 - eta hvp
   * second order, exact: g = d/da L_val(w'(a), a) = g1 - eta d/da[dL_train/dw . v],
     the mixed Hessian-vector product by double back-propagation (nested tapes).
2. Weight step (SGD on w) on the same train batch with the updated alpha.

Every pass is a Keras ``stateless_call`` on substituted weight and alpha
values: no copy of the model, no in-place perturbation. The passes are small
``tf.function``s (loss; loss and all gradients; loss and alpha gradients; the
mixed Hessian-vector product), each traced once and called with different
values, so a second-order iteration traces the network twice rather than
five times.
BN uses batch statistics in every pass.
"""

import tensorflow as tf

from .metrics import accuracy, cross_entropy
from .optimizers import scalar


def dense_gradients(gradients, variables):
    """Gradients with ``None`` (a variable the loss does not use) as zeros."""
    return [tf.zeros_like(v) if g is None else g for g, v in zip(gradients, variables)]


class Bilevel:
    """The search model's variables, partitioned once by identity, and the passes over them."""

    def __init__(self, model, weights_optimizer, arch_optimizer, hvp_epsilon=0.01):
        self.model = model
        self.trainable = list(model.trainable_variables)
        arch_ids = {id(v) for v in model.arch_variables}
        self.arch_positions = [i for i, v in enumerate(self.trainable) if id(v) in arch_ids]
        self.weight_positions = [i for i, v in enumerate(self.trainable) if id(v) not in arch_ids]
        self.arch_vars = [self.trainable[i] for i in self.arch_positions]
        self.weight_vars = [self.trainable[i] for i in self.weight_positions]
        if not self.arch_vars:
            raise ValueError("The model has no architecture variables among its trainable variables.")
        if [id(v) for v in weights_optimizer.variables_list] != [id(v) for v in self.weight_vars]:
            raise ValueError("The weights optimiser must be built on the model's weight variables, in order.")
        if [id(v) for v in arch_optimizer.variables_list] != [id(v) for v in self.arch_vars]:
            raise ValueError("The architecture optimiser must be built on the model's alphas, in order.")
        self.weights_optimizer = weights_optimizer
        self.arch_optimizer = arch_optimizer
        self.hvp_epsilon = hvp_epsilon
        image = tf.TensorSpec((None, *model.image_shape), model.arch_variables[0].dtype)
        labels = tf.TensorSpec((None,), tf.int32)
        weights = [tf.TensorSpec(v.shape, v.dtype) for v in self.weight_vars]
        alphas = [tf.TensorSpec(v.shape, v.dtype) for v in self.arch_vars]
        signature = [weights, alphas, image, labels]

        def compile_pass(fn, input_signature=signature):
            # Kept as function calls (not inlined) so each body is optimised once.
            return tf.function(fn, input_signature=input_signature, experimental_attributes={"_noinline": True})

        self.loss_at = compile_pass(self._loss_at)
        self.gradients_at = compile_pass(self._gradients_at)
        self.alpha_gradients_at = compile_pass(self._alpha_gradients_at)
        self.mixed_hvp_at = compile_pass(self._mixed_hvp_at, [weights, alphas, weights, image, labels])

    # -- passes on substituted values -------------------------------------------
    def logits(self, weights, alphas, x):
        values = [None] * len(self.trainable)
        for position, value in zip(self.weight_positions, weights):
            values[position] = value
        for position, value in zip(self.arch_positions, alphas):
            values[position] = value
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        logits, _ = self.model.stateless_call(values, non_trainable, x, training=True)
        return logits

    def _loss_at(self, weights, alphas, x, y):
        logits = self.logits(weights, alphas, x)
        return cross_entropy(y, logits), accuracy(y, logits)

    def _gradients_at(self, weights, alphas, x, y):
        """Loss, accuracy, dL/dw and dL/da at the given values."""
        with tf.GradientTape() as tape:
            tape.watch(weights)
            tape.watch(alphas)
            logits = self.logits(weights, alphas, x)
            loss = cross_entropy(y, logits)
        weight_grads, alpha_grads = tape.gradient(loss, [weights, alphas])
        return loss, accuracy(y, logits), dense_gradients(weight_grads, weights), dense_gradients(alpha_grads, alphas)

    def _alpha_gradients_at(self, weights, alphas, x, y):
        """Loss, accuracy and dL/da only (no weight gradients are formed)."""
        with tf.GradientTape() as tape:
            tape.watch(alphas)
            logits = self.logits(weights, alphas, x)
            loss = cross_entropy(y, logits)
        return loss, accuracy(y, logits), dense_gradients(tape.gradient(loss, alphas), alphas)

    def current_weights(self):
        return [v.value for v in self.weight_vars]

    def current_alphas(self):
        return [v.value for v in self.arch_vars]

    # -- architecture gradients -------------------------------------------------
    # Each takes the current weight and alpha values, read once per iteration.
    def first_order_gradient(self, x_val, y_val, weights=None, alphas=None):
        weights = self.current_weights() if weights is None else weights
        alphas = self.current_alphas() if alphas is None else alphas
        loss, acc, gradient = self.alpha_gradients_at(weights, alphas, x_val, y_val)
        return gradient, loss, acc

    def virtual_weights(self, x_train, y_train, learning_rate, weights=None, alphas=None):
        """``w'``: the next SGD iterate from the current weights, without clipping."""
        weights = self.current_weights() if weights is None else weights
        alphas = self.current_alphas() if alphas is None else alphas
        _, _, gradients, _ = self.gradients_at(weights, alphas, x_train, y_train)
        return self.weights_optimizer.virtual_step(weights, gradients, learning_rate)

    def finite_difference_terms(self, x_train, y_train, x_val, y_val, learning_rate, weights=None, alphas=None):
        """Every quantity of the paper's formula, for the step and for inspection."""
        weights = self.current_weights() if weights is None else weights
        alphas = self.current_alphas() if alphas is None else alphas
        unrolled = self.virtual_weights(x_train, y_train, learning_rate, weights, alphas)
        val_loss, val_acc, v, g1 = self.gradients_at(unrolled, alphas, x_val, y_val)
        radius = self.hvp_epsilon / tf.linalg.global_norm(v)
        step = tf.cast(radius, weights[0].dtype)
        plus = [w + step * d for w, d in zip(weights, v)]
        grad_plus = self.alpha_gradients_at(plus, alphas, x_train, y_train)[2]
        # The two perturbed passes are independent; run them one after the
        # other so that only one holds its activations at a time.
        with tf.control_dependencies(grad_plus):
            minus = [w - step * d for w, d in zip(weights, v)]
        grad_minus = self.alpha_gradients_at(minus, alphas, x_train, y_train)[2]
        hvp = [(p - m) / tf.cast(2.0 * radius, p.dtype) for p, m in zip(grad_plus, grad_minus)]
        gradient = [g - scalar(learning_rate, g.dtype) * h for g, h in zip(g1, hvp)]
        return {
            "gradient": gradient,
            "g1": g1,
            "v": v,
            "hvp": hvp,
            "grad_plus": grad_plus,
            "grad_minus": grad_minus,
            "radius": radius,
            "unrolled": unrolled,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
        }

    def exact_gradient(self, x_train, y_train, x_val, y_val, learning_rate, weights=None):
        """``d/da L_val(w'(a), a)``, exactly.

        With ``w'(a) = w - eta (m + dL_train(w, a)/dw + wd w)`` the chain rule
        gives ``g1 - eta * d/da [dL_train(w, a)/dw . v]`` where ``g1`` and ``v``
        are the alpha and weight gradients of L_val at ``w'``; the bracket is a
        mixed Hessian-vector product, taken by double back-propagation inside
        one traced function (cheaper to build than differentiating through the
        calls of the other passes).
        """
        weights = self.current_weights() if weights is None else weights
        alphas = self.current_alphas()
        unrolled = self.virtual_weights(x_train, y_train, learning_rate, weights, alphas)
        val_loss, val_acc, v, g1 = self.gradients_at(unrolled, alphas, x_val, y_val)
        hvp = self.mixed_hvp_at(weights, alphas, v, x_train, y_train)
        gradient = [g - scalar(learning_rate, g.dtype) * h for g, h in zip(g1, hvp)]
        return gradient, val_loss, val_acc

    def _mixed_hvp_at(self, weights, alphas, vector, x, y):
        """``d/da [dL(w, a)/dw . vector]`` by double back-propagation."""
        with tf.GradientTape() as outer:
            outer.watch(alphas)
            with tf.GradientTape() as inner:
                inner.watch(weights)
                loss = cross_entropy(y, self.logits(weights, alphas, x))
            weight_grads = dense_gradients(inner.gradient(loss, weights), weights)
            dot = tf.add_n([tf.reduce_sum(g * d) for g, d in zip(weight_grads, vector)])
        return dense_gradients(outer.gradient(dot, alphas), alphas)

    def arch_gradient(self, order, mode, x_train, y_train, x_val, y_val, learning_rate, weights=None):
        weights = self.current_weights() if weights is None else weights
        if order == "first":
            return self.first_order_gradient(x_val, y_val, weights)
        if mode == "exact":
            return self.exact_gradient(x_train, y_train, x_val, y_val, learning_rate, weights)
        terms = self.finite_difference_terms(x_train, y_train, x_val, y_val, learning_rate, weights)
        return terms["gradient"], terms["val_loss"], terms["val_accuracy"]

    # -- steps ------------------------------------------------------------------
    def weight_step(self, x_train, y_train, learning_rate, weights=None):
        weights = self.current_weights() if weights is None else weights
        loss, acc, gradients, _ = self.gradients_at(weights, self.current_alphas(), x_train, y_train)
        norm = self.weights_optimizer.apply(gradients, learning_rate)
        return loss, acc, norm

    def iteration(self, order, mode, x_train, y_train, x_val, y_val, weights_lr, arch_lr):
        """Alpha step then weight step on the same train batch; returns the metrics."""
        weights = self.current_weights()  # unchanged by the alpha step: read once
        arch_grad, val_loss, val_acc = self.arch_gradient(
            order, mode, x_train, y_train, x_val, y_val, weights_lr, weights
        )
        self.arch_optimizer.apply(arch_grad, arch_lr)
        # The weight step reads the alphas after their update (automatic control dependencies).
        train_loss, train_acc, grad_norm = self.weight_step(x_train, y_train, weights_lr, weights)
        return {
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "arch_loss": val_loss,
            "arch_accuracy": val_acc,
            "grad_norm": grad_norm,
        }

    def compiled_iteration(self, order, mode):
        """The whole iteration as one ``tf.function``, traced once (batch size left open)."""
        dtype = self.arch_vars[0].dtype
        images = tf.TensorSpec((None, *self.model.image_shape), dtype)
        labels = tf.TensorSpec((None,), tf.int32)
        scalar = tf.TensorSpec((), tf.float32)

        @tf.function(input_signature=[images, labels, images, labels, scalar, scalar])
        def step(x_train, y_train, x_val, y_val, weights_lr, arch_lr):
            return self.iteration(order, mode, x_train, y_train, x_val, y_val, weights_lr, arch_lr)

        return step

    def evaluate_batch(self, x, y):
        """Summed loss and number correct on one batch (training-mode BN, as in search)."""
        loss, acc = self.loss_at(self.current_weights(), self.current_alphas(), x, y)
        count = tf.cast(tf.shape(y)[0], tf.float32)
        return loss * count, acc * count
