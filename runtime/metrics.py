"""Losses and metrics shared by search and retraining."""

import keras
import tensorflow as tf
from tqdm.auto import tqdm


def full_precision(tensor):
    """A 16-bit float tensor (mixed precision's) as float32; any other as it is."""
    return tf.cast(tensor, tf.float32) if tensor.dtype in (tf.float16, tf.bfloat16) else tensor


def cross_entropy(labels, logits):
    """Mean cross-entropy, computed in float32 from 16-bit logits."""
    logits = full_precision(logits)
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))


def summed_cross_entropy(labels, logits):
    """Cross-entropy summed (not averaged) over the batch: replicas' sums add up to the global one."""
    logits = full_precision(logits)
    return tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))


def correct_count(labels, logits):
    predicted = tf.argmax(logits, axis=-1, output_type=labels.dtype)
    return tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))


def accuracy(labels, logits):
    return correct_count(labels, logits) / tf.cast(tf.shape(labels)[0], tf.float32)


def evaluate(step, dataset, progress=False, desc="evaluate"):
    """Mean loss and accuracy over ``dataset``; ``step(x, y)`` returns (summed loss, number correct)."""
    total_loss = total_correct = count = 0.0
    for x, y in tqdm(dataset, desc=desc, disable=not progress, leave=False, unit="batch"):
        loss, correct = step(x, y)
        total_loss += float(loss)
        total_correct += float(correct)
        count += int(y.shape[0])
    return total_loss / count, total_correct / count
