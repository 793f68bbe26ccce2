"""The reference optimiser semantics against plain numpy statements of them."""

import math

import numpy as np
import pytest
import tensorflow as tf

from keras_darts.runtime.optimizers import CoupledAdam, CoupledSGD, cosine_learning_rate, elementwise


def test_cosine_schedule_is_the_reference_one():
    # lr_e = 0.001 + 0.012 * (1 + cos(pi e / 50)) for the search defaults.
    for epoch in (0, 1, 25, 49):
        expected = 0.001 + 0.012 * (1 + math.cos(math.pi * epoch / 50))
        assert cosine_learning_rate(epoch, 50, 0.025, 0.001) == pytest.approx(expected, rel=1e-12)


# Several tensors, shapes repeated and interleaved: each gets its own formula, in its place.
SHAPES = [(3, 2), (4,), (3, 2), (2, 2, 1), (4,), (3, 2)]


@pytest.mark.parametrize("weight_decay,grad_clip", [(0.01, 1.0), (0.0, 1.0), (0.01, None), (0.0, None)])
def test_sgd_has_pytorch_momentum_coupled_decay_and_clipping(weight_decay, grad_clip):
    rng = np.random.default_rng(0)
    start = [rng.normal(size=shape) for shape in SHAPES]
    variables = [tf.Variable(w, dtype=tf.float64) for w in start]
    optimizer = CoupledSGD(variables, momentum=0.9, weight_decay=weight_decay, grad_clip=grad_clip)
    weights = [w.copy() for w in start]
    buffers = [np.zeros_like(w) for w in start]
    for lr in (0.1, 0.05, 0.02):  # the learning rate changes between steps, as per epoch
        grads = [rng.normal(size=w.shape) * 3 for w in start]
        norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
        scale = 1.0 if grad_clip is None else min(1.0, grad_clip / (norm + 1e-6))
        assert scale < 1.0 or grad_clip is None  # the gradients are large enough to be clipped
        for i in range(len(start)):
            direction = grads[i] * scale + weight_decay * weights[i]
            buffers[i] = 0.9 * buffers[i] + direction
            weights[i] = weights[i] - lr * buffers[i]
        reported = optimizer.apply([tf.constant(g) for g in grads], lr)
        assert float(reported) == pytest.approx(norm, rel=1e-12)
        for variable, expected in zip(variables, weights):
            np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-12)


def test_sgd_virtual_step_does_not_touch_variables():
    variables = [tf.Variable([1.0, 2.0], dtype=tf.float64)]
    optimizer = CoupledSGD(variables, momentum=0.9, weight_decay=0.1, grad_clip=None)
    optimizer.momentum_buffers[0].assign([1.0, 1.0])
    virtual = optimizer.virtual_step([variables[0].value()], [tf.constant([0.5, 0.5], tf.float64)], 0.1)
    # w - lr (0.9 m + g + wd w): 1 - 0.1 (0.9 + 0.5 + 0.1) = 0.85; 2 - 0.1 (0.9 + 0.5 + 0.2) = 1.84
    np.testing.assert_allclose(virtual[0].numpy(), [0.85, 1.84], rtol=1e-12)
    np.testing.assert_array_equal(variables[0].numpy(), [1.0, 2.0])
    np.testing.assert_array_equal(optimizer.momentum_buffers[0].numpy(), [1.0, 1.0])


def test_virtual_step_of_many_tensors_is_the_formula_for_each_in_its_place():
    rng = np.random.default_rng(2)
    start = [rng.normal(size=shape) for shape in SHAPES]
    variables = [tf.Variable(w, dtype=tf.float64) for w in start]
    optimizer = CoupledSGD(variables, momentum=0.9, weight_decay=3e-4, grad_clip=5.0)
    buffers = [rng.normal(size=shape) for shape in SHAPES]
    for buffer, value in zip(optimizer.momentum_buffers, buffers):
        buffer.assign(value)
    grads = [rng.normal(size=shape) for shape in SHAPES]
    virtual = optimizer.virtual_step([v.value() for v in variables], [tf.constant(g) for g in grads], 0.05)
    for got, w, m, g in zip(virtual, start, buffers, grads):
        np.testing.assert_allclose(got.numpy(), w - 0.05 * (0.9 * m + g + 3e-4 * w), rtol=1e-12)


def test_elementwise_gives_each_tensor_its_own_values_in_its_place_from_one_op_per_shape():
    rng = np.random.default_rng(3)
    a, b = ([tf.constant(rng.normal(size=shape), tf.float32) for shape in SHAPES] for _ in range(2))
    step = tf.constant(0.37, tf.float32)

    def both(x, y):
        return x + step * y, x - step * y

    plus, minus = elementwise(both, a, b)
    for got_plus, got_minus, x, y in zip(plus, minus, a, b):
        # Bit for bit what the same operations give on the tensor alone.
        np.testing.assert_array_equal(got_plus.numpy(), (x + step * y).numpy())
        np.testing.assert_array_equal(got_minus.numpy(), (x - step * y).numpy())
    assert [t.shape for t in plus] == [t.shape for t in a]

    @tf.function(autograph=False)
    def traced(a, b):
        return elementwise(lambda x, y: x * y, a, b)

    graph = traced.get_concrete_function(a, b).graph
    # Six tensors of three shapes: one multiplication per shape (the lone (2, 2, 1) tensor is not stacked).
    assert [op.type for op in graph.get_operations()].count("Mul") == len(set(SHAPES)) == 3
    for got, x, y in zip(traced(a, b), a, b):
        np.testing.assert_array_equal(got.numpy(), (x * y).numpy())
    # Shapes known only at run time are never stacked: these two differ when run.
    vectors = [tf.TensorSpec([None], tf.float32)] * 2
    loose = traced.get_concrete_function(vectors, vectors)
    assert [op.type for op in loose.graph.get_operations()].count("Pack") == 0
    short, long = tf.constant([1.0, 2.0]), tf.constant([3.0, 4.0, 5.0])
    assert [t.numpy().tolist() for t in loose([short, long], [long[:2], long + 1.0])] == [[3.0, 8.0], [12.0, 20.0, 30.0]]


def test_adam_has_pytorch_epsilon_and_coupled_decay():
    rng = np.random.default_rng(1)
    start = rng.normal(size=(5, 3)) * 1e-3
    variable = tf.Variable(start, dtype=tf.float64)
    optimizer = CoupledAdam([variable], beta_1=0.5, beta_2=0.999, epsilon=1e-8, weight_decay=1e-3)
    a, m1, m2 = start.copy(), np.zeros_like(start), np.zeros_like(start)
    for t in range(1, 4):
        g = rng.normal(size=start.shape) * 1e-4
        d = g + 1e-3 * a
        m1 = 0.5 * m1 + 0.5 * d
        m2 = 0.999 * m2 + 0.001 * d * d
        a = a - 3e-4 / (1 - 0.5**t) * m1 / (np.sqrt(m2) / math.sqrt(1 - 0.999**t) + 1e-8)
        optimizer.apply([tf.constant(g)], 3e-4)
        np.testing.assert_allclose(variable.numpy(), a, rtol=1e-9)


def test_optimisers_refuse_gradients_for_other_variables():
    optimizer = CoupledSGD([tf.Variable([1.0])])
    with pytest.raises(ValueError, match="was built on 1 variables. Received: 2 gradients"):
        optimizer.apply([tf.constant([1.0]), tf.constant([1.0])], 0.1)
