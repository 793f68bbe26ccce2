"""Second order is second order: the bilevel gradients against independent computations (float64)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_darts as kd
from keras_darts.runtime.bilevel import Bilevel
from keras_darts.runtime.metrics import cross_entropy
from keras_darts.runtime.optimizers import CoupledAdam, CoupledSGD
from tests.conftest import tiny_spec_document

ETA = 0.05
# Examples per batch (``batches``); the passes are built for it (``make_bilevel``).
BATCH = 6


SMOOTH_OPS = ["none", "avg_pool_3x3", "skip_connect", "sep_conv_3x3"]


def make_bilevel(grad_clip=5.0, seed=0, recompute_cells=False, reuse_virtual_gradient=False, arch_sgd=False,
                 operations=SMOOTH_OPS, batch_size=BATCH):
    """A tiny supernet's Bilevel; ``arch_sgd`` makes the alpha step plain SGD, which moves alphas by -lr * g
    (Adam's first step moves them by about lr * sign(g), which would hide the gradient). By default no
    max-pool, whose kinks could spoil a finite-difference reference. Its passes are built for
    ``batch_size`` examples (``batches``), as an image search builds them; ``None`` leaves the batch open."""
    document = tiny_spec_document(operations=list(operations))
    document["search"]["recompute_cells"] = recompute_cells
    spec = kd.load_spec(document)
    keras.utils.set_random_seed(seed)
    model = kd.build_supernet(spec, seed=seed)
    for alpha in model.arch_variables:  # alphas far enough from uniform that ops differ
        alpha.assign(np.random.default_rng(seed).normal(0, 0.5, size=alpha.shape))
    bilevel = Bilevel(
        model,
        CoupledSGD(model.weight_variables, 0.9, 3e-4, grad_clip),
        (CoupledSGD(model.arch_variables, 0.0, 0.0, None, name="arch_sgd") if arch_sgd
         else CoupledAdam(model.arch_variables, 0.5, 0.999, 1e-8, 1e-3)),
        hvp_epsilon=0.01,
        reuse_virtual_gradient=reuse_virtual_gradient,
    )
    if batch_size is not None:
        bilevel.fix_batch_size(batch_size)
    return bilevel


def batches(dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    make = lambda: (tf.constant(rng.normal(size=(BATCH, 8, 8, 1)), dtype),
                    tf.constant(rng.integers(0, 10, BATCH), tf.int32))
    return make(), make()


def eager_gradients(model, x, y, variables):
    with tf.GradientTape() as tape:
        loss = cross_entropy(y, model(x, training=True))
    gradients = tape.gradient(loss, variables)
    return [np.zeros(v.shape) if g is None else g.numpy() for g, v in zip(gradients, variables)]


def assign(variables, values):
    for variable, value in zip(variables, values):
        variable.assign(value)


def test_finite_difference_gradient_is_the_papers_formula(float64):
    bilevel = make_bilevel()
    model = bilevel.model
    (xt, yt), (xv, yv) = batches()
    bilevel.weight_step((xt, yt), ETA)  # a real step first, so the momentum term is not zero
    terms = bilevel.finite_difference_terms((xt, yt), (xv, yv), ETA)

    # The formula, computed independently: eager passes on the model's own variables.
    weights, alphas = bilevel.weight_vars, bilevel.arch_vars
    w0 = [v.numpy() for v in weights]
    momentum = [b.numpy() for b in bilevel.weights_optimizer.momentum_buffers]
    gw = eager_gradients(model, xt, yt, weights)
    unrolled = [w - ETA * (0.9 * m + g + 3e-4 * w) for w, m, g in zip(w0, momentum, gw)]
    assign(weights, unrolled)
    v = eager_gradients(model, xv, yv, weights)
    g1 = eager_gradients(model, xv, yv, alphas)
    radius = 0.01 / np.sqrt(sum(float((d**2).sum()) for d in v))
    assign(weights, [w + radius * d for w, d in zip(w0, v)])
    plus = eager_gradients(model, xt, yt, alphas)
    assign(weights, [w - radius * d for w, d in zip(w0, v)])
    minus = eager_gradients(model, xt, yt, alphas)
    assign(weights, w0)
    expected = [a - ETA * (p - m) / (2 * radius) for a, p, m in zip(g1, plus, minus)]

    for got, want in zip(terms["gradient"], expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-7, atol=1e-12)
    for got, want in zip(terms["unrolled"], unrolled):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-14)
    assert float(terms["radius"]) == pytest.approx(radius, rel=1e-10)


def test_perturbed_gradients_differ_so_second_order_is_not_first_order(float64):
    bilevel = make_bilevel()
    (xt, yt), (xv, yv) = batches()
    terms = bilevel.finite_difference_terms((xt, yt), (xv, yv), ETA)
    plus = np.concatenate([g.numpy().ravel() for g in terms["grad_plus"]])
    minus = np.concatenate([g.numpy().ravel() for g in terms["grad_minus"]])
    assert np.max(np.abs(plus - minus)) > 1e-6 * np.max(np.abs(plus))
    first, _, _, _ = bilevel.first_order_gradient((xv, yv))
    second = np.concatenate([g.numpy().ravel() for g in terms["gradient"]])
    first = np.concatenate([g.numpy().ravel() for g in first])
    assert not np.allclose(first, second, rtol=1e-3)


def exact_and_central_differences(operations, seed=1, probes=8, h=1e-6):
    """Exact-mode alpha gradient entries and central differences of the unrolled validation loss (float64)."""
    bilevel = make_bilevel(seed=seed, operations=operations)
    model = bilevel.model
    (xt, yt), (xv, yv) = batches(seed=seed)
    bilevel.weight_step((xt, yt), ETA)
    exact, _, _, _ = bilevel.exact_gradient((xt, yt), (xv, yv), ETA)

    weights, alphas = bilevel.weight_vars, bilevel.arch_vars
    w0 = [v.numpy() for v in weights]
    a0 = [a.numpy() for a in alphas]
    momentum = [b.numpy() for b in bilevel.weights_optimizer.momentum_buffers]

    def unrolled_validation_loss(alpha_values):
        assign(alphas, alpha_values)
        gw = eager_gradients(model, xt, yt, weights)
        assign(weights, [w - ETA * (0.9 * m + g + 3e-4 * w) for w, m, g in zip(w0, momentum, gw)])
        loss = float(cross_entropy(yv, model(xv, training=True)))
        assign(weights, w0)
        assign(alphas, a0)
        return loss

    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(probes):
        t = int(rng.integers(len(alphas)))
        index = tuple(int(rng.integers(n)) for n in a0[t].shape)
        up = [a.copy() for a in a0]
        down = [a.copy() for a in a0]
        up[t][index] += h
        down[t][index] -= h
        numeric = (unrolled_validation_loss(up) - unrolled_validation_loss(down)) / (2 * h)
        pairs.append((float(exact[t].numpy()[index]), numeric))
    return pairs


def test_exact_mode_is_the_derivative_of_the_unrolled_validation_loss(float64):
    for exact, numeric in exact_and_central_differences(SMOOTH_OPS):
        assert exact == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def count_ops(function, args, op_type):
    graph = function.get_concrete_function(*args).graph
    return sum(op.type == op_type for op in graph.get_operations())


def test_recomputed_cells_give_the_same_gradients_from_a_graph_that_runs_each_cell_twice(float64):
    (xt, yt), (xv, yv) = batches(seed=2)
    plain, recomputing = make_bilevel(seed=2), make_bilevel(seed=2, recompute_cells=True)
    assert recomputing.model.recompute_cells and not plain.model.recompute_cells
    for a, b in zip(plain.model.trainable_variables, recomputing.model.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for bilevel in (plain, recomputing):
        bilevel.weight_step((xt, yt), ETA)
    want = plain.finite_difference_terms((xt, yt), (xv, yv), ETA)
    got = recomputing.finite_difference_terms((xt, yt), (xv, yv), ETA)
    for name in ("gradient", "unrolled", "v", "g1", "grad_plus", "grad_minus"):
        for g, w in zip(got[name], want[name]):
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-9, atol=1e-13, err_msg=name)
    # Exact mode differentiates through the recomputing gradient a second time.
    for g, w in zip(recomputing.exact_gradient((xt, yt), (xv, yv), ETA)[0],
                    plain.exact_gradient((xt, yt), (xv, yv), ETA)[0]):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-9, atol=1e-13)
    # Every depthwise convolution sits in a cell: with recomputation each runs
    # forward twice, once in the forward pass and once in the backward pass.
    args = (plain.current_weights(), plain.current_alphas(), (xt, yt))
    once = count_ops(plain.gradients_at, args, "DepthwiseConv2dNative")
    assert once > 0
    assert count_ops(recomputing.gradients_at, args, "DepthwiseConv2dNative") == 2 * once
    # In evaluation mode nothing is recomputed.
    assert count_ops(recomputing.loss_at, args, "DepthwiseConv2dNative") == count_ops(plain.loss_at, args,
                                                                                         "DepthwiseConv2dNative")


def test_virtual_step_is_the_next_real_sgd_iterate_without_clipping(float64):
    bilevel = make_bilevel(grad_clip=None)
    (xt, yt), _ = batches()
    bilevel.weight_step((xt, yt), ETA)
    virtual = bilevel.virtual_weights((xt, yt), ETA)
    bilevel.weight_step((xt, yt), ETA)
    for variable, value in zip(bilevel.weight_vars, virtual):
        np.testing.assert_allclose(variable.numpy(), value.numpy(), rtol=1e-10, atol=1e-14)


def test_each_optimiser_updates_only_its_own_variables():
    bilevel = make_bilevel()
    (xt, yt), (xv, yv) = batches("float32")
    snapshot = lambda vs: [v.numpy().copy() for v in vs]
    weights, alphas = snapshot(bilevel.weight_vars), snapshot(bilevel.arch_vars)
    gradient, _, _, _ = bilevel.first_order_gradient((xv, yv))
    bilevel.arch_optimizer.apply(gradient, 3e-4)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(weights, bilevel.weight_vars))
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(alphas, bilevel.arch_vars))
    alphas = snapshot(bilevel.arch_vars)
    bilevel.weight_step((xt, yt), ETA)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(alphas, bilevel.arch_vars))
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(weights, bilevel.weight_vars))
    model = bilevel.model
    with pytest.raises(ValueError, match="weights optimiser must be built on the model's weight variables"):
        Bilevel(model, CoupledSGD(model.trainable_variables), CoupledAdam(model.arch_variables))


def test_the_iteration_is_traced_once_and_takes_the_alpha_step_first():
    bilevel = make_bilevel(batch_size=None)  # the open build: batches of other sizes reuse its trace
    step = bilevel.compiled_iteration("second", "finite_difference")
    (xt, yt), (xv, yv) = batches("float32")
    before = [a.numpy().copy() for a in bilevel.arch_vars]
    step((xt, yt), (xv, yv), tf.constant(ETA, tf.float32), tf.constant(3e-4, tf.float32))
    step((xt[:4], yt[:4]), (xv[:5], yv[:5]), tf.constant(0.02, tf.float32), tf.constant(3e-4, tf.float32))
    assert step.experimental_get_tracing_count() == 1
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(before, bilevel.arch_vars))
    assert int(bilevel.arch_optimizer.iterations.numpy()) == 2
    assert int(bilevel.weights_optimizer.iterations.numpy()) == 2


@pytest.mark.parametrize("order", ["first", "second"])
def test_compiled_iteration_equals_the_steps_taken_one_by_one(order):
    # Graph mode must not reorder: the weight step has to see the updated alphas.
    (xt, yt), (xv, yv) = batches("float32")
    arch_lr = 0.1
    compiled = make_bilevel(seed=4, arch_sgd=True)
    before = [a.numpy().copy() for a in compiled.arch_vars]
    step = compiled.compiled_iteration(order, "finite_difference")
    step((xt, yt), (xv, yv), tf.constant(ETA, tf.float32), tf.constant(arch_lr, tf.float32))

    manual = make_bilevel(seed=4, arch_sgd=True)
    gradient, _, _, _ = manual.arch_gradient(order, "finite_difference", (xt, yt), (xv, yv), ETA)
    # The compiled alpha step took the gradient itself (plain SGD: alpha moved by -lr * g).
    for b, a, g in zip(before, compiled.arch_vars, gradient):
        np.testing.assert_allclose((b - a.numpy()) / arch_lr, g.numpy(), rtol=1e-3, atol=1e-5)
    assert max(float(np.abs(g.numpy()).max()) for g in gradient) > 1e-3
    manual.arch_optimizer.apply(gradient, arch_lr)
    manual.weight_step((xt, yt), ETA)

    for got, want in zip(compiled.weight_vars, manual.weight_vars):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-4, atol=1e-6)
    # The weight step saw the updated alphas: one at the old alphas lands elsewhere.
    stale = make_bilevel(seed=4, arch_sgd=True)
    stale.weight_step((xt, yt), ETA)
    assert any(not np.allclose(a.numpy(), b.numpy(), rtol=2e-4, atol=1e-6)
               for a, b in zip(compiled.weight_vars, stale.weight_vars))


def test_reusing_the_virtual_gradient_steps_the_weights_with_the_gradient_at_the_old_alphas():
    # Exact mode takes the same virtual step and train pass; its compiled iteration builds too slowly to add here.
    mode = "finite_difference"
    (xt, yt), (xv, yv) = batches("float32", seed=5)
    lr, arch_lr = tf.constant(ETA, tf.float32), tf.constant(0.3, tf.float32)  # alphas move far
    reusing = make_bilevel(seed=5, reuse_virtual_gradient=True, arch_sgd=True)
    before = [a.numpy().copy() for a in reusing.arch_vars]
    metrics, _, _ = reusing.compiled_iteration("second", mode)((xt, yt), (xv, yv), lr, arch_lr)

    manual = make_bilevel(seed=5, arch_sgd=True)
    loss, _, gradients, _, _ = manual.gradients_at(manual.current_weights(), manual.current_alphas(), (xt, yt))
    arch, _, _, _ = manual.arch_gradient("second", mode, (xt, yt), (xv, yv), ETA)
    for b, a, g in zip(before, reusing.arch_vars, arch):  # the alpha step took the second-order gradient
        np.testing.assert_allclose((b - a.numpy()) / 0.3, g.numpy(), rtol=1e-3, atol=1e-5)
    manual.arch_optimizer.apply(arch, 0.3)
    manual.weights_optimizer.apply(gradients, ETA)
    for got, want in zip(reusing.arch_vars + reusing.weight_vars, manual.arch_vars + manual.weight_vars):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-4, atol=1e-6)
    assert float(metrics["train_loss"]) == pytest.approx(float(loss), rel=1e-5)

    # The default takes a fresh pass at the updated alphas, and lands elsewhere.
    fresh = make_bilevel(seed=5, arch_sgd=True)
    fresh.compiled_iteration("second", mode)((xt, yt), (xv, yv), lr, arch_lr)
    assert any(not np.allclose(a.numpy(), b.numpy(), rtol=2e-4, atol=1e-6)
               for a, b in zip(fresh.weight_vars, reusing.weight_vars))
    for a, b in zip(fresh.arch_vars, reusing.arch_vars):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-4, atol=1e-6)


def float32_and_float64_gradients():
    """First-order and exact alpha gradients of one supernet (max and average pooling) in both precisions."""
    def gradients(dtype):
        keras.config.set_floatx(dtype)
        keras.config.set_dtype_policy(dtype)
        try:
            spec = kd.load_spec(tiny_spec_document())
            keras.utils.set_random_seed(0)
            model = kd.build_supernet(spec, seed=0)
            bilevel = Bilevel(model, CoupledSGD(model.weight_variables, 0.9, 3e-4, 5.0),
                              CoupledAdam(model.arch_variables, 0.5, 0.999, 1e-8, 1e-3))
            bilevel.fix_batch_size(BATCH)
            for variable, value in zip(model.variables, reference_values):
                variable.assign(value.astype(dtype))
            (xt, yt), (xv, yv) = batches(dtype, seed=2)
            exact = bilevel.exact_gradient((xt, yt), (xv, yv), ETA)[0]
            first = bilevel.first_order_gradient((xv, yv))[0]
            return (np.concatenate([g.numpy().ravel() for g in first]).tolist(),
                    np.concatenate([g.numpy().ravel() for g in exact]).tolist())
        finally:
            keras.config.set_floatx("float32")
            keras.config.set_dtype_policy("float32")

    keras.utils.set_random_seed(0)  # the weights' initialisers draw from Keras' global seed
    model = kd.build_supernet(kd.load_spec(tiny_spec_document()), seed=0)
    reference_values = [v.numpy().astype("float64") for v in model.variables]
    rng = np.random.default_rng(3)
    reference_values = [v if v.ndim != 2 or v.shape[1] != 5 else rng.normal(0, 0.5, v.shape) for v in reference_values]
    return gradients("float32"), gradients("float64")


def test_exact_mode_with_max_and_average_pooling_matches_float64_and_central_differences():
    # Max pooling's second derivative used to depend on the order TensorFlow ran its kernels in
    # (runtime/second_derivatives.py): float32 and float64 disagreed in some runs. Here the kernels
    # run concurrently, as TensorFlow runs them by default.
    (first_32, exact_32), (first_64, exact_64) = [[np.array(g) for g in pair]
                                                  for pair in float32_and_float64_gradients()]
    np.testing.assert_allclose(first_32, first_64, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(exact_32, exact_64, rtol=2e-3, atol=2e-3 * np.abs(exact_64).max())
    # The second-order term matters here, so agreeing exact gradients say something.
    assert np.abs(exact_64 - first_64).max() > 0.05 * np.abs(first_64).max()


def test_exact_mode_with_max_and_average_pooling_is_the_derivative_of_the_unrolled_validation_loss(float64):
    for exact, numeric in exact_and_central_differences(tiny_spec_document()["search_space"]["operations"]):
        assert exact == pytest.approx(numeric, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("mode", ["finite_difference", "exact"])
def test_an_iteration_built_for_a_fixed_batch_size_computes_what_the_open_one_does(mode):
    # A search's batches all have the spec's size, so its steps are built for that size (fix_batch_size): the
    # same iteration, whose gradient code can take its static paths where the batch dimension is known.
    (xt, yt), (xv, yv) = batches("float32", seed=6)
    lr, arch_lr = tf.constant(ETA, tf.float32), tf.constant(0.1, tf.float32)
    results = {}
    for fixed in (False, True):
        bilevel = make_bilevel(seed=6, arch_sgd=True, batch_size=BATCH if fixed else None)
        start = [v.numpy().copy() for v in bilevel.weight_vars + bilevel.arch_vars]
        step = bilevel.compiled_iteration("second", mode)
        metrics, _, _ = step((xt, yt), (xv, yv), lr, arch_lr)
        graph = step.get_concrete_function().graph
        functions = graph.as_graph_def().library.function
        results[fixed] = {"start": start, "after": [v.numpy() for v in bilevel.weight_vars + bilevel.arch_vars],
                          "loss": float(metrics["arch_loss"]), "signature": graph.inputs[0].shape.as_list(),
                          "dynamic_shapes": sum(n.op == "DynamicStitch" for f in functions for n in f.node_def)}
    open_, fixed = results[False], results[True]
    assert open_["signature"] == [None, 8, 8, 1] and fixed["signature"] == [6, 8, 8, 1]
    for a, b in zip(open_["start"], fixed["start"]):
        np.testing.assert_array_equal(a, b)
    assert fixed["loss"] == pytest.approx(open_["loss"], rel=1e-6)
    moved = max(float(np.abs(a - s).max()) for a, s in zip(open_["after"], open_["start"]))
    assert moved > 1e-3  # the iteration moved the variables well beyond the tolerance below
    for a, b in zip(fixed["after"], open_["after"]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    # Gradients of reductions over a batch of unknown size compute the reduced shape at run time.
    assert fixed["dynamic_shapes"] < open_["dynamic_shapes"]
