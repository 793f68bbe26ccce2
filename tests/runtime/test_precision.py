"""Mixed precision: what stays float32, the second-order arithmetic, loss scaling, a whole run."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_darts as kd
from keras_darts.runtime.cli import compile_and_search_main
from keras_darts.runtime.optimizers import CoupledSGD
from keras_darts.runtime.precision import DynamicLossScale, computing_in, layers_of
from keras_darts.runtime.search_loop import build_search
from keras_darts.spec import dump_yaml
from tests.conftest import tiny_spec_document

SMOOTH_OPS = ["none", "avg_pool_3x3", "skip_connect", "sep_conv_3x3"]
ETA = 0.025
BATCH = 32


def bilevel_in(precision, seed=4):
    """The tiny supernet in ``precision``, alphas far enough from uniform that ops differ."""
    keras.utils.set_random_seed(seed)
    spec = kd.load_spec(tiny_spec_document(operations=SMOOTH_OPS), overrides=[f"search.precision={precision}"])
    bilevel = build_search(spec)
    bilevel.fix_batch_size(BATCH)  # as an image search builds its passes
    for alpha in bilevel.model.arch_variables:
        alpha.assign(np.random.default_rng(seed).normal(0, 0.5, size=alpha.shape))
    return bilevel


def batches(seed=4):
    rng = np.random.default_rng(seed)
    make = lambda: (tf.constant(rng.normal(size=(BATCH, 8, 8, 1)), tf.float32),  # noqa: E731
                    tf.constant(rng.integers(0, 10, BATCH), tf.int32))
    return make(), make()


def flat(tensors):
    return np.concatenate([np.asarray(t, np.float64).ravel() for t in tensors])


def relative(a, b):
    return np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(b))


@pytest.fixture(scope="module")
def float32_and_bfloat16():
    return bilevel_in("float32"), bilevel_in("mixed_bfloat16")


def test_mixed_bfloat16_computes_in_16_bits_and_keeps_weights_alphas_and_optimisers_in_float32(float32_and_bfloat16):
    _, mixed = float32_and_bfloat16
    model = mixed.model
    assert {layer.compute_dtype for layer in layers_of(model)} == {"bfloat16"}
    assert {v.dtype for v in model.variables if v.dtype != "int32"} == {"float32"}
    for optimizer in (mixed.weights_optimizer, mixed.arch_optimizer):
        assert {v.dtype for v in optimizer.variables if v.dtype != tf.int64} == {tf.float32}
    train, _ = batches()
    assert model(train[0], training=True).dtype == tf.bfloat16
    assert model.mix_alphas(model.alphas["normal"]).dtype == "float32"  # the softmax of float32 alphas
    loss, _, weight_grads, alpha_grads, _ = mixed.gradients_at(mixed.current_weights(), mixed.current_alphas(), train)
    assert loss.dtype == tf.float32
    assert {g.dtype for g in weight_grads + alpha_grads} == {tf.float32}
    # The float32 block computes in float32 and gives the layers their policy back.
    with computing_in(model, "float32"):
        assert model(train[0], training=True).dtype == tf.float32
    assert model(train[0], training=True).dtype == tf.bfloat16


def test_finite_difference_under_mixed_bfloat16_is_float32_arithmetic_on_its_16_bit_passes(float32_and_bfloat16):
    """The virtual step, g1 and v come from bfloat16 passes; the radius, the perturbed passes and the
    Hessian-vector product's difference are float32: recomputed by the float32 network from the mixed
    run's own v and g1, they agree to float32 rounding."""
    exact, mixed = float32_and_bfloat16
    train, val = batches()
    weights = mixed.current_weights()
    terms = mixed.finite_difference_terms(train, val, tf.constant(ETA), weights)
    v = terms["v"]
    radius = 0.01 / np.linalg.norm(flat(v))
    alphas = exact.current_alphas()
    plus = exact.alpha_gradients_at([w + radius * d for w, d in zip(weights, v)], alphas, train)[2]
    minus = exact.alpha_gradients_at([w - radius * d for w, d in zip(weights, v)], alphas, train)[2]
    hvp = [(p.numpy() - m.numpy()) / (2 * radius) for p, m in zip(plus, minus)]
    assert float(terms["radius"]) == pytest.approx(radius, rel=1e-6)
    assert relative(terms["hvp"], hvp) < 1e-3
    gradient = [g.numpy() - ETA * h for g, h in zip(terms["g1"], hvp)]
    assert relative(terms["gradient"], gradient) < 1e-4


def test_mixed_bfloat16_architecture_gradients_stay_near_float32(float32_and_bfloat16):
    """First order, finite-difference and exact second order from the same weights and batches.

    Tolerance: bfloat16 keeps 8 significant bits. Over seeds 0-5 of this network the first-order
    gradient was 5-14% (relative norm) from float32's. A second-order gradient adds eta H v, and v, a
    weight gradient from a bfloat16 pass, errs more (28% at this seed), amplified by the Hessian:
    13-51% for the finite difference, 6-21% for the exact form. The bounds are the worst measured,
    rounded up; the cosine checks that the direction, which Adam follows, holds.
    """
    exact, mixed = float32_and_bfloat16
    train, val = batches()
    for order, mode, bound in (("first", None, 0.2), ("second", "finite_difference", 0.6),
                               ("second", "exact", 0.3)):
        ours = mixed.arch_gradient(order, mode, train, val, tf.constant(ETA), mixed.current_weights())[0]
        reference = exact.arch_gradient(order, mode, train, val, tf.constant(ETA), exact.current_weights())[0]
        a, b = flat(ours), flat(reference)
        assert relative(ours, reference) < bound, (order, mode)
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.85, (order, mode)


def test_loss_scale_skips_a_step_with_non_finite_gradients_halves_and_doubles_after_its_growth_steps():
    variables = [tf.Variable([1.0, 2.0])]
    optimizer = CoupledSGD(variables, momentum=0.9, weight_decay=0.0, grad_clip=None)
    scale = DynamicLossScale(initial=8.0, growth_steps=3)
    assert float(scale.scale(tf.constant(0.5))) == 4.0
    np.testing.assert_allclose(scale.unscale([tf.constant([8.0, 16.0])])[0].numpy(), [1.0, 2.0])
    step = tf.function(lambda g: scale.apply(optimizer, [g], tf.constant(0.1)))
    values = []
    for k in range(3):
        norm = step(tf.constant([1.0, 0.0]))
        assert float(norm) == pytest.approx(1.0)
        values.append(variables[0].numpy().copy())
        assert float(scale.value) == (8.0 if k < 2 else 16.0)
    assert int(scale.finite_steps) == 0  # reset on growth
    momentum = optimizer.momentum_buffers[0].numpy().copy()
    assert np.isnan(float(step(tf.constant([np.inf, 0.0]))))
    np.testing.assert_array_equal(variables[0].numpy(), values[-1])  # nothing moved
    np.testing.assert_array_equal(optimizer.momentum_buffers[0].numpy(), momentum)
    assert int(optimizer.iterations) == 3
    assert float(scale.value) == 8.0
    step(tf.constant([1.0, 0.0]))
    assert int(optimizer.iterations) == 4 and int(scale.finite_steps) == 1


def test_mixed_float16_gradients_are_unscaled_float32_gradients(float32_and_bfloat16):
    exact, _ = float32_and_bfloat16
    half = bilevel_in("mixed_float16")
    assert float(half.loss_scale.value) == 2.0**15
    train, _ = batches()
    ours = half.gradients_at(half.current_weights(), half.current_alphas(), train)
    reference = exact.gradients_at(exact.current_weights(), exact.current_alphas(), train)
    assert float(ours[0]) == pytest.approx(float(reference[0]), rel=1e-2)  # the loss, not its scaled value
    assert relative(ours[3], reference[3]) < 0.1  # float16's 11 significant bits: 1-5% measured
    assert relative(ours[2], reference[2]) < 0.1


def test_search_in_bfloat16_and_retraining_in_float16_run_end_to_end_and_export_in_float32(tmp_path):
    document = tiny_spec_document()
    document["search"].update(epochs=1, steps_per_epoch=3, precision="mixed_bfloat16")
    document["retrain"]["precision"] = "mixed_float16"
    document["export"] = {"formats": ["saved_model"]}
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(dump_yaml(document))
    run_dir = tmp_path / "out"
    assert compile_and_search_main([str(spec_path), "--run-dir", str(run_dir), "--no-progress"]) == 0
    history = json.loads((run_dir / "search" / "history.json").read_text())
    assert all(np.isfinite(epoch[key]) for epoch in history for key in ("train_loss", "val_loss"))
    metrics = json.loads((run_dir / "retrain" / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.2  # ten classes: chance is 0.1
    latest = json.loads((run_dir / "retrain" / "checkpoints" / "latest.json").read_text())
    folder = run_dir / "retrain" / "checkpoints" / latest["checkpoint"]
    names = [name for name, _ in tf.train.list_variables(str(folder / "variables")) if "loss_scale" in name]
    assert names, "the retraining checkpoint holds the loss scale"
    report = json.loads((run_dir / "export" / "report.json").read_text())
    assert report["formats"]["saved_model"]["max_difference"] < 1e-5  # float32 against float32 Keras
