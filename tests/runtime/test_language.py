"""Language modelling: text data, the recurrent bilevel gradients (float64), search, retraining and export."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_darts as kd
from keras_darts.runtime.language_search import build_language_search
from keras_darts.runtime.text_data import (
    EOS,
    UNK,
    batchify,
    build_vocabulary,
    load_text_data,
    sequence_lengths,
    tokenize,
    window,
)
from keras_darts.spec import DataError
from tests.conftest import tiny_recurrent_document, write_cyclic_corpus
from tests.runtime.test_graph_build import builds_logged

ETA = 0.5
NO_DROPOUT = {"dropout_output": 0.0, "dropout_hidden": 0.0, "dropout_cell_input": 0.0, "dropout_embedding": 0.0}


# -- text data ----------------------------------------------------------------------
def test_tokens_vocabulary_and_unknown_words(tmp_path):
    assert tokenize("a b\n\n  c \n") == ["a", "b", EOS, "c", EOS]
    assert build_vocabulary(["b", "a", "b", "c", "a", "b"]) == ["b", "a", "c"]
    assert build_vocabulary(["b", "a", "b", "c", "a", "b"], max_size=2) == ["b", UNK]
    for split, text in (("train", "x y x\nz x\n"), ("valid", "x q\n"), ("test", "y\n")):
        (tmp_path / f"{split}.txt").write_text(text, encoding="utf-8")
    document = tiny_recurrent_document(tmp_path)
    document["data"].update(batch_size=1, eval_batch_size=1)
    document["retrain"]["batch_size"] = 1
    data = load_text_data(kd.load_spec(document))
    assert data.vocabulary == ["x", EOS, "y", "z", UNK]  # q is not in the training split
    assert data.train.tolist() == [0, 2, 0, 1, 3, 0, 1]
    assert data.valid.tolist() == [0, 4, 1]


def test_streams_and_windows_follow_the_reference_layout():
    streams = batchify(np.arange(23), 4)
    assert streams.tolist()[1] == [5, 6, 7, 8, 9]  # stream b is the b-th contiguous piece
    x, y = window(streams, 1, 3)
    assert x.tolist()[0] == [1, 2, 3] and y.tolist()[0] == [2, 3, 4]
    assert sequence_lengths(5, 3, False, None) == [3, 1]
    lengths = sequence_lengths(1000, 35, True, np.random.default_rng(0))
    assert sum(lengths) == 999 and min(lengths[:-1]) >= 5 and max(lengths) <= 55
    assert lengths != [35] * len(lengths)
    assert lengths == sequence_lengths(1000, 35, True, np.random.default_rng(0))


def test_penn_treebank_has_the_standard_splits():
    spec = kd.load_spec({"version": 1, "name": "ptb", "search_space": {"kind": "recurrent_cell"},
                         "data": {"source": "ptb"}})
    data = load_text_data(spec)
    assert (len(data.train), len(data.valid), len(data.test)) == (929_589, 73_760, 82_430)
    assert data.vocabulary_size == 10_000 and EOS in data.vocabulary and UNK in data.vocabulary


def test_text_data_problems_name_the_field(tmp_path, cyclic_corpus):
    document = tiny_recurrent_document(tmp_path / "absent")
    with pytest.raises(DataError, match=r"\$.data.path: .*absent is not a directory with train.txt"):
        load_text_data(kd.load_spec(document))
    os.remove(cyclic_corpus / "test.txt")
    with pytest.raises(DataError, match=r"\$.data.path: .*test.txt is missing"):
        load_text_data(kd.load_spec(tiny_recurrent_document(cyclic_corpus)))
    (cyclic_corpus / "test.txt").write_bytes(b"ok \xff\xfe\n")
    with pytest.raises(DataError, match=r"test.txt is not UTF-8 text \(byte 3\)"):
        load_text_data(kd.load_spec(tiny_recurrent_document(cyclic_corpus)))
    (cyclic_corpus / "test.txt").write_text("w1\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_text_data(kd.load_spec(tiny_recurrent_document(cyclic_corpus)))
    assert str(excinfo.value) == (
        "<dict>: $.data.eval_batch_size: the test split of 'corpus' has 2 tokens, too few for 2 streams of at least 2 tokens; "
        "expected at least 4"
    )


# -- the recurrent bilevel gradients ---------------------------------------------------
def make_language_bilevel(text_dir, grad_clip, seed=0):
    document = tiny_recurrent_document(text_dir, **NO_DROPOUT)
    document["search"]["weights_optimizer"] = {"grad_clip": grad_clip}
    document["search"]["temporal_activation_regularization"] = 0.0
    spec = kd.load_spec(document)
    keras.utils.set_random_seed(seed)
    bilevel = build_language_search(spec, vocabulary_size=13)
    bilevel.model.alpha.assign(np.random.default_rng(seed).normal(0, 0.5, size=bilevel.model.alpha.shape))
    return bilevel


def language_batches(seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)

    def make():
        tokens = rng.integers(0, 13, (3, 6))
        return (tf.constant(tokens[:, :5], tf.int32), tf.constant(tokens[:, 1:], tf.int32),
                tf.constant(rng.normal(0, 0.3, (3, 8)), dtype), tf.constant([1, 2], tf.int32))

    return make(), make()


def eager_loss_gradients(model, batch, variables):
    tokens, targets, hidden, _ = batch
    with tf.GradientTape() as tape:
        logits = model(tokens, hidden, training=True)[0]
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True))
    return [np.zeros(v.shape) if g is None else g.numpy() for g, v in zip(tape.gradient(loss, variables), variables)]


def assign(variables, values):
    for variable, value in zip(variables, values):
        variable.assign(value)


def clipped(gradients, max_norm):
    norm = np.sqrt(sum(float((g**2).sum()) for g in gradients))
    coefficient = min(1.0, max_norm / (norm + 1e-6))
    return [g * coefficient for g in gradients], coefficient


def test_recurrent_finite_difference_gradient_clips_the_virtual_step_and_v(float64, cyclic_corpus):
    bilevel = make_language_bilevel(cyclic_corpus, grad_clip=0.05)
    model = bilevel.model
    train, val = language_batches()
    terms = bilevel.finite_difference_terms(train, val, ETA)

    weights, alphas = bilevel.weight_vars, bilevel.arch_vars
    w0 = [v.numpy() for v in weights]
    gw, coefficient = clipped(eager_loss_gradients(model, train, weights), 0.05)
    assert coefficient < 1.0  # the clipping is active, so the test can tell
    unrolled = [w - ETA * (g + 5e-7 * w) for w, g in zip(w0, gw)]
    assign(weights, unrolled)
    v, _ = clipped(eager_loss_gradients(model, val, weights), 0.05)
    g1 = eager_loss_gradients(model, val, alphas)
    radius = 0.01 / np.sqrt(sum(float((d**2).sum()) for d in v))
    assign(weights, [w + radius * d for w, d in zip(w0, v)])
    plus = eager_loss_gradients(model, train, alphas)
    assign(weights, [w - radius * d for w, d in zip(w0, v)])
    minus = eager_loss_gradients(model, train, alphas)
    assign(weights, w0)
    expected = [a - ETA * coefficient * (p - m) / (2 * radius) for a, p, m in zip(g1, plus, minus)]

    assert float(terms["clip_coefficient"]) == pytest.approx(coefficient, rel=1e-9)
    for got, want in zip(terms["unrolled"], unrolled):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-14)
    for got, want in zip(terms["gradient"], expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-7, atol=1e-12)
    first = bilevel.first_order_gradient(val)[0]
    assert not np.allclose(first[0].numpy(), terms["gradient"][0].numpy(), rtol=1e-3)


def waits_for(op):
    """Every op that ``op`` waits for, through its inputs and control inputs."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for source in [t.op for t in current.inputs] + list(current.control_inputs):
            if source not in seen:
                seen.add(source)
                stack.append(source)
    return seen


def perturbed_pass_calls(graph):
    """The calls of the alpha-gradient pass in a traced second-order step: the two perturbed passes."""
    return [op for op in graph.get_operations() if op.type in ("PartitionedCall", "StatefulPartitionedCall")
            and "alpha_gradients_at" in op.get_attr("f").name]


def test_recurrent_finite_differences_run_the_perturbed_passes_at_once_with_the_values_of_one_after_the_other(
        float64, cyclic_corpus):
    bilevel = make_language_bilevel(cyclic_corpus, grad_clip=0.05)
    assert bilevel.perturbed_passes_concurrent  # one CPU device, asked for by the recurrent search
    train, val = language_batches()
    keys = ("grad_plus", "grad_minus", "gradient", "unrolled")

    def terms():
        every = bilevel.finite_difference_terms(train, val, ETA)
        return {key: every[key] for key in keys}

    def traced():
        function = tf.function(terms, autograph=False)
        return function, function.get_concrete_function().graph

    at_once, at_once_graph = traced()
    plus, minus = perturbed_pass_calls(at_once_graph)
    assert plus not in waits_for(minus) and minus not in waits_for(plus)
    concurrent = at_once()

    bilevel.concurrent_perturbed_passes = False
    assert not bilevel.perturbed_passes_concurrent
    in_turn, in_turn_graph = traced()
    plus, minus = perturbed_pass_calls(in_turn_graph)
    assert plus in waits_for(minus) or minus in waits_for(plus)
    sequential = in_turn()
    # Concurrent kernels sum some gradients in varying order, so a pass's last bits vary from call to
    # call either way: the builds are compared within float64 rounding, not bit for bit.
    for key in keys:
        for got, want in zip(concurrent[key], sequential[key]):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-12 * np.abs(want).max())

    # Under a strategy (whose passes may hold collectives) the passes run one after the other.
    spec = kd.load_spec(tiny_recurrent_document(cyclic_corpus))
    distributed = build_language_search(spec, vocabulary_size=13,
                                        strategy=tf.distribute.MirroredStrategy(["/cpu:0"]))
    assert distributed.concurrent_perturbed_passes and not distributed.perturbed_passes_concurrent


def test_recurrent_exact_mode_is_the_derivative_of_the_unrolled_validation_loss(float64, cyclic_corpus):
    bilevel = make_language_bilevel(cyclic_corpus, grad_clip=None, seed=1)
    model = bilevel.model
    train, val = language_batches(seed=1)
    exact = bilevel.exact_gradient(train, val, ETA)[0][0].numpy()
    weights, alpha = bilevel.weight_vars, model.alpha
    w0 = [v.numpy() for v in weights]
    a0 = alpha.numpy()

    def unrolled_validation_loss(value):
        alpha.assign(value)
        gw = eager_loss_gradients(model, train, weights)
        assign(weights, [w - ETA * (g + 5e-7 * w) for w, g in zip(w0, gw)])
        tokens, targets, hidden, _ = val
        logits = model(tokens, hidden, training=True)[0]
        loss = float(tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)))
        assign(weights, w0)
        alpha.assign(a0)
        return loss

    rng = np.random.default_rng(0)
    for _ in range(6):
        index = tuple(int(rng.integers(n)) for n in a0.shape)
        up, down = a0.copy(), a0.copy()
        up[index] += 1e-6
        down[index] -= 1e-6
        numeric = (unrolled_validation_loss(up) - unrolled_validation_loss(down)) / 2e-6
        assert exact[index] == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_each_pass_draws_its_own_dropout_masks(cyclic_corpus):
    bilevel = make_language_bilevel(cyclic_corpus, grad_clip=0.25)
    objective = bilevel.objective
    objective.rates = {**objective.rates, "hidden": 0.5}
    (tokens, _, _, seed), _ = language_batches(dtype="float32")
    first = objective.masks(3, objective.for_pass((tokens, tokens, None, seed), 0)[3])["hidden"].numpy()
    again = objective.masks(3, objective.for_pass((tokens, tokens, None, seed), 0)[3])["hidden"].numpy()
    other = objective.masks(3, objective.for_pass((tokens, tokens, None, seed), 1)[3])["hidden"].numpy()
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert set(np.unique(first)) == {0.0, 2.0}


# -- search, retraining, export ---------------------------------------------------------
def test_a_short_search_lowers_validation_perplexity(cyclic_corpus):
    from keras_darts.runtime.workflow import search

    document = tiny_recurrent_document(cyclic_corpus)
    document["search"].update(epochs=3, order="first",
                              weights_optimizer={"learning_rate": 10.0, "learning_rate_min": 10.0})
    document["retrain"]["enabled"] = False
    spec = kd.load_spec(document)
    result = search(spec)
    perplexities = [record["val_perplexity"] for record in result.history]
    vocabulary = len(load_text_data(spec).vocabulary)
    # An untrained model is near-uniform over the vocabulary; the corpus is nearly deterministic.
    assert perplexities[-1] < 0.6 * vocabulary
    assert perplexities[-1] < perplexities[0]
    assert result.derived.kind == "recurrent_cell" and result.derived.network.vocabulary_size == vocabulary


def run_cli(entry, *args, cwd=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-c", f"from keras_darts.runtime.cli import {entry}; raise SystemExit({entry}())", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_compile_and_search_takes_a_recurrent_spec_to_a_saved_language_model(tmp_path, cyclic_corpus):
    spec_path = tmp_path / "rnn.yaml"
    spec_path.write_text(json.dumps(tiny_recurrent_document(cyclic_corpus)), encoding="utf-8")
    run_dir = tmp_path / "run"
    result = run_cli("compile_and_search_main", str(spec_path), "--run-dir", str(run_dir), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "test perplexity" in result.stdout and "Traceback" not in result.stderr
    built = {name: len(lines) for name, lines in builds_logged(result.stderr.splitlines()).items()}
    assert built == {"search step": 1, "evaluation step": 1, "eigenvalue pass": 1, "retraining step": 1,
                     "retraining evaluation step": 1}
    metrics = json.loads((run_dir / "retrain" / "metrics.json").read_text())
    assert 1.0 < metrics["test_perplexity"] < 1e4
    derived = kd.load_derived(str(run_dir / "derived.yaml"))
    assert derived.network.vocabulary_size == len((run_dir / "vocabulary.txt").read_text().split())
    saved = run_dir / "export" / "saved_model"
    assert (saved / "vocabulary.txt").read_text() == (run_dir / "vocabulary.txt").read_text()
    # Export again from model.keras alone: the SavedModel, run in pieces in a fresh
    # process with the state fed back, matches Keras on the whole sequence.
    again = run_cli("main", "export", str(run_dir), "--format", "saved_model", "--format", "tflite_dynamic")
    assert again.returncode == 0, again.stderr
    # The TFLite file takes one sequence per call; run in pieces with the state fed back, it matches Keras.
    interpreter = tf.lite.Interpreter(model_path=str(run_dir / "export" / "model_dynamic.tflite"))
    serve = interpreter.get_signature_runner("serving_default")
    sequence = np.array([[1, 2, 3, 4, 5, 6, 7]], np.int32)
    hidden, pieces = np.zeros((1, 8), np.float32), []
    for start in (0, 3, 6):
        out = serve(tokens=sequence[:, start:start + 3], hidden=hidden)
        pieces.append(out["log_probabilities"])
        hidden = out["hidden"]
    keras_model = keras.saving.load_model(run_dir / "retrain" / "model.keras")
    whole = tf.nn.log_softmax(keras_model(sequence, tf.zeros((1, 8)))[0], axis=-1).numpy()
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, atol=1e-3)  # int8 weights, float activations
    report = json.loads((run_dir / "export" / "report.json").read_text())
    assert list(report["formats"]) == ["saved_model", "tflite_dynamic"]
    assert report["network"]["per"] == "token" and report["formats"]["tflite_dynamic"]["latency_ms"] > 0
    loaded = tf.saved_model.load(str(saved))
    model = keras.saving.load_model(run_dir / "retrain" / "model.keras")
    tokens = np.array([[1, 2, 3, 4], [4, 3, 2, 1]], np.int32)
    out = loaded.signatures["serving_default"](tokens=tf.constant(tokens), hidden=tf.zeros((2, 8)))
    expected = tf.nn.log_softmax(model(tokens, tf.zeros((2, 8)))[0], axis=-1).numpy()
    np.testing.assert_allclose(out["log_probabilities"].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(np.exp(out["log_probabilities"].numpy()).sum(-1), 1.0, rtol=1e-5)
    # A convolutional genotype cannot be retrained here; the run directory stays as it was.
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    wrong = run_cli("main", "retrain", str(run_dir), "--derived", "DARTS_V2", "--overwrite")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "DARTS_V2: $.kind: a derived spec of kind 'conv_cell' cannot be retrained by a 'recurrent_cell' spec" in (
        wrong.stderr + wrong.stdout)
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    shown = run_cli("main", "validate", str(spec_path))
    assert "recurrent cell: 3 nodes, k: 1, highway true, output mean" in shown.stdout


@pytest.mark.skipif(not __import__("shutil").which("bible"), reason="Debian's bible-kjv is not installed")
def test_king_james_bible_is_a_licence_safe_corpus():
    spec = kd.load_spec({"version": 1, "name": "kjv", "search_space": {"kind": "recurrent_cell"},
                         "data": {"source": "bible_kjv", "max_vocabulary": 10000}})
    data = load_text_data(spec)
    total = len(data.train) + len(data.valid) + len(data.test)
    assert 800_000 < total < 860_000  # about 790k words plus one <eos> per verse (31,102 verses)
    assert 0.08 < (len(data.valid) + len(data.test)) / total < 0.12  # 2 verses in 20
    assert data.vocabulary_size == 10_000 and data.vocabulary[-1] == UNK
    words = [data.vocabulary[i] for i in data.train[:6]]
    assert words == ["in", "the", "beginning", "god", "created", "the"]


def test_averaged_sgd_switches_when_validation_stalls_and_averages_the_iterates():
    from keras_darts.runtime.language_retraining import IterateAverage, validation_stalled

    assert not validation_stalled([5.0, 4.0, 3.0], 3.5, 2)  # better than min([5.0])
    assert validation_stalled([5.0, 4.0, 3.0], 5.5, 2)  # worse than min([5.0]) = 5.0
    assert not validation_stalled([5.0, 4.0, 3.0], 4.5, 2)
    assert not validation_stalled([5.0, 4.0], 9.0, 2)  # needs more than nonmono epochs
    variable = tf.Variable([0.0, 0.0])
    average = IterateAverage([variable])
    for value in ([1.0, 2.0], [3.0, 4.0], [8.0, 0.0]):
        variable.assign(value)
        average.update()
    average.swap()
    np.testing.assert_allclose(variable.numpy(), [4.0, 2.0])  # the mean of the three iterates
    average.swap()
    np.testing.assert_allclose(variable.numpy(), [8.0, 0.0])  # swapping back restores the last iterate


def test_a_language_model_retraining_killed_with_sigkill_resumes_and_ends_as_an_uninterrupted_one(tmp_path):
    corpus = write_cyclic_corpus(tmp_path / "corpus", lines=(1500, 100, 30))
    document = tiny_recurrent_document(corpus)
    document["search"].update(epochs=1, order="first", steps_per_epoch=3, deterministic=True,
                              diagnostics={"hessian_eigenvalue": False})
    # At this rate validation stalls after epoch 5 (measured), and averaging takes over from there.
    document["retrain"].update(epochs=8, nonmono=1, learning_rate=2.0)
    document["export"] = {"enabled": False}
    spec_path = tmp_path / "rnn.yaml"
    spec_path.write_text(json.dumps(document), encoding="utf-8")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    code = "from keras_darts.runtime.cli import compile_and_search_main; raise SystemExit(compile_and_search_main())"

    def start(run_dir):
        return subprocess.Popen([sys.executable, "-c", code, str(spec_path), "--run-dir", str(run_dir),
                                 "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    straight = start(tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()
    killed_dir = tmp_path / "killed"
    process = start(killed_dir)
    latest = killed_dir / "retrain" / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 600
    def averaging_checkpoint():
        """The latest checkpoint once it holds the averaged weights (after the switch), else None."""
        if not latest.exists():
            return None
        folder = latest.parent / json.loads(latest.read_text())["checkpoint"]
        with np.load(folder / "arrays.npz") as arrays:
            return folder if "average_count" in arrays.files else None

    while time.monotonic() < deadline and process.poll() is None and averaging_checkpoint() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL  # killed during the retraining, not finished
    assert not (killed_dir / "retrain" / "metrics.json").exists()
    assert json.loads((averaging_checkpoint() / "state.json").read_text())["epoch"] < 8
    resumed = start(killed_dir)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert "resuming the retraining of tiny-rnn from its checkpoint" in resumed.stderr.read()
    finished = json.loads((tmp_path / "straight" / "retrain" / "metrics.json").read_text())
    again = json.loads((killed_dir / "retrain" / "metrics.json").read_text())
    assert again == finished and finished["switched_to_averaging_after_epoch"] is not None
    history = json.loads((killed_dir / "retrain" / "history.json").read_text())
    expected = json.loads((tmp_path / "straight" / "retrain" / "history.json").read_text())
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in history] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in expected]
