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
   * second order, exact: g = d/da L_val(w'(a), a), differentiating through
     the virtual step with nested tapes.
2. Weight step (SGD on w) on the same train batch with the updated alpha.

Virtual and perturbed weights are evaluated with Keras ``stateless_call`` on
substituted values: no copy of the model, no in-place perturbation. BN runs
in training mode (batch statistics) in every pass.
"""

import keras
import tensorflow as tf


def cross_entropy(labels, logits):
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))


def accuracy(labels, logits):
    predicted = tf.argmax(logits, axis=-1, output_type=labels.dtype)
    return tf.reduce_mean(tf.cast(tf.equal(predicted, labels), tf.float32))


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
        if [id(v) for v in weights_optimizer.variables_list] != [id(v) for v in self.weight_vars]:
            raise ValueError("The weights optimiser must be built on the model's weight variables, in order.")
        if [id(v) for v in arch_optimizer.variables_list] != [id(v) for v in self.arch_vars]:
            raise ValueError("The architecture optimiser must be built on the model's alphas, in order.")
        self.weights_optimizer = weights_optimizer
        self.arch_optimizer = arch_optimizer
        self.hvp_epsilon = hvp_epsilon

    # -- passes ---------------------------------------------------------------
    def logits(self, x, weights=None, alphas=None):
        """Forward pass in training mode, on substituted weights and/or alphas if given."""
        if weights is None and alphas is None:
            return self.model(x, training=True)
        values = [v.value for v in self.trainable]
        for position, value in zip(self.weight_positions, weights or []):
            values[position] = value
        for position, value in zip(self.arch_positions, alphas or []):
            values[position] = value
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        logits, _ = self.model.stateless_call(values, non_trainable, x, training=True)
        return logits

    def loss(self, x, y, weights=None, alphas=None):
        return cross_entropy(y, self.logits(x, weights, alphas))

    def current_weights(self):
        return [v.value for v in self.weight_vars]

    # -- architecture gradients -------------------------------------------------
    def first_order_gradient(self, x_val, y_val):
        with tf.GradientTape() as tape:
            logits = self.model(x_val, training=True)
            loss = cross_entropy(y_val, logits)
        return dense_gradients(tape.gradient(loss, self.arch_vars), self.arch_vars), loss, accuracy(y_val, logits)

    def virtual_weights(self, x_train, y_train, learning_rate):
        """``w'``: the next SGD iterate from the current weights, without clipping."""
        with tf.GradientTape() as tape:
            loss = self.loss(x_train, y_train)
        gradients = tape.gradient(loss, self.weight_vars)
        return self.weights_optimizer.virtual_step(self.current_weights(), gradients, learning_rate)

    def finite_difference_terms(self, x_train, y_train, x_val, y_val, learning_rate):
        """Every quantity of the paper's formula, for the step and for inspection."""
        unrolled = self.virtual_weights(x_train, y_train, learning_rate)
        with tf.GradientTape() as tape:
            tape.watch(unrolled)
            logits = self.logits(x_val, weights=unrolled)
            val_loss = cross_entropy(y_val, logits)
        gradients = tape.gradient(val_loss, unrolled + self.arch_vars)
        v = dense_gradients(gradients[: len(unrolled)], unrolled)
        g1 = dense_gradients(gradients[len(unrolled):], self.arch_vars)
        radius = self.hvp_epsilon / tf.linalg.global_norm(v)
        weights = self.current_weights()
        plus = [w + tf.cast(radius, w.dtype) * d for w, d in zip(weights, v)]
        minus = [w - tf.cast(radius, w.dtype) * d for w, d in zip(weights, v)]
        grad_plus = self._alpha_gradient_at(x_train, y_train, plus)
        grad_minus = self._alpha_gradient_at(x_train, y_train, minus)
        hvp = [(p - m) / tf.cast(2.0 * radius, p.dtype) for p, m in zip(grad_plus, grad_minus)]
        gradient = [g - tf.cast(learning_rate, g.dtype) * h for g, h in zip(g1, hvp)]
        return {
            "gradient": gradient,
            "g1": g1,
            "hvp": hvp,
            "grad_plus": grad_plus,
            "grad_minus": grad_minus,
            "radius": radius,
            "unrolled": unrolled,
            "val_loss": val_loss,
            "val_accuracy": accuracy(y_val, logits),
        }

    def _alpha_gradient_at(self, x, y, weights):
        with tf.GradientTape() as tape:
            loss = self.loss(x, y, weights=weights)
        return dense_gradients(tape.gradient(loss, self.arch_vars), self.arch_vars)

    def exact_gradient(self, x_train, y_train, x_val, y_val, learning_rate):
        """``d/da L_val(w'(a), a)`` by differentiating through the virtual step."""
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                train_loss = self.loss(x_train, y_train)
            weight_gradients = inner.gradient(train_loss, self.weight_vars)
            unrolled = self.weights_optimizer.virtual_step(self.current_weights(), weight_gradients, learning_rate)
            logits = self.logits(x_val, weights=unrolled)
            val_loss = cross_entropy(y_val, logits)
        gradient = dense_gradients(outer.gradient(val_loss, self.arch_vars), self.arch_vars)
        return gradient, val_loss, accuracy(y_val, logits)

    def arch_gradient(self, order, mode, x_train, y_train, x_val, y_val, learning_rate):
        if order == "first":
            return self.first_order_gradient(x_val, y_val)
        if mode == "exact":
            return self.exact_gradient(x_train, y_train, x_val, y_val, learning_rate)
        terms = self.finite_difference_terms(x_train, y_train, x_val, y_val, learning_rate)
        return terms["gradient"], terms["val_loss"], terms["val_accuracy"]

    # -- steps ------------------------------------------------------------------
    def weight_step(self, x_train, y_train, learning_rate):
        with tf.GradientTape() as tape:
            logits = self.model(x_train, training=True)
            loss = cross_entropy(y_train, logits)
        gradients = tape.gradient(loss, self.weight_vars)
        norm = self.weights_optimizer.apply(gradients, learning_rate)
        return loss, accuracy(y_train, logits), norm

    def iteration(self, order, mode, x_train, y_train, x_val, y_val, weights_lr, arch_lr):
        """Alpha step then weight step on the same train batch; returns the metrics."""
        arch_grad, val_loss, val_acc = self.arch_gradient(order, mode, x_train, y_train, x_val, y_val, weights_lr)
        self.arch_optimizer.apply(arch_grad, arch_lr)
        train_loss, train_acc, grad_norm = self.weight_step(x_train, y_train, weights_lr)
        return {
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "arch_loss": val_loss,
            "arch_accuracy": val_acc,
            "grad_norm": grad_norm,
        }

    def compiled_iteration(self, order, mode, image_shape, label_dtype=tf.int32):
        """The iteration as one ``tf.function``, traced once (batch size left open)."""
        images = tf.TensorSpec((None, *image_shape), tf.float32)
        labels = tf.TensorSpec((None,), label_dtype)
        scalar = tf.TensorSpec((), tf.float32)

        @tf.function(input_signature=[images, labels, images, labels, scalar, scalar])
        def step(x_train, y_train, x_val, y_val, weights_lr, arch_lr):
            return self.iteration(order, mode, x_train, y_train, x_val, y_val, weights_lr, arch_lr)

        return step

    def compiled_evaluation(self, image_shape, label_dtype=tf.int32):
        images = tf.TensorSpec((None, *image_shape), tf.float32)
        labels = tf.TensorSpec((None,), label_dtype)

        @tf.function(input_signature=[images, labels])
        def evaluate(x, y):
            logits = self.model(x, training=True)
            return cross_entropy(y, logits) * tf.cast(tf.shape(y)[0], tf.float32), tf.reduce_sum(
                tf.cast(tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y), tf.float32)
            )

        return evaluate
