"""Search methods against independent computations: beta-DARTS' schedule and loss, DARTS-' auxiliary path,
FairDARTS' sigmoid mixing, zero-one loss and threshold derivation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_darts as kd
from keras_darts.compiler.cells import MixedOp
from keras_darts.compiler.methods import (
    BetaDarts,
    DartsMinus,
    Drnas,
    FairDarts,
    Gdas,
    PcDarts,
    SearchMethod,
    Snas,
    method_from_document,
    search_method,
)
from keras_darts.spec import Edge
from tests.conftest import tiny_spec_document

OPS = ["none", "avg_pool_3x3", "skip_connect", "sep_conv_3x3"]


def spec_with(method=None, **options):
    document = tiny_spec_document(operations=OPS)
    if method:
        document["search"]["method"] = method
    if options:
        document["search"][method] = options
    return kd.load_spec(document)


# -- beta-DARTS ----------------------------------------------------------------------
def test_beta_darts_lambda_ramps_as_the_official_code_and_stops_at_lambda_max():
    official = BetaDarts()  # 50 * e / 100 over the official 100 epochs
    assert [official.schedule(e)["alpha_loss_weight"] for e in (0, 1, 50, 99)] == [0.0, 0.5, 25.0, 49.5]
    assert official.schedule(100)["alpha_loss_weight"] == 50.0
    assert official.schedule(250)["alpha_loss_weight"] == 50.0
    short = BetaDarts({"lambda_max": 8.0, "ramp_epochs": 4})
    assert [short.schedule(e)["alpha_loss_weight"] for e in range(6)] == [0.0, 2.0, 4.0, 6.0, 8.0, 8.0]


def test_beta_darts_loss_is_lambda_times_the_mean_logsumexp_of_every_alpha_row():
    rng = np.random.default_rng(0)
    alphas = [rng.normal(0, 2, (5, 4)), rng.normal(0, 2, (5, 4))]
    loss = BetaDarts().alpha_loss([tf.constant(a) for a in alphas], {"alpha_loss_weight": tf.constant(3.0)})
    rows = np.concatenate(alphas)
    expected = 3.0 * np.mean(np.log(np.exp(rows).sum(axis=1)))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-12)


def test_darts_has_no_alpha_loss_and_no_schedule():
    method = search_method(spec_with())
    assert type(method) is SearchMethod and method.name == "darts"
    assert method.alpha_loss([tf.zeros((3, 4))], {}) is None
    assert method.schedule(7) == {}


# -- DARTS- ------------------------------------------------------------------------------
def test_darts_minus_beta_follows_the_official_decay_scheduler_by_hand():
    # linear, beta_0 1, T_start 0, T_max = T_stop = 50 (the official script): 1 -> 0.02 over 50 epochs
    linear = DartsMinus(epochs=50)
    assert [linear.decay_rate(e) for e in (0, 25, 49)] == [1.0, 0.5, 0.02]
    cosine = DartsMinus({"decay": "cosine"}, epochs=50)
    assert cosine.decay_rate(0) == 1.0 and cosine.decay_rate(25) == pytest.approx(0.5, abs=1e-15)
    slow = DartsMinus({"decay": "slow_cosine", "beta_0": 2.0}, epochs=50)
    assert slow.decay_rate(25) == pytest.approx(2.0 * np.sqrt(0.5), abs=1e-15)
    # past T_stop the rate keeps the value it had at T_stop
    stopped = DartsMinus({"stop_epoch": 10}, epochs=50)
    assert stopped.decay_rate(10) == stopped.decay_rate(30) == 0.8
    # before T_start it is beta_0; from T_start on, (T_max - e) / (T_max - T_start) with e itself, not e - T_start
    late = DartsMinus({"start_epoch": 5}, epochs=50)
    assert late.decay_rate(3) == 1.0 and late.decay_rate(5) == 1.0 and late.decay_rate(14) == 36 / 45


def test_darts_minus_defaults_take_the_searchs_epochs_and_the_document_round_trips():
    method = search_method(spec_with("darts_minus"))
    assert method.options == {"beta_0": 1.0, "decay": "linear", "start_epoch": 0, "max_epoch": 2, "stop_epoch": 2,
                              "auxiliary_operation": "skip"}
    again = method_from_document(method.to_document(), epochs=None)
    assert again.options == method.options and again.decay_rate(1) == 0.5


def test_auxiliary_path_at_stride_1_adds_beta_times_the_input():
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(3, 6, 6, 4)), tf.float32)
    plain = MixedOp(OPS, 4, 1, name="plain")
    with_aux = MixedOp(OPS, 4, 1, auxiliary="skip", name="aux")
    weights = [tf.constant(w, tf.float32) for w in (0.1, 0.2, 0.3, 0.4)]
    plain(x, weights)
    with_aux(x, weights + [tf.constant(0.0)])
    for source, target in zip(plain.weights, with_aux.weights):
        target.assign(source)
    expected = plain(x, weights, training=True).numpy() + 0.7 * x.numpy()
    got = with_aux(x, weights + [tf.constant(0.7)], training=True).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_auxiliary_path_at_stride_2_is_a_factorized_reduce_without_affine_parameters():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 6, 6, 4)).astype("float32")
    op = MixedOp(["none"], 4, 2, auxiliary="skip", name="reduce_edge")
    y = op(tf.constant(x), [tf.constant(1.0), tf.constant(0.6)], training=True).numpy()
    aux = op.auxiliary_path
    assert not aux.trainable_weights[2:]  # two kernels, no gamma or beta
    k1, k2 = (w.numpy()[0, 0] for w in aux.trainable_weights)
    relu = np.maximum(x, 0.0)
    left = relu[:, ::2, ::2, :] @ k1
    right = relu[:, 1::2, 1::2, :] @ k2
    joined = np.concatenate([left, right], axis=-1)
    mean, var = joined.mean(axis=(0, 1, 2)), joined.var(axis=(0, 1, 2))
    expected = 0.6 * (joined - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_conv1_auxiliary_path_starts_as_the_identity_and_is_trained():
    x = tf.constant(np.random.default_rng(3).normal(size=(2, 5, 5, 4)), tf.float32)
    op = MixedOp(["none"], 4, 1, auxiliary="conv1", name="conv1_edge")
    y = op(x, [tf.constant(1.0), tf.constant(1.0)])
    np.testing.assert_allclose(y.numpy(), x.numpy(), rtol=1e-6, atol=1e-6)
    assert [w.shape for w in op.trainable_weights] == [(1, 1, 4, 4)]


def copy_by_path(source, target):
    """Assign ``source``'s variables to the same-path variables of ``target``; return the paths not covered."""
    values = {v.path: v for v in source.variables}
    for variable in target.variables:
        if variable.path in values:
            variable.assign(values[variable.path])
    return sorted(v.path for v in target.variables if v.path not in values)


def test_darts_minus_supernet_with_beta_zero_is_the_darts_supernet_and_beta_adds_a_path():
    darts = kd.build_supernet(spec_with(), seed=0)
    minus = kd.build_supernet(spec_with("darts_minus"), seed=1)
    extra = copy_by_path(darts, minus)
    # Every mixed op gains an auxiliary path; only the FactorizedReduce ones have weights: the 4 edges that
    # leave the two inputs of each of the 2 reduction cells, 2 kernels each. And the schedule's scalar.
    assert sum(p.endswith("schedule__auxiliary_weight") for p in extra) == 1
    auxiliary = [p for p in extra if "__auxiliary/" in p]
    assert len(auxiliary) == 2 * 4 * 2 and len(extra) == len(auxiliary) + 1
    assert {p.split("/")[-2].split("__")[0] for p in auxiliary} == {"cell_01", "cell_02"}
    x = tf.constant(np.random.default_rng(4).normal(size=(4, 8, 8, 1)), tf.float32)
    assert minus.schedule["auxiliary_weight"].numpy() == 1.0
    minus.schedule["auxiliary_weight"].assign(0.0)
    np.testing.assert_allclose(minus(x, training=True).numpy(), darts(x, training=True).numpy(), rtol=1e-5,
                               atol=1e-6)
    minus.set_epoch(1)  # beta 0.5 over 2 epochs
    assert minus.schedule["auxiliary_weight"].numpy() == 0.5
    assert np.abs(minus(x, training=True).numpy() - darts(x, training=True).numpy()).max() > 1e-3


def test_set_epoch_changes_a_compiled_pass_without_tracing_it_again():
    model = kd.build_supernet(spec_with("darts_minus", max_epoch=4), seed=0)
    x = tf.constant(np.random.default_rng(5).normal(size=(4, 8, 8, 1)), tf.float32)
    traces = []

    @tf.function
    def forward(x):
        traces.append(1)
        return model(x, training=True)

    outputs = []
    for epoch in range(3):
        model.set_epoch(epoch)
        outputs.append(forward(x).numpy())
        eager = model(x, training=True).numpy()
        np.testing.assert_allclose(outputs[-1], eager, rtol=1e-5, atol=1e-6)
    assert len(traces) == 1
    assert np.abs(outputs[0] - outputs[2]).max() > 1e-4


def test_darts_minus_derives_by_darts_rule_without_its_auxiliary_path():
    rng = np.random.default_rng(6)
    alphas = {t: rng.normal(size=(5, len(OPS))) for t in ("normal", "reduce")}
    darts = kd.derived_spec_from_search(spec_with(), alphas)
    minus = kd.derived_spec_from_search(spec_with("darts_minus"), alphas)
    assert darts.cells == minus.cells


def test_supernet_config_round_trips_the_method_and_its_schedule():
    model = kd.build_supernet(spec_with("beta_darts", lambda_max=4.0, ramp_epochs=2), seed=0)
    config = model.get_config()
    assert config["method"] == {"name": "beta_darts", "lambda_max": 4.0, "ramp_epochs": 2}
    clone = type(model).from_config(config)
    clone.build((None, 8, 8, 1))
    clone.set_epoch(1)
    assert clone.method.name == "beta_darts" and clone.schedule["alpha_loss_weight"].numpy() == 2.0
    assert keras.ops.convert_to_numpy(clone.arch_probabilities()["normal"]).shape == (5, len(OPS))


# -- FairDARTS --------------------------------------------------------------------------
FAIR_OPS = ["max_pool_3x3", "skip_connect", "sep_conv_3x3"]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_fair_darts_weighs_each_op_by_its_own_sigmoid():
    document = tiny_spec_document(operations=FAIR_OPS)
    document["search"]["method"] = "fair_darts"
    model = kd.build_supernet(kd.load_spec(document), seed=0)
    rng = np.random.default_rng(3)
    for alpha in model.arch_variables:
        alpha.assign(rng.normal(0, 2, alpha.shape))
    for cell_type, weights in model.arch_probabilities().items():
        expected = sigmoid(model.alphas[cell_type].numpy().astype(np.float64))
        np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)
        assert np.abs(weights.numpy().sum(axis=1) - 1).max() > 0.1  # no softmax: rows need not sum to 1


def test_fair_darts_zero_one_loss_and_its_gradient_by_hand():
    rng = np.random.default_rng(1)
    alphas = [rng.normal(0, 2, (5, 3)), rng.normal(0, 2, (5, 3))]
    method = FairDarts({"zero_one_weight": 7.0})
    variables = [tf.Variable(a) for a in alphas]
    with tf.GradientTape() as tape:
        loss = method.alpha_loss(variables, {})
    gradients = tape.gradient(loss, variables)
    s = sigmoid(np.concatenate([a.ravel() for a in alphas]))
    np.testing.assert_allclose(float(loss), -7.0 * np.mean((s - 0.5) ** 2), rtol=1e-12)
    for a, g in zip(alphas, gradients):
        sa = sigmoid(a)
        # d/da of -w mean((s - 1/2)^2) over all N entries: -w * 2 (s - 1/2) s (1 - s) / N
        np.testing.assert_allclose(g.numpy(), -7.0 * 2 * (sa - 0.5) * sa * (1 - sa) / s.size, rtol=1e-10)
    assert FairDarts().options == {"zero_one_weight": 10.0, "threshold": 0.85}  # the official defaults


def logit(p):
    return float(np.log(p / (1 - p)))


def test_fair_darts_derivation_keeps_edges_over_the_threshold_and_drops_isolated_nodes():
    # Three nodes; edges (rows) in order: node 2 <- 0, 1; node 3 <- 0, 1, 2; node 4 <- 0, 1, 2, 3.
    alpha = np.full((9, 3), logit(0.1))
    alpha[0, 2] = logit(0.95)   # node 2 <- 0: sep_conv_3x3 at 0.95, kept
    alpha[1, 1] = logit(0.80)   # node 2 <- 1: skip_connect at 0.80, one of its top 2 but under 0.85: dropped
    alpha[2, 0] = logit(0.60)   # node 3's edges all under 0.85: node 3 is isolated and dropped
    alpha[4, 1] = logit(0.70)   # node 3 <- 2: skip_connect at 0.70
    alpha[6, 0] = logit(0.90)   # node 4 <- 1: max_pool_3x3, kept
    alpha[8, 2] = logit(0.99)   # node 4 <- 3: the strongest, but node 3 is gone
    genotype = kd.derive_genotype({"normal": alpha}, FAIR_OPS, 3, 2, FairDarts())["normal"]
    # Node 4 becomes node 3; the cell concatenates the two nodes left.
    assert genotype.nodes == ((Edge("sep_conv_3x3", 0),), (Edge("max_pool_3x3", 1),))
    assert genotype.concat == (2, 3)
    # With a threshold of 0.5, node 3 keeps its edge from node 2, and node 4 its edge from node 3.
    lower = kd.derive_genotype({"normal": alpha}, FAIR_OPS, 3, 2, FairDarts({"threshold": 0.5}))["normal"]
    assert lower.nodes == ((Edge("sep_conv_3x3", 0), Edge("skip_connect", 1)),
                           (Edge("skip_connect", 2), Edge("max_pool_3x3", 0)),
                           (Edge("sep_conv_3x3", 3), Edge("max_pool_3x3", 1)))


def test_fair_darts_cell_with_no_edge_over_the_threshold_is_derived_by_darts_rule_on_the_sigmoids():
    alpha = np.random.default_rng(2).normal(0, 0.01, (9, 3))  # every sigmoid near 0.5, as a search starts
    fair = kd.derive_genotype({"normal": alpha}, FAIR_OPS, 3, 2, FairDarts())["normal"]
    # By hand: per node, the two edges with the largest sigmoid, each with its argmax op.
    weights, row, nodes = sigmoid(alpha), 0, []
    for node in range(3):
        rows = list(range(row, row + 2 + node))
        row += 2 + node
        best = sorted(rows, key=lambda r: -weights[r].max())[:2]
        nodes.append(tuple(Edge(FAIR_OPS[int(weights[r].argmax())], rows.index(r)) for r in best))
    assert fair.nodes == tuple(nodes) and fair.concat == (2, 3, 4)


def test_fair_darts_is_refused_with_none_in_the_op_set():
    from keras_darts.spec import SpecError

    document = tiny_spec_document()
    document["search"]["method"] = "fair_darts"
    with pytest.raises(SpecError) as excinfo:
        kd.load_spec(document)
    assert [str(p) for p in excinfo.value.problems] == [
        "<dict>: $.search_space.operations: $.search.method is fair_darts, whose op set has no 'none' (each op is "
        "weighed by its own sigmoid, so 'none' only adds a zero term); drop 'none' from the operations"]


@pytest.mark.parametrize("method", ["fair_darts", "snas", "gdas", "pc_darts", "drnas", "sdarts", "lambda_darts",
                                    "darts_pt"])
def test_methods_of_convolutional_cells_are_refused_on_recurrent_cells(tmp_path, method):
    from keras_darts.spec import SpecError
    from tests.conftest import tiny_recurrent_document, write_cyclic_corpus

    recurrent = tiny_recurrent_document(write_cyclic_corpus(tmp_path / "corpus"))
    recurrent["search"]["method"] = method
    with pytest.raises(SpecError) as excinfo:
        kd.load_spec(recurrent)
    assert [str(p) for p in excinfo.value.problems] == [
        f"<dict>: $.search.method: {method} is defined for convolutional cells; $.search_space.kind is "
        "'recurrent_cell' (beta_darts and darts work on every kind)"]


# -- SNAS and GDAS: the Gumbel-softmax ----------------------------------------------------
def uniform_noise(seed):
    rng = np.random.default_rng(seed)
    drawn = {}

    def noise(shape):
        drawn["u"] = rng.uniform(size=tuple(int(d) for d in shape))
        return tf.constant(drawn["u"])

    return noise, drawn


def test_gdas_samples_each_op_with_its_softmax_probability_one_hot_valued():
    alpha = np.array([0.3, -1.0, 1.2, 0.1])
    rows = tf.constant(np.tile(alpha, (40000, 1)))
    noise, _ = uniform_noise(0)
    h = Gdas().mix(rows, noise=noise, schedule={"temperature": tf.constant(5.0, "float64")}).numpy()
    assert set(np.unique(h)) == {0.0, 1.0} and np.all(h.sum(axis=1) == 1.0)
    # Gumbel-max: argmax(log_softmax(alpha) + g) is op o with probability softmax(alpha)_o, at any tau.
    expected = np.exp(alpha) / np.exp(alpha).sum()
    frequencies = h.mean(axis=0)
    assert np.all(np.abs(frequencies - expected) < 4 * np.sqrt(expected * (1 - expected) / len(h)))


def test_gdas_straight_through_gradient_is_the_gradient_of_the_relaxed_weights():
    alpha = tf.Variable(np.array([[0.3, -1.0, 1.2, 0.1], [0.0, 0.5, -0.5, 2.0]]))
    noise, drawn = uniform_noise(1)
    tau = 0.7
    coefficients = np.array([[1.0, -2.0, 0.5, 3.0], [0.2, 0.4, -1.0, 1.5]])
    with tf.GradientTape() as tape:
        h = Gdas().mix(alpha, noise=noise, schedule={"temperature": tf.constant(tau, "float64")})
        objective = tf.reduce_sum(h * coefficients)
    gradient = tape.gradient(objective, alpha).numpy()
    # By hand: p = softmax(z), z = (log_softmax(alpha) + g) / tau; dp/dz = diag(p) - p p^T,
    # dz/dalpha = (I - 1 softmax(alpha)^T) / tau.
    g = -np.log(-np.log(drawn["u"]))
    for row in range(2):
        a = alpha.numpy()[row]
        s = np.exp(a) / np.exp(a).sum()
        z = (np.log(s) + g[row]) / tau
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        jacobian = (np.diag(p) - np.outer(p, p)) @ (np.eye(4) - np.outer(np.ones(4), s)) / tau
        np.testing.assert_allclose(gradient[row], jacobian.T @ coefficients[row], rtol=1e-10, atol=1e-14)
        assert h.numpy()[row, int(np.argmax(z))] == 1.0  # the value: one_hot(argmax p)


def test_snas_weights_are_the_softmax_of_alpha_plus_gumbel_noise_over_the_temperature():
    alpha = np.random.default_rng(4).normal(0, 1, (5, 4))
    noise, drawn = uniform_noise(2)
    weights = Snas().mix(tf.constant(alpha), noise=noise, schedule={"temperature": tf.constant(0.4, "float64")})
    z = (alpha - np.log(-np.log(drawn["u"]))) / 0.4
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(weights.numpy(), expected / expected.sum(axis=1, keepdims=True), rtol=1e-12)


def test_snas_and_gdas_temperatures_follow_the_official_schedules():
    snas = Snas()  # t(e) = (1 - e / 150) (1 - 0.03) + 0.03
    assert [round(snas.schedule(e)["temperature"], 10) for e in (0, 75, 150)] == [1.0, 0.515, 0.03]
    gdas = Gdas(epochs=5)  # tau(e) = 10 - (10 - 0.1) e / 4
    assert [round(gdas.schedule(e)["temperature"], 10) for e in range(5)] == [10.0, 7.525, 5.05, 2.575, 0.1]
    assert Gdas({"anneal_epochs": 1}).schedule(0)["temperature"] == 10.0


def test_a_sampled_edge_runs_only_the_selected_op():
    # A candidate whose output is NaN poisons any weighted sum that computes it, even at weight 0.
    edge = MixedOp(["avg_pool_3x3", "skip_connect", "sep_conv_3x3"], 4, 1, sampled=True)
    x = tf.constant(np.random.default_rng(5).normal(size=(2, 6, 6, 4)), "float32")
    edge(x, [tf.constant(1.0)] * 3, training=False)  # builds every op
    poisoned = edge.candidates[2]
    edge.candidates[2] = lambda value, training=None: poisoned(value, training=training) * np.nan
    weights = [tf.constant(0.0), tf.constant(1.0), tf.constant(0.0)]  # skip_connect selected
    np.testing.assert_allclose(edge(x, weights, training=True).numpy(), x.numpy())
    assert np.isnan(edge(x, weights, training=False).numpy()).all()  # the full sum runs the NaN op
    weights = [tf.constant(1.0), tf.constant(0.0), tf.constant(0.0)]
    pooled = keras.layers.AveragePooling2D(3, 1, padding="same")(x)
    assert np.isfinite(edge(x, weights, training=True).numpy()).all()
    assert edge(x, weights, training=True).shape == pooled.shape


def test_gdas_derivation_ranks_input_op_pairs_so_two_ops_may_share_an_input():
    operations = ["none", "max_pool_3x3", "skip_connect", "sep_conv_3x3"]
    alpha = np.zeros((5, 4))
    alpha[0] = [0.0, 2.5, -3.0, 3.0]   # node 2 <- 0: sep 0.593, max_pool 0.360
    alpha[1] = [0.0, 0.0, 1.0, 0.0]    # node 2 <- 1: skip 0.475
    alpha[2] = [5.0, 0.0, 0.0, 0.0]    # node 3 <- 0: 'none' never counts
    alpha[3] = [0.0, 1.0, 0.0, 0.0]    # node 3 <- 1: max_pool 0.475
    alpha[4] = [0.0, 0.0, 2.0, 1.9]    # node 3 <- 2: skip 0.473, sep 0.428
    s = np.exp(alpha) / np.exp(alpha).sum(axis=1, keepdims=True)
    assert s[0, 3] > s[1, 2] > s[0, 1] and s[3, 1] > s[4, 2] > s[4, 3] > s[2, 1]
    genotype = kd.derive_genotype({"normal": alpha}, operations, 2, 2, Gdas())["normal"]
    assert genotype.nodes == ((Edge("sep_conv_3x3", 0), Edge("skip_connect", 1)),
                              (Edge("max_pool_3x3", 1), Edge("skip_connect", 2)))
    alpha[1] = [0.0, 0.0, -1.0, 0.0]   # now node 2's two strongest pairs both read input 0
    genotype = kd.derive_genotype({"normal": alpha}, operations, 2, 2, Gdas())["normal"]
    assert genotype.nodes[0] == (Edge("sep_conv_3x3", 0), Edge("max_pool_3x3", 0))
    # DARTS' rule keeps two distinct inputs on the same alphas.
    darts = kd.derive_genotype({"normal": alpha}, operations, 2, 2)["normal"]
    assert {edge.input for edge in darts.nodes[0]} == {0, 1}


@pytest.mark.parametrize("method, how", [
    ("snas", "updates weights and alphas with one training loss"),
    ("gdas", "alternates first-order steps, each on its own sample"),
])
def test_gumbel_methods_search_first_order_and_refuse_second_order(method, how):
    from keras_darts.spec import SpecError

    document = tiny_spec_document()
    del document["search"]["order"]
    document["search"]["method"] = method
    assert kd.load_spec(document).search.order == "first"  # unless the spec says otherwise
    document["search"]["order"] = "second"
    with pytest.raises(SpecError) as excinfo:
        kd.load_spec(document)
    assert [str(p) for p in excinfo.value.problems] == [
        f"<dict>: $.search.order: $.search.method {method} {how}, as its official code does; expected order: first, "
        "got second"]


# -- PC-DARTS -----------------------------------------------------------------------------
def max_pool_2x2(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_channel_edge_is_the_shuffled_concat_of_its_ops_on_the_first_channels_and_the_bypass(stride):
    operations = ["none", "avg_pool_3x3", "skip_connect", "sep_conv_3x3"]
    edge = MixedOp(operations, 8, stride, partial_channels=4, edge_scaled=True)
    x = np.random.default_rng(6).normal(size=(2, 6, 6, 8)).astype("float32")
    weights = [tf.constant(w) for w in (0.1, 0.2, 0.3, 0.4, 0.7)]  # four op weights, then the edge's weight
    out = edge(tf.constant(x), weights, training=True).numpy()
    # By hand: the ops on the first 8/4 = 2 channels (as the edge's own op layers compute them), ...
    seen = tf.constant(x[..., :2])
    mixed = sum(w * edge.candidates[i](seen, training=True).numpy() for i, w in ((1, 0.2), (2, 0.3), (3, 0.4)))
    # ... the other 6 channels as they are, or max-pooled 2x2 at stride 2, ...
    bypass = x[..., 2:] if stride == 1 else max_pool_2x2(x[..., 2:])
    joined = np.concatenate([mixed, bypass], axis=-1)
    # ... shuffled in 4 groups: channel g * 2 + j goes to j * 4 + g, then scaled by the edge weight.
    shuffled = np.empty_like(joined)
    for g in range(4):
        for j in range(2):
            shuffled[..., j * 4 + g] = joined[..., g * 2 + j]
    np.testing.assert_allclose(out, 0.7 * shuffled, rtol=1e-5, atol=1e-6)
    assert all(op.channels == 2 for op in edge.candidates if hasattr(op, "channels"))


def pc_darts_spec(**options):
    document = tiny_spec_document(operations=OPS, network={"init_channels": 4, "layers": 3, "stem_multiplier": 2,
                                                          "input_shape": [8, 8, 1], "num_classes": 10})
    del document["search"]["order"]
    document["search"].update(method="pc_darts", pc_darts={"partial_channels": 2, **options})
    return kd.load_spec(document)


def test_pc_darts_edge_weights_are_the_softmax_over_each_nodes_inputs_and_trained_as_architecture():
    model = kd.build_supernet(pc_darts_spec(), seed=0)
    betas = np.random.default_rng(7).normal(0, 1, (2, 5))
    for i, cell_type in enumerate(("normal", "reduce")):
        model.edge_betas[cell_type].assign(betas[i])
    normalized = model.normalized_edge_betas()
    for i, cell_type in enumerate(("normal", "reduce")):
        b = betas[i]
        expected = np.concatenate([np.exp(b[:2]) / np.exp(b[:2]).sum(), np.exp(b[2:]) / np.exp(b[2:]).sum()])
        np.testing.assert_allclose(normalized[cell_type].numpy()[:, 0], expected, rtol=1e-6)
        np.testing.assert_allclose(model.edge_weights()[cell_type].numpy()[:, -1], expected, rtol=1e-6)
    assert [v.path for v in model.arch_variables] == ["supernet/alpha_normal", "supernet/alpha_reduce",
                                                      "supernet/beta_normal", "supernet/beta_reduce"]
    assert not {id(v) for v in model.arch_variables} & {id(v) for v in model.weight_variables}


def test_pc_darts_derivation_weighs_each_edge_by_its_normalized_edge_weight():
    operations = ["none", "max_pool_3x3", "skip_connect", "sep_conv_3x3"]
    alpha = np.zeros((5, 4))
    alpha[0] = [0.0, 0.0, 0.0, 2.0]   # node 2 <- 0: sep 0.711 ...
    alpha[1] = [0.0, 1.5, 0.0, 0.0]   # node 2 <- 1: max_pool 0.599
    alpha[2] = [0.0, 0.0, 1.0, 0.0]   # node 3 <- 0: skip 0.475
    alpha[3] = [0.0, 0.0, 0.0, 1.2]   # node 3 <- 1: sep 0.525
    alpha[4] = [0.0, 1.1, 0.0, 0.0]   # node 3 <- 2: max_pool 0.500
    s = np.exp(alpha) / np.exp(alpha).sum(axis=1, keepdims=True)
    betas = np.array([0.0, 0.0, 3.0, -3.0, 0.0])  # node 3 favours its edge from 0, then from 2
    scale = np.concatenate([[0.5, 0.5], np.exp(betas[2:]) / np.exp(betas[2:]).sum()])
    strength = (s * scale[:, None])[:, 1:].max(axis=1)
    assert strength[2] > strength[4] > strength[3]  # by hand: the betas reorder node 3's inputs
    genotype = kd.derive_genotype({"normal": alpha}, operations, 2, 2, PcDarts(),
                                  edge_betas={"normal": betas})["normal"]
    assert genotype.nodes == ((Edge("sep_conv_3x3", 0), Edge("max_pool_3x3", 1)),
                              (Edge("skip_connect", 0), Edge("max_pool_3x3", 2)))
    without = kd.derive_genotype({"normal": alpha}, operations, 2, 2)["normal"]
    assert without.nodes[1] == (Edge("sep_conv_3x3", 1), Edge("max_pool_3x3", 2))


def assert_three_partial_channels_refused(method):
    """``method`` with PC-DARTS' K = 3 on the tiny space's 4 channels: refused with the divisibility message."""
    from keras_darts.spec import SpecError

    document = tiny_spec_document(operations=OPS)
    document["search"].update(method=method, pc_darts={"partial_channels": 3})
    with pytest.raises(SpecError) as excinfo:
        kd.load_spec(document)
    assert [str(p) for p in excinfo.value.problems] == [
        "<dict>: $.search.pc_darts.partial_channels: 3 does not divide $.search_space.network.init_channels 4: the "
        "ops of an edge take the first C/3 of its C channels; expected a divisor of 4"]


def test_pc_darts_defaults_warm_up_and_the_checks_of_its_options(tmp_path):
    from keras_darts.runtime.bilevel import Bilevel
    from keras_darts.runtime.optimizers import CoupledSGD

    assert PcDarts().options == {"partial_channels": 4, "warmup_epochs": 15}  # the official K and warm-up
    assert [PcDarts({"warmup_epochs": 2}).arch_frozen(e) for e in range(4)] == [True, True, False, False]
    spec = pc_darts_spec(warmup_epochs=1)
    assert spec.search.order == "first"  # the official default, unless the spec says otherwise
    # The warm-up step trains the weights and leaves alphas and edge weights alone.
    model = kd.build_supernet(spec, seed=0)
    bilevel = Bilevel(model, CoupledSGD(model.weight_variables, 0.9, 3e-4, 5.0),
                      CoupledSGD(model.arch_variables, 0.0, 0.0, None, name="arch_sgd"))
    rng = np.random.default_rng(0)
    batch = (tf.constant(rng.normal(size=(4, 8, 8, 1)), "float32"), tf.constant(rng.integers(0, 10, 4), tf.int32))
    arch, weights = [v.numpy() for v in model.arch_variables], [v.numpy() for v in model.weight_variables]
    metrics, _, _ = bilevel.compiled_weight_step()(batch, batch, tf.constant(0.1), tf.constant(0.1))
    assert sorted(metrics) == ["grad_norm", "train_accuracy", "train_loss"]
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(arch, model.arch_variables))
    assert any(not np.array_equal(w, v.numpy()) for w, v in zip(weights, model.weight_variables))
    assert_three_partial_channels_refused("pc_darts")


@pytest.mark.parametrize("method", ["beta_darts", "darts_minus", "snas", "drnas", "sdarts", "darts_pt", "darts"])
def test_another_method_on_pc_darts_supernet_takes_its_partial_channels_warm_up_and_records_both(method):
    from keras_darts.compiler.methods import method_from_document, search_method

    document = tiny_spec_document(operations=OPS)
    del document["search"]["order"]
    document["search"].update(method=method, pc_darts={"partial_channels": 2, "warmup_epochs": 3})
    spec = kd.load_spec(document)
    assert spec.search.order == "first"  # PC-DARTS' official default, as for method pc_darts
    found = search_method(spec)
    assert (found.name, found.partial_channels, found.edge_normalization) == (method, 2, True)
    assert [found.arch_frozen(e) for e in range(5)] == [True, True, True, False, False]
    recorded = found.to_document()
    assert recorded["pc_darts"] == {"partial_channels": 2, "warmup_epochs": 3}
    again = method_from_document(recorded, epochs=2)
    assert again.to_document() == recorded and again.partial_channels == 2
    model = kd.build_supernet(spec, seed=0)
    assert [m.op_channels for m in model.cells[0].mixed_ops] == [2] * 5
    assert set(model.edge_betas) == {"normal", "reduce"}
    # Without the options, the method's own supernet: all channels, no edge weights, no warm-up.
    plain = method_from_document({"name": method}, epochs=2)
    assert (plain.partial_channels, plain.edge_normalization, plain.arch_frozen(0)) == (1, False, False)
    assert "pc_darts" not in plain.to_document()


@pytest.mark.parametrize("method, why", [
    ("fair_darts", "keeps an op whose own sigmoid weight reaches its threshold"),
    ("gdas", "computes only the sampled op of each edge already"),
    ("lambda_darts", "gives every cell its own op weights in the weight step"),
])
def test_methods_that_cannot_search_on_pc_darts_supernet_are_refused_naming_both_fields(method, why):
    from keras_darts.spec import SpecError

    document = tiny_spec_document(operations=["max_pool_3x3", "skip_connect", "sep_conv_3x3"])
    document["search"].update(method=method, order="first", pc_darts={})
    with pytest.raises(SpecError) as excinfo:
        kd.load_spec(document)
    [problem] = [str(p) for p in excinfo.value.problems]
    assert problem.startswith(f"<dict>: $.search.pc_darts: PC-DARTS' partial channels cannot carry "
                              f"$.search.method {method}, which {why}")
    assert problem.endswith("; drop search.pc_darts or choose another method")


def test_partial_channels_beside_another_method_must_divide_the_channels():
    assert_three_partial_channels_refused("beta_darts")


# -- DrNAS --------------------------------------------------------------------------------
def test_drnas_samples_the_dirichlet_of_elu_alpha_plus_one_with_reparameterised_gradients():
    from keras_darts.compiler.methods.drnas import concentration

    alpha = tf.Variable(np.array([[0.5, -0.7, 1.5, 0.0]]))
    rows = 20000
    c = np.where(alpha.numpy() > 0, alpha.numpy(), np.exp(alpha.numpy()) - 1) + 1  # elu(alpha) + 1 by hand
    np.testing.assert_allclose(concentration(alpha).numpy(), c, rtol=1e-12)
    coefficients = np.array([1.0, -2.0, 0.5, 3.0])
    noise, _ = uniform_noise(0)
    noise.seed = tf.constant([3, 4], tf.int32)
    with tf.GradientTape() as tape:
        tiled = tf.tile(alpha, (rows, 1))
        weights = Drnas().mix(tiled, noise=noise)
        objective = tf.reduce_sum(tf.reduce_mean(weights, axis=0) * coefficients)
    gradient = tape.gradient(objective, alpha).numpy()[0]
    w = weights.numpy()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-12)
    mean = c[0] / c[0].sum()
    assert np.all(np.abs(w.mean(axis=0) - mean) < 4 * w.std(axis=0) / np.sqrt(rows))  # E[w] = c / sum(c)
    # The pathwise gradient averages to the gradient of E[w] = c / sum(c), by hand through elu.
    dc = np.where(alpha.numpy()[0] > 0, 1.0, np.exp(alpha.numpy()[0]))
    total = c[0].sum()
    jacobian = (np.eye(4) * total - c[0][:, None]) / total ** 2  # d(c_i / sum c) / d c_j
    expected = (coefficients @ jacobian) * dc
    np.testing.assert_allclose(gradient, expected, rtol=0.05, atol=0.01 * np.abs(expected).max())


def test_drnas_kl_regulariser_is_the_kl_to_the_uniform_dirichlet():
    from scipy.special import gammaln
    from scipy.stats import dirichlet

    rng = np.random.default_rng(8)
    alphas = [rng.normal(0, 1, (5, 4)), rng.normal(0, 1, (5, 4))]
    method = Drnas({"regularization": "kl", "kl_scale": 0.5})
    loss = float(method.alpha_loss([tf.constant(a) for a in alphas], {}))
    # KL(q || Dir(1)) = -H(q) - log Dir(1)'s constant density Gamma(K): scipy's entropy, row by row.
    expected = 0.0
    for a in alphas:
        for row in np.where(a > 0, a, np.exp(a) - 1) + 1:
            expected += -dirichlet(row).entropy() - gammaln(4)
    np.testing.assert_allclose(loss, 0.5 * expected, rtol=1e-9)
    assert Drnas().alpha_loss([tf.constant(alphas[0])], {}) is None  # l2: the optimiser's weight decay
    assert Drnas().options == {"regularization": "l2", "kl_scale": 1e-3, "exclude_none": False}


def test_drnas_derivation_ranks_none_like_any_op_and_drops_the_edges_it_wins():
    operations = ["none", "max_pool_3x3", "skip_connect", "sep_conv_3x3"]
    alpha = np.zeros((5, 4))
    alpha[0] = [3.0, 0.0, 0.0, 1.0]   # node 2 <- 0: none is its best, and the strongest edge: dropped
    alpha[1] = [0.0, 0.0, 0.0, 2.0]   # node 2 <- 1: sep_conv_3x3
    alpha[2] = [0.0, 1.0, 0.0, 0.0]   # node 3 <- 0: max_pool_3x3
    alpha[3] = [0.0, 0.0, 0.0, 0.0]
    alpha[4] = [0.0, 0.0, 2.5, 0.0]   # node 3 <- 2: skip_connect
    genotype = kd.derive_genotype({"normal": alpha}, operations, 2, 2, Drnas())["normal"]
    assert genotype.nodes == ((Edge("sep_conv_3x3", 1),), (Edge("skip_connect", 2), Edge("max_pool_3x3", 0)))
    # exclude_none: DARTS' rule, none never counts.
    excluded = kd.derive_genotype({"normal": alpha}, operations, 2, 2, Drnas({"exclude_none": True}))["normal"]
    assert excluded.nodes[0] == (Edge("sep_conv_3x3", 1), Edge("sep_conv_3x3", 0))


# -- DrNAS' progressive search --------------------------------------------------------------
def test_drnas_progressive_stages_split_the_epochs_and_freeze_the_alphas_at_the_start_of_each():
    official = Drnas({"progressive": True}, epochs=50)  # two stages of 25, alphas frozen while epoch % 25 < 10
    assert official.options["stage_epochs"] == [25, 25] and official.stage_partial_channels == (6, 4)
    assert [official.stage(e) for e in (0, 24, 25, 49)] == [0, 0, 1, 1]
    assert [e for e in range(50) if official.arch_frozen(e)] == list(range(10)) + list(range(25, 35))
    assert official.kept_ops(1) == 4
    uneven = Drnas({"progressive": True, "stage_partial_channels": [4, 2, 1], "stage_keep_ops": [5, 3],
                    "stage_warmup_epochs": 1}, epochs=11)
    assert uneven.options["stage_epochs"] == [3, 3, 5]  # the remainder to the last stage
    assert [uneven.stage(e) for e in range(11)] == [0] * 3 + [1] * 3 + [2] * 5
    assert [e for e in range(11) if uneven.arch_frozen(e)] == [0, 3, 6]
    given = Drnas({"progressive": True, "stage_epochs": [2, 7], "stage_warmup_epochs": 0}, epochs=9)
    assert [given.stage(e) for e in range(9)] == [0, 0] + [1] * 7 and not any(map(given.arch_frozen, range(9)))
    assert Drnas().stages == 1 and Drnas().stage_partial_channels is None and not Drnas().arch_frozen(0)


def test_drnas_prune_keeps_each_rows_largest_searched_alphas_and_zeroes_the_others():
    from keras_darts.compiler.methods.drnas import prune

    alpha = np.array([[0.3, -0.2, 0.5, 0.1],
                      [0.2, 0.2, 0.1, -1.0]])  # a tie: the earlier op wins
    pruned, mask = prune(alpha, None, 2)
    np.testing.assert_array_equal(mask, [[1, 0, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(pruned, [[0.3, 0.0, 0.5, 0.0], [0.2, 0.2, 0.0, 0.0]])
    # A pruned alpha that grew since (the optimiser's moments move it on) does not come back.
    drifted = pruned + np.array([[0.0, 0.9, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    again, mask = prune(drifted, mask, 1)
    np.testing.assert_array_equal(mask, [[0, 0, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(again, [[0.0, 0.0, 0.5, 0.0], [0.2, 0.0, 0.0, 0.0]])


def progressive_supernet(keep=2, partial=(3, 2)):
    document = tiny_spec_document(operations=OPS)
    document["search_space"]["network"]["init_channels"] = 12
    document["search"].update(method="drnas", epochs=2, drnas={
        "progressive": True, "stage_partial_channels": list(partial), "stage_keep_ops": [keep]})
    keras.utils.set_random_seed(0)
    return kd.build_supernet(kd.load_spec(document), seed=0)


def test_drnas_widening_appends_copies_of_random_channels_coupled_through_each_separable_conv():
    model = progressive_supernet()
    rng = np.random.default_rng(5)
    momentum = {id(v): tf.Variable(rng.normal(size=v.shape), dtype=v.dtype) for v in model.weight_variables}
    pairs = [(narrow, wide) for cell in model.cells for mixed in cell.mixed_ops
             for narrow, wide in zip(*mixed.stage_candidates) if narrow.trainable_weights]
    before = [([v.numpy() for v in n.trainable_weights], [momentum[id(v)].numpy() for v in n.trainable_weights])
              for n, _ in pairs]
    model.enter_stage(1, momentum)
    checked = set()
    for (narrow, wide), (values, buffers) in zip(pairs, before):
        c = values[0].shape[2]  # an op's channels: C/3 of its edge's C
        assert wide.trainable_weights[0].shape[2] == c * 3 // 2
        copied = {}
        for name, value, buffer, variable in zip([v.name for v in wide.trainable_weights], values, buffers,
                                                 wide.trainable_weights):
            grown = variable.numpy()
            widened = momentum[id(variable)].numpy()
            np.testing.assert_array_equal(grown[tuple(slice(0, n) for n in value.shape)], value)
            np.testing.assert_array_equal(widened[tuple(slice(0, n) for n in value.shape)], buffer)
            # Each appended input channel repeats one of the narrow kernel's, found by its values;
            # the momentum repeats the same one.
            for axis in (2, 3) if name.startswith("pointwise") else (2,):
                sources = []
                for j in range(value.shape[axis], grown.shape[axis]):
                    column = np.take(grown, j, axis=axis)
                    [source] = [i for i in range(value.shape[axis])
                                if np.array_equal(np.take(grown, i, axis=axis), column)]
                    np.testing.assert_array_equal(np.take(widened, j, axis=axis), np.take(widened, source, axis=axis))
                    sources.append(source)
                copied[(name, axis)] = sources
        # The pointwise conv after a depthwise one takes the channels the depthwise one copied.
        for depthwise, pointwise in (("depthwise_1", "pointwise_1"), ("depthwise_2", "pointwise_2")):
            if (depthwise, 2) in copied:
                assert copied[(pointwise, 2)] == copied[(depthwise, 2)]
                checked.add(type(wide).__name__)
    assert checked == {"SepConv"}


def test_drnas_second_stage_computes_only_the_kept_ops_on_renormalised_dirichlet_weights():
    model = progressive_supernet(keep=2)
    alpha = np.array([[0.1, 0.9, -0.3, 0.6]] * 5)  # avg_pool_3x3 and sep_conv_3x3 kept on every edge
    model.alphas["normal"].assign(alpha)
    model.enter_stage(1)
    np.testing.assert_array_equal(model.kept_masks["normal"].numpy(), [[0, 1, 0, 1]] * 5)
    np.testing.assert_array_equal(model.alphas["normal"].numpy(), np.float32([[0.0, 0.9, 0.0, 0.6]] * 5))
    normal = [cell for cell in model.cells if not cell.reduction][0]
    assert all(op.active == [1, 3] and op.partial_channels == 2 for op in normal.mixed_ops)
    # The Dirichlet of the kept ops: Dir(c) restricted to them and renormalised is Dir(c_kept).
    draws = []
    for step in range(400):
        model.set_noise(tf.constant(step))
        draws.append(model.arch_probabilities()["normal"].numpy())
    draws = np.stack(draws)
    assert np.all(draws[..., [0, 2]] == 0.0)
    np.testing.assert_allclose(draws.sum(axis=-1), 1.0, rtol=1e-6)
    c = np.array([1.9, 1.6])  # elu(a) + 1 of the kept alphas
    samples = draws[..., [1, 3]].reshape(-1, 2)
    assert np.all(np.abs(samples.mean(axis=0) - c / c.sum()) < 4 * samples.std(axis=0) / np.sqrt(len(samples)))
    # A pruned op's weights change nothing; a kept op's do.
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 8, 8, 1)), tf.float32)
    mixing = {t: tf.constant(np.full((5, 4), 0.25), tf.float32) for t in model.alphas}
    reference = model(x, mixing=mixing).numpy()
    edge = normal.mixed_ops[0]
    for index, changes in ((0, False), (2, False), (3, True)):
        for variable in edge.candidates[index].trainable_weights:
            variable.assign(variable.numpy() + 1.0)
        assert (not np.allclose(model(x, mixing=mixing).numpy(), reference)) == changes
        reference = model(x, mixing=mixing).numpy()


def test_drnas_searches_first_order_by_default():
    document = tiny_spec_document()
    del document["search"]["order"]
    document["search"]["method"] = "drnas"
    assert kd.load_spec(document).search.order == "first"
