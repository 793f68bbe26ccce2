"""What one pass of the search computes on a batch: the task's loss.

An objective knows its batch structure (``batch_signature``), computes
``(value to differentiate, loss to report, metric, end state)`` with a model
function, and tells passes apart (``for_pass``) where they draw randomness.
``batch_signature(batch_size)`` gives batches of ``batch_size`` examples,
for the steps of a search whose batches all have that size
(``Bilevel.fix_batch_size``), and of any size for ``None`` (evaluation); an
objective whose batches cannot have a fixed shape may ignore the size.

* ``ImageClassification``: a batch is ``(images, labels)``; cross-entropy,
  accuracy; no state.
* ``LanguageModeling``: a batch is ``(tokens, targets, hidden, seed)``, each
  ``(streams, time)``; mean token cross-entropy, whose exponential is the
  perplexity; the end state is the hidden state to carry into the next
  batch. In training each pass draws its own dropout masks from ``seed``
  and its pass number (stateless, so a run is reproducible). The real weight
  step may add activation regularisation ``ar * mean(dropped outputs^2)`` and
  temporal activation regularisation ``tar * mean((h_t+1 - h_t)^2)``, as the
  reference's recurrent training does.
"""

import tensorflow as tf

from .metrics import accuracy, cross_entropy, full_precision


class ImageClassification:
    metric_name = "accuracy"
    regularized = False
    per_example = (True, True)

    def __init__(self, model):
        self.image_shape = tuple(model.image_shape)
        self.dtype = model.arch_variables[0].dtype

    def batch_signature(self, batch_size=None):
        """Images and labels; ``batch_size`` examples, or any number (``None``)."""
        return (tf.TensorSpec((batch_size, *self.image_shape), self.dtype), tf.TensorSpec((batch_size,), tf.int32))

    def for_pass(self, batch, number):
        return batch

    def loss(self, model, batch, training, regularize=False):
        x, y = batch
        logits = model(x, training=training)
        loss = cross_entropy(y, logits)
        return loss, loss, accuracy(y, logits), ()

    def count(self, batch):
        return tf.cast(tf.shape(batch[1])[0], tf.float32)


class LanguageModeling:
    metric_name = "perplexity"
    per_example = (True, True, True, False)  # the mask seed is shared

    def __init__(self, model, activation_regularization=0.0, temporal_activation_regularization=0.0):
        self.hidden_size = model.hidden_size
        self.rates = model.dropout_rates()
        self.shapes = model.dropout_mask_shapes
        self.dtype = model.embedding.dtype
        self.ar = float(activation_regularization)
        self.tar = float(temporal_activation_regularization)
        self.regularized = bool(self.ar or self.tar)

    def batch_signature(self, batch_size=None):
        """Tokens, targets, hidden states and a seed; sequences vary in length, so the batch stays open too."""
        tokens = tf.TensorSpec((None, None), tf.int32)
        return (tokens, tokens, tf.TensorSpec((None, self.hidden_size), self.dtype), tf.TensorSpec((2,), tf.int32))

    def for_pass(self, batch, number):
        tokens, targets, hidden, seed = batch
        return tokens, targets, hidden, seed + tf.constant([0, 1], tf.int32) * (number + 1) * 7919

    def masks(self, batch_size, seed):
        """Variational dropout masks, scaled by 1 / (1 - rate), drawn from ``seed``."""
        masks = {}
        for index, (name, shape) in enumerate(self.shapes(batch_size).items()):
            rate = self.rates[name]
            if rate > 0:
                uniform = tf.random.stateless_uniform(shape, seed + tf.constant([index * 104729, 0], tf.int32))
                masks[name] = tf.cast(uniform >= rate, self.dtype) / tf.cast(1.0 - rate, self.dtype)
        return masks

    def loss(self, model, batch, training, regularize=False):
        tokens, targets, hidden, seed = batch
        masks = self.masks(tf.shape(tokens)[0], seed) if training else None
        logits, last, outputs, dropped = model(tokens, hidden, masks=masks, training=training)
        loss = cross_entropy(tf.reshape(targets, [-1]), tf.reshape(logits, [-1, tf.shape(logits)[-1]]))
        value = loss
        if regularize and self.ar:
            value = value + self.ar * tf.reduce_mean(tf.square(full_precision(dropped)))
        if regularize and self.tar:
            outputs = full_precision(outputs)
            value = value + self.tar * tf.reduce_mean(tf.square(outputs[:, 1:] - outputs[:, :-1]))
        return value, loss, tf.exp(loss), tf.stop_gradient(full_precision(last))

    def count(self, batch):
        return tf.cast(tf.size(batch[0]), tf.float32)
