"""Search methods in the bilevel step and end to end (float64 where gradients are compared)."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

import keras_darts as kd
from keras_darts.runtime.bilevel import Bilevel
from keras_darts.runtime.cli import compile_and_search_main
from keras_darts.runtime.optimizers import CoupledSGD
from tests.conftest import tiny_spec_document
from tests.runtime.test_graph_build import builds_logged

OPS = ["none", "avg_pool_3x3", "skip_connect", "sep_conv_3x3"]


def plain_sgd_bilevel(method, operations=OPS, partial=None, **options):
    """A supernet whose alpha step is plain SGD (no momentum, decay or clipping): alpha moves by -lr * gradient.

    ``partial``: PC-DARTS' options, for the method on its partial-channel supernet.
    """
    document = tiny_spec_document(operations=operations)
    document["search"].update(method=method, **({method: options} if options else {}))
    if partial is not None:
        document["search"]["pc_darts"] = partial
    if method in ("snas", "gdas", "sdarts"):
        document["search"]["order"] = "first"
    spec = kd.load_spec(document)
    keras.utils.set_random_seed(0)
    model = kd.build_supernet(spec, seed=0)
    for i, alpha in enumerate(model.arch_variables):
        alpha.assign(np.random.default_rng(i).normal(0, 1.0, size=alpha.shape))
    return Bilevel(model, CoupledSGD(model.weight_variables, 0.9, 3e-4, 5.0),
                   CoupledSGD(model.arch_variables, 0.0, 0.0, None, name="arch_sgd"), hvp_epsilon=0.01)


def batches(seed=0):
    rng = np.random.default_rng(seed)
    make = lambda: (tf.constant(rng.normal(size=(6, 8, 8, 1)), "float64"),  # noqa: E731
                    tf.constant(rng.integers(0, 10, 6), tf.int32))
    return make(), make()


def beta_penalty_gradient(alphas, lam):
    """d/da of lam * mean over all rows r of logsumexp(a_r): lam * softmax(a_r) / rows, by hand."""
    rows = sum(a.shape[0] for a in alphas)
    out = []
    for a in alphas:
        e = np.exp(a - a.max(axis=1, keepdims=True))
        out.append(lam * e / e.sum(axis=1, keepdims=True) / rows)
    return out


@pytest.mark.parametrize("order", ["first", "second"])
def test_beta_darts_alpha_step_takes_the_darts_gradient_plus_the_regulariser_gradient(float64, order):
    bilevel = plain_sgd_bilevel("beta_darts", lambda_max=10.0, ramp_epochs=4)
    model = bilevel.model
    model.set_epoch(3)  # lambda = 10 * 3 / 4
    train, val = batches()
    before = [a.numpy() for a in model.arch_variables]
    darts_gradient = [g.numpy() for g in bilevel.arch_gradient(order, "finite_difference", train, val, 0.05)[0]]
    arch_lr = 0.1
    metrics, _, _ = bilevel.iteration(order, "finite_difference", train, val, tf.constant(0.05, "float64"),
                                      tf.constant(arch_lr, "float64"))
    taken = [(b - a.numpy()) / arch_lr for b, a in zip(before, model.arch_variables)]
    penalty = beta_penalty_gradient(before, 7.5)
    for t, d, p in zip(taken, darts_gradient, penalty):
        np.testing.assert_allclose(t, d + p, rtol=1e-9, atol=1e-12)
    rows = np.concatenate(before)
    expected_loss = 7.5 * np.mean(np.log(np.exp(rows).sum(axis=1)))
    np.testing.assert_allclose(float(metrics["alpha_loss"]), expected_loss, rtol=1e-12)


def test_beta_darts_on_partial_channels_penalises_the_op_alphas_and_gives_the_edge_weights_the_darts_gradient(
        float64):
    bilevel = plain_sgd_bilevel("beta_darts", partial={"partial_channels": 2, "warmup_epochs": 0}, lambda_max=10.0,
                                ramp_epochs=4)
    model = bilevel.model
    assert [m.op_channels for m in model.cells[0].mixed_ops] == [2] * 5  # C = 4 in two halves
    assert len(model.arch_variables) == 4  # two alpha matrices, then two edge-weight vectors
    model.set_epoch(3)  # lambda = 10 * 3 / 4
    train, val = batches()
    before = [a.numpy() for a in model.arch_variables]
    darts_gradient = [g.numpy() for g in bilevel.arch_gradient("first", None, train, val, 0.05)[0]]
    metrics, _, _ = bilevel.iteration("first", None, train, val, tf.constant(0.05, "float64"),
                                      tf.constant(0.1, "float64"))
    taken = [(b - a.numpy()) / 0.1 for b, a in zip(before, model.arch_variables)]
    penalty = beta_penalty_gradient(before[:2], 7.5) + [0.0, 0.0]
    for t, d, p in zip(taken, darts_gradient, penalty):
        np.testing.assert_allclose(t, d + p, rtol=1e-9, atol=1e-12)
    assert np.abs(darts_gradient[2]).max() > 0  # the edge weights do move, by the validation loss alone
    expected_loss = 7.5 * np.mean(np.log(np.exp(np.concatenate(before[:2])).sum(axis=1)))
    np.testing.assert_allclose(float(metrics["alpha_loss"]), expected_loss, rtol=1e-12)


def test_darts_alpha_step_takes_the_darts_gradient_alone(float64):
    bilevel = plain_sgd_bilevel("darts")
    train, val = batches()
    before = [a.numpy() for a in bilevel.model.arch_variables]
    darts_gradient = [g.numpy() for g in bilevel.arch_gradient("first", None, train, val, 0.05)[0]]
    metrics, _, _ = bilevel.iteration("first", None, train, val, tf.constant(0.05, "float64"),
                                      tf.constant(0.1, "float64"))
    assert "alpha_loss" not in metrics
    for b, a, d in zip(before, bilevel.model.arch_variables, darts_gradient):
        np.testing.assert_allclose((b - a.numpy()) / 0.1, d, rtol=1e-9, atol=1e-12)


def test_fair_darts_alpha_step_takes_the_darts_gradient_plus_the_zero_one_gradient(float64):
    bilevel = plain_sgd_bilevel("fair_darts", ["max_pool_3x3", "skip_connect", "sep_conv_3x3"], zero_one_weight=4.0)
    model = bilevel.model
    train, val = batches()
    before = [a.numpy() for a in model.arch_variables]
    darts_gradient = [g.numpy() for g in bilevel.arch_gradient("first", None, train, val, 0.05)[0]]
    metrics, _, _ = bilevel.iteration("first", None, train, val, tf.constant(0.05, "float64"),
                                      tf.constant(0.1, "float64"))
    s = 1 / (1 + np.exp(-np.concatenate([b.ravel() for b in before])))
    np.testing.assert_allclose(float(metrics["alpha_loss"]), -4.0 * np.mean((s - 0.5) ** 2), rtol=1e-12)
    for b, a, d in zip(before, model.arch_variables, darts_gradient):
        sb = 1 / (1 + np.exp(-b))
        zero_one = -4.0 * 2 * (sb - 0.5) * sb * (1 - sb) / s.size
        np.testing.assert_allclose((b - a.numpy()) / 0.1, d + zero_one, rtol=1e-9, atol=1e-12)


def test_snas_takes_one_step_of_weights_and_alphas_down_the_training_loss_with_the_steps_own_draw(float64):
    bilevel = plain_sgd_bilevel("snas", OPS, temperature_start=0.5)
    model = bilevel.model
    model.set_epoch(0)
    train, val = batches()
    _, other_val = batches(seed=9)
    # The draw of the step: its weight-step phase, at the weight optimiser's count (0).
    model.set_noise(tf.constant(1))
    weights, alphas = bilevel.current_weights(), bilevel.current_alphas()
    loss, _, _, alpha_grads, _ = bilevel.gradients_at(weights, alphas, train)
    before = [a.numpy() for a in alphas]
    metrics, _, _ = bilevel.iteration("first", None, train, val, tf.constant(0.05, "float64"),
                                      tf.constant(0.1, "float64"))
    np.testing.assert_allclose(float(metrics["train_loss"]), float(loss), rtol=1e-12)
    assert float(metrics["arch_loss"]) == float(metrics["train_loss"])
    for b, a, g in zip(before, model.arch_variables, alpha_grads):
        np.testing.assert_allclose((b - a.numpy()) / 0.1, g.numpy(), rtol=1e-9, atol=1e-12)
    assert any(np.abs(w.numpy() - v.numpy()).max() > 0 for w, v in zip(weights, bilevel.weight_vars))
    # The validation batch plays no part; the next step draws anew.
    again = plain_sgd_bilevel("snas", OPS, temperature_start=0.5)
    again.model.set_epoch(0)
    again.iteration("first", None, train, other_val, tf.constant(0.05, "float64"), tf.constant(0.1, "float64"))
    # Equal to rounding: reductions on several threads may sum in another order.
    for a, b in zip(model.arch_variables, again.model.arch_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-15)
    first = model.mix_alphas(model.alphas["normal"]).numpy()
    model.set_noise(tf.constant(3))
    assert np.abs(model.mix_alphas(model.alphas["normal"]).numpy() - first).max() > 1e-3


def sdarts_bilevel(perturbation, epsilon, partial=None, **options):
    """An SDARTS supernet whose weight step is plain SGD (no momentum, decay or clipping), at ``epsilon``."""
    bilevel = plain_sgd_bilevel("sdarts", OPS, partial, perturbation=perturbation, epsilon_start=epsilon,
                                epsilon_max=epsilon, **options)
    model = bilevel.model
    model.set_epoch(0)
    model.set_noise(tf.constant(1))
    plain = CoupledSGD(model.weight_variables, 0.0, 0.0, None)
    return Bilevel(model, plain, bilevel.arch_optimizer, hvp_epsilon=0.01)


def weight_step_on_probabilities(model, probabilities, train, partial=None):
    """SGD's weight change at lr 0.05 computed independently: a twin supernet whose alphas are log(p).

    Softmax gives the probabilities back, and the twin is differentiated as usual; with ``partial``
    (PC-DARTS' options) the twin is PC-DARTS' supernet with ``model``'s edge weights.
    """
    twin = plain_sgd_bilevel("darts", OPS, partial).model
    for source, target in zip(model.weight_variables, twin.weight_variables):
        target.assign(source)
    for p, alpha in zip(probabilities, twin.alphas.values()):
        alpha.assign(np.log(np.maximum(p, 1e-300)))
    for source, target in zip(getattr(model, "edge_betas", {}).values(), getattr(twin, "edge_betas", {}).values()):
        target.assign(source)
    x, y = train
    with tf.GradientTape() as tape:
        loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, twin(x, training=True),
                                                                           from_logits=True))
    return [-0.05 * g.numpy() for g in tape.gradient(loss, twin.weight_variables)]


def test_sdarts_weight_step_runs_on_the_perturbed_probabilities_as_op_weights(float64):
    bilevel = sdarts_bilevel("rs", 0.2)
    model = bilevel.model
    train, _ = batches()
    weights = bilevel.current_weights()
    perturbed = [p.numpy() for p in bilevel.perturbed_probabilities(weights, train)]
    clean = [tf.nn.softmax(a, axis=-1).numpy() for a in bilevel.current_alphas()]
    for p, q in zip(perturbed, clean):
        assert np.all(p >= 0) and np.allclose(p.sum(axis=1), 1.0) and np.abs(p - q).max() > 1e-3
    expected = weight_step_on_probabilities(model, perturbed, train)
    before = [w.numpy() for w in weights]
    bilevel.weight_step(train, tf.constant(0.05, "float64"))
    for b, w, e in zip(before, model.weight_variables, expected):
        np.testing.assert_allclose(w.numpy() - b, e, rtol=1e-7, atol=1e-12)
    # With epsilon 0 there is no perturbation.
    still = sdarts_bilevel("rs", 0.0)
    for p, a in zip(still.perturbed_probabilities(still.current_weights(), train), still.current_alphas()):
        np.testing.assert_allclose(p.numpy(), tf.nn.softmax(a, axis=-1).numpy(), rtol=1e-12)


@pytest.mark.parametrize("perturbation", ["rs", "adv"])
def test_sdarts_on_partial_channels_perturbs_the_op_probabilities_and_steps_with_the_edge_weights_as_they_are(
        float64, perturbation):
    partial = {"partial_channels": 2, "warmup_epochs": 0}
    bilevel = sdarts_bilevel(perturbation, 0.2, partial, pgd_steps=2)
    model = bilevel.model
    train, _ = batches()
    weights = bilevel.current_weights()
    perturbed = [p.numpy() for p in bilevel.perturbed_probabilities(weights, train)]
    assert len(perturbed) == 4
    for p, a in zip(perturbed[:2], bilevel.current_alphas()[:2]):
        q = tf.nn.softmax(a, axis=-1).numpy()
        assert np.all(p >= 0) and np.allclose(p.sum(axis=1), 1.0) and np.abs(p - q).max() > 1e-3
    for p, beta in zip(perturbed[2:], model.edge_betas.values()):
        np.testing.assert_array_equal(p, beta.numpy())
    expected = weight_step_on_probabilities(model, perturbed[:2], train, partial)
    before = [w.numpy() for w in weights]
    bilevel.weight_step(train, tf.constant(0.05, "float64"))
    for b, w, e in zip(before, model.weight_variables, expected):
        np.testing.assert_allclose(w.numpy() - b, e, rtol=1e-7, atol=1e-12)


def test_sdarts_adversarial_probabilities_raise_the_training_loss_within_the_simplex(float64):
    bilevel = sdarts_bilevel("adv", 0.3, pgd_steps=4)
    train, _ = batches()
    weights = bilevel.current_weights()
    clean = [tf.nn.softmax(a, axis=-1) for a in bilevel.current_alphas()]
    attacked = bilevel.perturbed_probabilities(weights, train)
    loss = lambda p: float(bilevel.given_train_loss_at(weights, p, train))  # noqa: E731
    assert loss(attacked) > loss(clean)
    random_start = sdarts_bilevel("rs", 0.3).perturbed_probabilities(weights, train)
    assert loss(attacked) > loss(random_start)  # PGD climbs beyond its random start
    for p in attacked:
        assert np.all(p.numpy() >= 0) and np.allclose(p.numpy().sum(axis=1), 1.0)


def official_directions(gradients, correlation):
    """Lambda-DARTS' per-cell directions by hand, on flattened gradients, over the 3 pairs of 3 normal cells."""
    flat = [g.ravel() for g in gradients]
    scale = 1 / 3
    if correlation == "corr":
        units = [g / np.linalg.norm(g) for g in flat]
        total = sum(units)
        out = [scale / np.linalg.norm(g) * (np.eye(g.size) - np.outer(n, n)) @ total for g, n in zip(flat, units)]
    else:
        out = []
        for i, g in enumerate(flat):
            direction = np.zeros_like(g)
            for j, h in enumerate(flat):
                if i != j:
                    abs_dot = np.abs(g) @ np.abs(h)
                    direction += (1 - (g @ h) / abs_dot * np.sign(g) * np.sign(h)) * h / abs_dot
            out.append(scale * direction)
    return [u.reshape(g.shape) for u, g in zip(out, gradients)]


@pytest.mark.parametrize("correlation", ["corr", "signcorr"])
def test_lambda_darts_weight_step_adds_the_gradient_alignment_term_computed_by_hand(float64, correlation):
    document = tiny_spec_document(operations=OPS, network={"init_channels": 4, "layers": 5, "stem_multiplier": 2,
                                                          "input_shape": [8, 8, 1], "num_classes": 10})
    document["search"].update(method="lambda_darts", order="first", lambda_darts={
        "lambda_max": 0.5, "epsilon_0": 1e-3, "correlation": correlation})
    spec = kd.load_spec(document)
    keras.utils.set_random_seed(0)
    model = kd.build_supernet(spec, seed=0)
    for i, alpha in enumerate(model.arch_variables):
        alpha.assign(np.random.default_rng(i).normal(0, 1.0, size=alpha.shape))
    model.set_epoch(1)  # lambda = 0.5 * 1 / (2 - 1)
    bilevel = Bilevel(model, CoupledSGD(model.weight_variables, 0.0, 0.0, None),
                      CoupledSGD(model.arch_variables, 0.0, 0.0, None, name="arch_sgd"))
    train, _ = batches()
    x, y = train
    shared = {t: tf.nn.softmax(a, axis=-1).numpy() for t, a in model.alphas.items()}
    cells = [shared["reduce" if c.reduction else "normal"] for c in model.cells]
    normal = [i for i, c in enumerate(model.cells) if not c.reduction]
    assert normal == [0, 2, 4]

    def gradients_at(cell_weights):
        values = [tf.constant(c) for c in cell_weights]
        with tf.GradientTape() as tape:
            tape.watch(values)
            logits = model(x, training=True, cell_weights=values)
            loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        weight_grads, cell_grads = tape.gradient(loss, [model.weight_variables, values])
        return [g.numpy() for g in weight_grads], [g.numpy() for g in cell_grads]

    # The shared op weights given to every cell are the usual forward.
    np.testing.assert_allclose(model(x, training=True, cell_weights=[tf.constant(c) for c in cells]).numpy(),
                               model(x, training=True).numpy(), rtol=1e-12)
    base, cell_grads = gradients_at(cells)
    directions = dict(zip(normal, official_directions([cell_grads[i] for i in normal], correlation)))
    u = [directions.get(i, np.zeros_like(c)) for i, c in enumerate(cells)]
    epsilon = 1e-3 / np.sqrt(sum(np.sum(v ** 2) for v in u))
    minus, _ = gradients_at([c - epsilon * v for c, v in zip(cells, u)])
    plus, _ = gradients_at([c + epsilon * v for c, v in zip(cells, u)])
    expected = [-0.1 * (g + 0.5 * (m - p) / (2 * epsilon)) for g, m, p in zip(base, minus, plus)]
    assert max(np.abs(m - p).max() for m, p in zip(minus, plus)) > 0  # the term is not zero here
    before = [w.numpy() for w in model.weight_variables]
    bilevel.weight_step(train, tf.constant(0.1, "float64"))
    # The term divides a difference of gradients by 2 epsilon: rounding grows by about 1 / epsilon.
    for b, w, e in zip(before, model.weight_variables, expected):
        np.testing.assert_allclose(w.numpy() - b, e, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", ["beta_darts", "darts_minus", "fair_darts", "snas", "gdas", "pc_darts", "drnas",
                                    "sdarts", "lambda_darts", "darts_pt", "beta_darts+pc_darts"])
def test_compile_and_search_with_a_method_ends_in_a_verified_saved_model(method, tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    document = tiny_spec_document(**({"operations": ["max_pool_3x3", "skip_connect", "sep_conv_3x3"]}
                                     if method == "fair_darts" else {}))
    method, _, partial = method.partition("+")  # beta_darts on PC-DARTS' supernet
    document["search"].update(method=method, epochs=2, order="first", steps_per_epoch=4,
                              diagnostics={"hessian_eigenvalue": False})
    if "pc_darts" in (method, partial):  # C = 4: two partial channels; one warm-up epoch of the two
        document["search"]["pc_darts"] = {"partial_channels": 2, "warmup_epochs": 1}
    if method == "drnas":  # the official progressive search: stage 2 on all C channels, 3 of the 5 ops per edge
        document["search"]["drnas"] = {"regularization": "kl", "progressive": True, "stage_partial_channels": [2, 1],
                                       "stage_keep_ops": [3], "stage_warmup_epochs": 0}
    if method == "darts_pt":  # one tuning epoch between selection steps: 5 edges, 1 node, 6 epochs
        # Each of the 56 measurements on 64 validation examples, not the whole split (that default is
        # measured in test_darts_pt_keeps_the_op_whose_masking_...[None]).
        document["search"]["darts_pt"] = {"tune_epochs": 1, "measure_examples": 64}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(document))
    run_dir = tmp_path / "run"
    assert compile_and_search_main([str(spec), "--run-dir", str(run_dir), "--no-progress"]) == 0
    assert os.path.exists(run_dir / "export" / "saved_model" / "saved_model.pb")
    derived = kd.load_derived(str(run_dir / "derived.yaml"))
    assert derived.origin["method"]["name"] == method
    # Every step function logged its build once; DrNAS' second stage rebuilt the search's two.
    built = {name: len(lines) for name, lines in builds_logged(r.getMessage() for r in caplog.records).items()}
    stages = 2 if method == "drnas" else 1
    expected = {"search step": stages, "evaluation step": stages, "retraining step": 1, "test step": 1}
    if "pc_darts" in (method, partial):
        expected["warm-up step"] = 1
    if method == "darts_pt":
        expected["measurement step"] = 1
    assert built == expected
    history = yaml.safe_load((run_dir / "search" / "history.json").read_text())
    if method in ("snas", "gdas"):  # the temperature anneals: SNAS over 150 epochs, GDAS over the search's 2
        assert [r["temperature"] for r in history] == pytest.approx(
            {"snas": [1.0, 1 - 0.97 / 150], "gdas": [10.0, 0.1]}[method], rel=1e-12)
        return
    if method == "lambda_darts":  # lambda ramps from 0 to 0.125 over the search's 2 epochs
        assert [r["lambda_weight"] for r in history] == pytest.approx([0.0, 0.125], rel=1e-12)
        return
    if method == "sdarts":  # epsilon ramps from 0.03 over the search's 2 epochs
        assert [r["epsilon"] for r in history] == pytest.approx([0.03, 0.165], rel=1e-12)
        return
    if method == "drnas":  # the KL regulariser's value is recorded each epoch, positive
        assert all(r["alpha_loss"] > 0 for r in history)
        assert any(r.getMessage() == "stage 2 of the search from epoch 2: 3 ops kept per edge, ops on C/1 channels"
                   for r in caplog.records)
        assert derived.origin["method"]["stage_epochs"] == [1, 1]
        operations = document["search_space"]["operations"]
        edges = [(0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]
        for cell_type, kept in derived.origin["kept_ops"].items():
            assert [sum(row) for row in kept] == [3] * 5
            # The second epoch's op weights are the kept ops' alone, and the derived cell uses only them.
            weights = np.array(history[1]["alpha_softmax"][cell_type])
            np.testing.assert_array_equal(weights == 0, np.array(kept) == 0)
            for target, node in zip((2, 3), derived.cells[cell_type].nodes):
                for e in node:
                    assert kept[edges.index((e.input, target))][operations.index(e.op)] == 1
        return
    if "pc_darts" in (method, partial):  # no architecture step in the warm-up epoch; the edge weights are recorded
        assert "arch_loss" not in history[0] and "arch_loss" in history[1]
        assert set(derived.origin["edge_weights"]) == {"normal", "reduce"}
        assert len(derived.origin["edge_weights"]["normal"]) == 5
    if partial:  # beta-DARTS' own options and schedule, with PC-DARTS' beside them
        assert derived.origin["method"] == {"name": "beta_darts", "lambda_max": 50.0, "ramp_epochs": 100,
                                            "pc_darts": {"partial_channels": 2, "warmup_epochs": 1}}
    elif method == "pc_darts":
        return
    if method == "darts_pt":
        # The search's 2 epochs, then 6 tuning epochs at a tenth of the learning rate, by a cosine
        # down to the search's minimum 0.001; every edge selected, one of node 3's three dropped.
        assert len(history) == 8
        tuning = [0.001 + (0.0025 - 0.001) * (1 + np.cos(np.pi * e / 6)) / 2 for e in range(6)]
        assert [r["learning_rate"] for r in history[2:]] == pytest.approx(tuning, rel=1e-12)
        # The first line counts the measurements: per cell type 5 edges x 5 ops, and node 3's 3 inputs.
        assert any(r.getMessage().endswith(", then DARTS-PT's selection over 6 tuning epochs, measuring the "
                                           "supernet 56 times on the first 64 validation examples")
                   for r in caplog.records)
        selected = derived.origin["darts_pt"]
        assert selected["steps"] == 6
        for cell_type, ops in selected["edges"].items():
            assert None not in ops and ops[:2] != ["dropped"] * 2 and ops[2:].count("dropped") == 1
            # The derived cell is the official parse of the projected weights: one-hot on each selected
            # op, zero on dropped edges; per node the two inputs of largest weight other than none (a
            # stable sort), each with its op of largest weight other than none (the first on ties).
            # So it holds the selected ops on the kept edges, except that an edge kept with none
            # selected weighs zero on every other op: it ranks alike with a dropped edge (the earlier
            # first) and gets the first op other than none.
            operations = document["search_space"]["operations"]
            others = [i for i, op in enumerate(operations) if op != "none"]
            projected = np.zeros((5, len(operations)))
            for row, op in enumerate(ops):
                if op != "dropped":
                    projected[row, operations.index(op)] = 1.0
            edges, expected, start = [(0, 2), (1, 2), (0, 3), (1, 3), (2, 3)], {}, 0
            for target in (2, 3):
                rows = projected[start:start + target][:, others]
                for source in sorted(range(target), key=lambda j: -rows[j].max())[:2]:
                    expected[source, target] = operations[others[int(np.argmax(rows[source]))]]
                start += target
            kept = {(e.input, target): e.op for target, node in zip((2, 3), derived.cells[cell_type].nodes)
                    for e in node}
            assert kept == expected
            # A selection that keeps none on an edge says so once it ends.
            kept_none = [f"{s}->{t}" for (s, t), op in zip(edges, ops) if op == "none"]
            notes = [r.getMessage() for r in caplog.records
                     if r.getMessage().startswith(f"DARTS-PT: the {cell_type} cell's selection keeps none on ")]
            assert notes == ([f"DARTS-PT: the {cell_type} cell's selection keeps none on {', '.join(kept_none)}, "
                              "which a derived cell cannot hold; it is derived by DARTS' rule on the projected "
                              "weights, as in the official code, where every other op weighs zero on such an edge "
                              "(and on a dropped one): ties decide"] if kept_none else [])
        return
    if method == "fair_darts":  # no schedule: the zero-one loss is negative (sigmoids away from 0.5)
        assert all(r["alpha_loss"] < 0 for r in history)
        assert derived.origin["method"] == {"name": "fair_darts", "zero_one_weight": 10, "threshold": 0.85}
        return
    schedule = {"beta_darts": "alpha_loss_weight", "darts_minus": "auxiliary_weight"}[method]
    # beta-DARTS' default ramp: 0, then 50/100; DARTS-' default decay over the 2 epochs: 1, then 0.5
    assert [r[schedule] for r in history] == {"beta_darts": [0.0, 0.5], "darts_minus": [1.0, 0.5]}[method]


@pytest.mark.parametrize("measure_examples", [None, 7])
def test_darts_pt_keeps_the_op_whose_masking_lowers_the_validation_accuracy_most_measured_here(measure_examples,
                                                                                               monkeypatch):
    from keras_darts.compiler.methods.base import softmax
    from keras_darts.runtime import projection
    from keras_darts.runtime.projection import SupernetSelection
    from keras_darts.runtime.search_loop import ImageSearchTask, build_search
    from keras_darts.runtime.workflow import kind_of, load_data

    document = tiny_spec_document(operations=OPS)
    document["search"].update(method="darts_pt", epochs=1, darts_pt={"measure_examples": measure_examples})
    spec = kd.load_spec(document)
    keras.utils.set_random_seed(0)
    bilevel = build_search(spec)
    model = bilevel.model
    for i, alpha in enumerate(model.arch_variables):  # alphas away from uniform, so the ops differ
        alpha.assign(np.random.default_rng(i).normal(0, 1.0, size=alpha.shape))
    task = ImageSearchTask(spec, load_data(spec), bilevel, kind_of(spec))
    selection = SupernetSelection(spec, task)
    # The search's first line says what a measurement covers.
    assert selection.describe().endswith(" on the validation split" if measure_examples is None
                                         else " on the first 7 validation examples")

    # The validation split's batches, or its first measure_examples examples in them (batch statistics:
    # the last one cut short), measured here batch by batch.
    assert task.eval_data.count > 7 and 7 % task.eval_data.batch_size != 0  # 7 cuts the split and a batch
    batches, left = [], measure_examples or task.eval_data.count
    for x, y in task.eval_data:
        batches.append((x[:left], y[:left]))
        left -= len(batches[-1][1])
        if left <= 0:
            break
    labels = np.concatenate([y.numpy() for _, y in batches])

    def accuracy(weights):
        mixing = {t: tf.constant(w, tf.float32) for t, w in weights.items()}
        right = sum(int(np.sum(np.argmax(model(x, training=False, mixing=mixing).numpy(), -1) == y.numpy()))
                    for x, y in batches)
        return right / len(labels)

    measured = []  # the examples each of the selection's measurements covered
    original = projection.evaluate
    monkeypatch.setattr(projection, "evaluate", lambda step, batches: original(
        step, [measured.append(int(y.shape[0])) or (x, y) for x, y in batches]))

    weights = {t: softmax(a.numpy()) for t, a in model.alphas.items()}
    row = int(np.random.default_rng([spec.search.seed, 0]).choice(5))  # the step's edge: all five are open
    figures = []
    for op in range(len(OPS)):
        masked = {t: w.copy() for t, w in weights.items()}
        masked["normal"][row, op] = 0.0
        figures.append(accuracy(masked))
    assert len(set(figures)) > 1  # the ops matter, so the choice below could go wrong
    selection.take_step(0, "normal", np.random.default_rng([spec.search.seed, 0]))
    assert sum(measured) == len(OPS) * len(labels)  # one measurement per op, each over exactly these examples
    state = model.projection["normal"]
    expected = np.zeros((5, len(OPS)))
    expected[row, int(np.argmin(figures))] = 1.0
    np.testing.assert_array_equal(state["chosen"].numpy(), expected)
    np.testing.assert_array_equal(state["fixed"].numpy(), np.eye(5)[row])
    assert not model.projection["reduce"]["fixed"].numpy().any()


def search_stopped_after_epoch(spec, run_dir, epoch):
    """Search ``spec`` in ``run_dir``, interrupted once ``epoch``'s record is made, before its checkpoint."""
    from keras_darts.runtime.workflow import search

    class Stop(Exception):
        pass

    def stop(record):
        if record["epoch"] == epoch:
            raise Stop

    with pytest.raises(Stop):
        search(spec, run_dir=str(run_dir), on_epoch=stop)


def test_a_progressive_drnas_search_interrupted_in_its_second_stage_resumes_to_the_uninterrupted_result(tmp_path):
    from keras_darts.runtime.workflow import search

    document = tiny_spec_document(operations=OPS)
    document["search"].update(method="drnas", order="first", epochs=3, steps_per_epoch=2, deterministic=True,
                              diagnostics={"hessian_eigenvalue": False},
                              drnas={"progressive": True, "stage_partial_channels": [2, 1], "stage_keep_ops": [2],
                                     "stage_epochs": [1, 2], "stage_warmup_epochs": 0})
    document["retrain"]["enabled"] = False
    spec = kd.load_spec(document)
    whole = search(spec, run_dir=str(tmp_path / "whole"))
    # Stopped before epoch 3's checkpoint: the run resumes from epoch 2's, inside stage 2.
    search_stopped_after_epoch(spec, tmp_path / "parts", 3)
    resumed = search(spec, run_dir=str(tmp_path / "parts"))
    assert resumed.model.stage == 1
    assert {**resumed.history[2], "seconds": 0} == {**whole.history[2], "seconds": 0}
    assert resumed.derived.to_document() == whole.derived.to_document()
    for cell_type, alpha in whole.alphas.items():
        np.testing.assert_array_equal(resumed.alphas[cell_type], alpha)
        np.testing.assert_array_equal(resumed.model.kept_masks[cell_type].numpy(),
                                      whole.model.kept_masks[cell_type].numpy())
    # The second stage's ops went on from the widened weights: equal to the uninterrupted run's.
    for a, b in zip(resumed.model.weight_variables, whole.model.weight_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_darts_pt_search_interrupted_in_its_tuning_resumes_to_the_uninterrupted_result(tmp_path):
    from keras_darts.runtime.workflow import search

    document = tiny_spec_document(operations=OPS)
    # Measured on 64 validation examples: what is checked is that the resumed selection and tuning
    # take the uninterrupted run's steps, which does not depend on how many examples it measures.
    document["search"].update(method="darts_pt", epochs=1, steps_per_epoch=2,
                              darts_pt={"tune_epochs": 1, "measure_examples": 64}, deterministic=True,
                              diagnostics={"hessian_eigenvalue": False})
    document["retrain"]["enabled"] = False
    spec = kd.load_spec(document)
    whole = search(spec, run_dir=str(tmp_path / "whole"))
    # After the second selection step and its tuning epoch, before that epoch's checkpoint (written
    # after every other callback): the run resumes from the checkpoint of epoch 2 and takes the
    # second selection step again.
    search_stopped_after_epoch(spec, tmp_path / "parts", 3)
    first = yaml.safe_load((tmp_path / "parts" / "search" / "history.json").read_text())
    assert len(first) == 3
    resumed = search(spec, run_dir=str(tmp_path / "parts"))
    # It went on from its checkpoint after epoch 2 (the first records, their timings too, are the
    # interrupted run's own; epoch 3 ran again, to the same figures), and ended where the
    # uninterrupted search did.
    assert resumed.history[:2] == first[:2] and len(resumed.history) == len(whole.history) == 7
    assert resumed.history[2]["seconds"] != first[2]["seconds"]
    assert {**resumed.history[2], "seconds": 0} == {**first[2], "seconds": 0}
    assert resumed.derived.to_document() == whole.derived.to_document()
    for cell_type, alpha in whole.alphas.items():
        np.testing.assert_array_equal(resumed.alphas[cell_type], alpha)
    assert [r["genotype"] for r in resumed.history] == [r["genotype"] for r in whole.history]
