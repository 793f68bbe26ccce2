"""Searches a user can trust: atomic checkpoints, resume after SIGKILL, divergence, diagnostics, pictures."""

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
from keras_darts.runtime.bilevel import dominant_ritz_value
from keras_darts.runtime.checkpoint import SearchCheckpoints
from keras_darts.runtime.cli import compile_and_search_main, main
from keras_darts.runtime.search_loop import build_search
from keras_darts.runtime.workflow import search
from keras_darts.spec import DivergenceError
from keras_darts.runtime.workflow import load_data, retrain_run
from keras_darts.spec import dump_yaml
from tests.conftest import tiny_spec_document


def tiny(search=None, **space):
    document = tiny_spec_document(**space)
    document["search"].update({"steps_per_epoch": 4, "diagnostics": {"hessian_iterations": 2}, **(search or {})})
    document["retrain"]["enabled"] = False
    return document


# -- checkpoints --------------------------------------------------------------------
def test_a_crash_while_writing_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    bilevel = build_search(kd.load_spec(tiny()))
    folder = tmp_path / "checkpoints"
    checkpoints = SearchCheckpoints(str(folder), bilevel.model, bilevel.weights_optimizer, bilevel.arch_optimizer)
    saved = [v.numpy().copy() for v in bilevel.model.variables]
    checkpoints.save({"iteration": 3, "epoch": 0}, {"hidden": np.ones(2)})
    for variable in bilevel.model.variables:
        variable.assign(tf.zeros_like(variable) + 7.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)  # the crash comes after the variables are written
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save({"iteration": 5, "epoch": 0})
    monkeypatch.undo()
    assert checkpoints.latest() == "iteration_000000003"
    assert any(name.startswith(".tmp-") for name in os.listdir(folder))
    reopened = SearchCheckpoints(str(folder), bilevel.model, bilevel.weights_optimizer, bilevel.arch_optimizer)
    assert not any(name.startswith(".tmp-") for name in os.listdir(folder))
    state, arrays = reopened.restore()
    assert state == {"iteration": 3, "epoch": 0} and arrays["hidden"].tolist() == [1.0, 1.0]
    for variable, value in zip(bilevel.model.variables, saved):
        np.testing.assert_array_equal(variable.numpy(), value)


def test_an_interrupted_retraining_resumes_after_its_last_epoch_and_ends_as_an_uninterrupted_one(tmp_path):
    document = tiny_spec_document()
    document["retrain"]["epochs"] = 2  # drop path 0.1: epoch 2 draws masks from the restored generator
    spec = kd.load_spec(document)
    data = load_data(spec)
    derived = kd.load_derived("DARTS_V2")
    whole = retrain_run(spec, derived, data, str(tmp_path / "whole"))
    run_dir = tmp_path / "cut"
    cut = retrain_run(spec, derived, data, str(run_dir))
    # As if killed during epoch 2: the newest checkpoint is the one after epoch 1.
    folder = run_dir / "retrain" / "checkpoints"
    names = sorted(n for n in os.listdir(folder) if n.startswith("iteration_"))
    assert len(names) == 2
    (folder / "latest.json").write_text(json.dumps({"checkpoint": names[0]}))
    resumed = retrain_run(spec, derived, data, str(run_dir))
    assert resumed.history[0] == cut.history[0]  # restored, not repeated (its time is the first run's)
    assert resumed.history[0]["train_loss"] == whole.history[0]["train_loss"]
    assert resumed.history[1]["train_loss"] == whole.history[1]["train_loss"]
    assert resumed.history[1]["drop_path_prob"] == pytest.approx(0.05)
    assert resumed.test_loss == whole.test_loss
    for mine, theirs in zip(resumed.model.variables, whole.model.variables):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))


def run_search_process(spec_path, run_dir, float64=False):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    code = "from keras_darts.runtime.cli import compile_and_search_main; raise SystemExit(compile_and_search_main())"
    if float64:
        code = "import keras; keras.config.set_floatx('float64'); keras.config.set_dtype_policy('float64')\n" + code
    return subprocess.Popen([sys.executable, "-c", code, str(spec_path), "--run-dir", str(run_dir), "--search-only",
                             "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_and_resume(spec_path, tmp_path, steps, float64=False):
    """Run to the end; run again and kill -9 once a checkpoint after 2 iterations exists; resume. Both folders."""
    straight = run_search_process(spec_path, tmp_path / "straight", float64)
    assert straight.wait(timeout=600) == 0, straight.stderr.read()

    killed_dir = tmp_path / "killed"
    process = run_search_process(spec_path, killed_dir, float64)
    latest = killed_dir / "search" / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["checkpoint"] >= "iteration_000000002":
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL  # killed, not finished
    assert not (killed_dir / "derived.yaml").exists()
    state = json.loads((killed_dir / "search" / "checkpoints" / json.loads(latest.read_text())["checkpoint"]
                        / "state.json").read_text())
    assert 2 <= state["iteration"] < steps

    resumed = run_search_process(spec_path, killed_dir, float64)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    return tmp_path / "straight", killed_dir, resumed.stderr.read()


def test_a_search_killed_with_sigkill_resumes_to_the_same_result_with_augmentation_on(tmp_path):
    document = tiny({"epochs": 2, "steps_per_epoch": 8, "deterministic": True, "checkpoint_every_steps": 2})
    document["data"]["augment"] = {"random_crop": 2, "horizontal_flip": True}
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(dump_yaml(document))
    straight, killed, log = kill_and_resume(spec_path, tmp_path, 16)
    assert "resuming tiny from its checkpoint" in log
    with np.load(straight / "search" / "alphas.npz") as a, np.load(killed / "search" / "alphas.npz") as b:
        for key in ("normal", "reduce"):
            np.testing.assert_array_equal(a[key], b[key])
    assert (straight / "derived.yaml").read_text() == (killed / "derived.yaml").read_text()


def test_a_language_model_search_killed_with_sigkill_resumes_with_its_hidden_states(tmp_path):
    from tests.conftest import tiny_recurrent_document, write_cyclic_corpus

    document = tiny_recurrent_document(write_cyclic_corpus(tmp_path / "corpus"))
    document["search"].update({"epochs": 2, "steps_per_epoch": 6, "deterministic": True, "checkpoint_every_steps": 2,
                               "diagnostics": {"hessian_eigenvalue": False}})
    spec_path = tmp_path / "rnn.yaml"
    spec_path.write_text(dump_yaml(document))
    # In float64: a language-model step's last bits depend on the window lengths the process has run before
    # (not on anything a checkpoint could hold), and Adam magnifies float32's differences within an epoch.
    straight, killed, log = kill_and_resume(spec_path, tmp_path, 12, float64=True)
    assert "resuming tiny-rnn from its checkpoint" in log
    # A mid-epoch checkpoint carries the hidden states of both streams into the resumed epoch.
    with np.load(next((killed / "search" / "checkpoints").glob("iteration_*")) / "arrays.npz") as arrays:
        assert {"hidden", "hidden_alpha"} <= set(arrays.files)
    with np.load(straight / "search" / "alphas.npz") as a, np.load(killed / "search" / "alphas.npz") as b:
        np.testing.assert_allclose(b["recurrent"], a["recurrent"], rtol=1e-9, atol=1e-12)
        moved = np.abs(a["recurrent"]).max()
    assert moved > 1e-3  # alphas start at 1e-3 N(0, 1) and moved, so restarting the streams would show
    assert kd.load_derived(str(straight / "derived.yaml")).cells == kd.load_derived(str(killed / "derived.yaml")).cells


def test_a_run_directory_of_another_spec_is_refused_untouched(tmp_path, capsys):
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(dump_yaml(tiny()))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text(dump_yaml(tiny({"seed": 9})))
    code = compile_and_search_main([str(spec_path), "--run-dir", str(run_dir), "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: {run_dir}: --run-dir: holds a run of another spec (its spec.yaml differs from {spec_path}); "
        "pass --overwrite to start over, or choose another --run-dir\n"
    )
    assert sorted(os.listdir(run_dir)) == ["spec.yaml"]


# -- divergence -----------------------------------------------------------------------
def test_divergence_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    document = tiny({"weights_optimizer": {"learning_rate": 1e12, "learning_rate_min": 1e12},
                     "checkpoint_every_steps": 1})
    spec_path = tmp_path / "diverge.yaml"
    spec_path.write_text(dump_yaml(document))
    run_dir = tmp_path / "run"
    code = compile_and_search_main([str(spec_path), "--run-dir", str(run_dir), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("error: ")][0]
    assert message.startswith(f"error: {spec_path}: $.search.on_divergence: the search diverged at epoch 1, step ")
    assert " = nan" in message or " = inf" in message
    # The first step's values are finite (the weights move after them), so a
    # checkpoint follows it; none is written before any step.
    iteration = int(message.split("(iteration ")[1].split(")")[0])
    assert iteration >= 2
    checkpoints = run_dir / "search" / "checkpoints"
    last_good = f"iteration_{iteration - 1:09d}"
    assert message.endswith(f"the last good checkpoint is {checkpoints / last_good}")
    assert "iteration_000000000" not in os.listdir(checkpoints)
    # The kept checkpoint is the one before the bad step: finite and loadable.
    spec = kd.load_spec(str(spec_path))
    bilevel = build_search(spec)
    state, _ = SearchCheckpoints(str(checkpoints), bilevel.model, bilevel.weights_optimizer,
                                 bilevel.arch_optimizer).restore()
    assert state["iteration"] == iteration - 1
    assert all(np.all(np.isfinite(v.numpy())) for v in bilevel.model.variables)


def test_divergence_can_roll_back_and_lower_the_learning_rate(tmp_path):
    document = tiny({"epochs": 2, "on_divergence": "rollback", "divergence_lr_factor": 1e-13,
                     "weights_optimizer": {"learning_rate": 1e12, "learning_rate_min": 1e12}})
    result = search(kd.load_spec(document), run_dir=str(tmp_path / "run"))
    assert len(result.history) == 2
    assert result.history[0]["learning_rate"] == pytest.approx(0.1, rel=1e-6)
    assert all(np.isfinite(record["train_loss"]) for record in result.history)
    # Rolled back once to the start (held in memory: nothing was on disk yet), it stops.
    with pytest.raises(DivergenceError, match=r"no checkpoint yet: the same command starts it again \(after 1 rollbacks\)$"):
        search(kd.load_spec({**document, "search": {**document["search"], "max_rollbacks": 1,
                                                      "divergence_lr_factor": 0.5}}),
               run_dir=str(tmp_path / "again"))


# -- collapse diagnostics and early stopping ----------------------------------------------
def test_hessian_eigenvalue_is_the_dominant_eigenvalue_of_the_full_alpha_hessian(float64):
    spec = kd.load_spec(tiny_spec_document(operations=["none", "avg_pool_3x3", "skip_connect", "sep_conv_3x3"]))
    keras.utils.set_random_seed(0)
    bilevel = build_search(spec)
    for alpha in bilevel.arch_vars:
        alpha.assign(np.random.default_rng(1).normal(0, 0.5, size=alpha.shape))
    rng = np.random.default_rng(0)
    batch = (tf.constant(rng.normal(size=(6, 8, 8, 1))), tf.constant(rng.integers(0, 10, 6), tf.int32))
    estimate = bilevel.alpha_hessian_eigenvalue(batch, iterations=60, radius=1e-4)

    # The full Hessian, column by column, by central differences of the alpha gradient.
    shapes = [a.shape for a in bilevel.arch_vars]
    flat = np.concatenate([a.numpy().ravel() for a in bilevel.arch_vars])

    def gradient(values):
        parts, start = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            parts.append(tf.constant(values[start:start + size].reshape(shape)))
            start += size
        grads = bilevel.alpha_gradients_at(bilevel.current_weights(), parts, batch)[2]
        return np.concatenate([g.numpy().ravel() for g in grads])

    h = 1e-5
    columns = []
    for i in range(flat.size):
        step = np.zeros_like(flat)
        step[i] = h
        columns.append((gradient(flat + step) - gradient(flat - step)) / (2 * h))
    hessian = np.array(columns)
    eigenvalues = np.linalg.eigvalsh((hessian + hessian.T) / 2)
    dominant = eigenvalues[np.argmax(np.abs(eigenvalues))]
    assert estimate == pytest.approx(dominant, rel=0.02)


def _counted(matrix):
    calls = []

    def product(vector):
        calls.append(vector)
        return matrix @ vector

    return product, calls


def _symmetric_with_spectrum(values, seed):
    basis, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(values), len(values))))
    return basis @ np.diag(values) @ basis.T, basis


def test_ritz_value_from_as_many_products_as_dimensions_is_the_dominant_eigenvalue_with_its_sign():
    values = np.concatenate([[-3.0], np.linspace(-2.5, 2.9, 29)])  # the dominant one is negative
    matrix, _ = _symmetric_with_spectrum(values, 0)
    product, calls = _counted(matrix)
    estimate = dominant_ritz_value(product, np.random.default_rng(1).normal(size=30), steps=100)
    assert estimate == pytest.approx(-3.0, abs=1e-9)
    assert len(calls) == 30  # never more products than dimensions


def test_ritz_value_after_eight_products_is_nearer_the_dominant_eigenvalue_than_power_iteration_after_eight():
    # Eigenvalues of both signs, nearly equal in magnitude: power iteration's pace is |4.8 / 5|.
    values = np.concatenate([[5.0, -4.8], np.random.default_rng(2).uniform(-4, 4, 58)])
    matrix, _ = _symmetric_with_spectrum(values, 3)
    start = np.random.default_rng(4).normal(size=60)
    product, calls = _counted(matrix)
    lanczos = dominant_ritz_value(product, start, steps=8)
    vector = start
    for _ in range(8):  # power iteration, as the diagnostic computed it before: v . Hv of the last iterate
        vector = vector / np.linalg.norm(vector)
        image = matrix @ vector
        power = vector @ image
        vector = image
    assert len(calls) == 8
    assert abs(lanczos) <= 5.0 + 1e-9  # a Ritz value lies within the spectrum
    assert abs(lanczos - 5.0) < 0.5 * abs(power - 5.0)


def test_ritz_value_stops_on_an_invariant_subspace_and_is_real_for_an_unsymmetric_product():
    matrix, basis = _symmetric_with_spectrum(np.arange(1.0, 11.0), 5)
    product, calls = _counted(matrix)
    assert dominant_ritz_value(product, 3 * basis[:, 4], steps=8) == pytest.approx(5.0, abs=1e-12)
    assert len(calls) == 1  # the start is an eigenvector: its product adds no direction
    assert dominant_ritz_value(product, np.zeros(10), steps=8) == 0.0
    noisy = matrix + 1e-3 * np.random.default_rng(6).normal(size=(10, 10))  # finite differences' asymmetry
    estimate = dominant_ritz_value(lambda v: noisy @ v, np.ones(10), steps=10)
    assert isinstance(estimate, float) and estimate == pytest.approx(10.0, abs=1e-2)


def test_early_stopping_on_skip_connections_records_the_rule(tmp_path):
    document = tiny({"epochs": 3, "early_stopping": {"max_skip_connections": 1}},
                    operations=["none", "skip_connect", "avg_pool_3x3"])
    document["search"]["diagnostics"] = {"hessian_eigenvalue": False}
    run_dir = tmp_path / "run"
    result = search(kd.load_spec(document), run_dir=str(run_dir))
    assert result.history[0]["parameter_free"] == 4  # every kept edge is a skip or a pool
    stopped = json.loads((run_dir / "search" / "stopped.json").read_text())
    assert stopped["epoch"] == len(result.history) and stopped["rule"].startswith("max_skip_connections: ")
    assert result.stopped_by == stopped["rule"]
    assert all(record["skip_connections"] <= 1 for record in result.history[:-1])
    assert result.history[-1]["skip_connections"] > 1


def test_eigenvalue_rule_compares_with_the_early_epochs():
    from keras_darts.runtime.search_loop import EarlyStopping

    rules = kd.load_spec(tiny({"early_stopping": {"eigenvalue_ratio": 1.5, "eigenvalue_reference_epochs": 2}}))
    stopping = EarlyStopping(rules.search.early_stopping)
    history = [{"hessian_eigenvalue": 1.0, "skip_connections": 0}, {"hessian_eigenvalue": 3.0, "skip_connections": 0}]
    assert stopping.rule({"epoch": 3, "hessian_eigenvalue": 2.9, "skip_connections": 0}, history) is None
    rule = stopping.rule({"epoch": 3, "hessian_eigenvalue": 3.1, "skip_connections": 0}, history)
    assert rule == ("eigenvalue_ratio: the alpha Hessian's dominant eigenvalue 3.1 exceeds 1.5 x its mean 2 over the "
                    "first 2 epochs (epoch 3)")
    assert stopping.rule({"epoch": 2, "hessian_eigenvalue": 9.0, "skip_connections": 0}, history[:1]) is None


# -- monitoring and pictures ------------------------------------------------------------
def test_tensorboard_history_and_pictures(tmp_path, capsys):
    run_dir = tmp_path / "run"
    result = search(kd.load_spec(tiny({"epochs": 2})), run_dir=str(run_dir))
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert {"skip_connections", "parameter_free", "hessian_eigenvalue", "arch_grad_norm"} <= set(result.history[0])
    tags = set()
    for path in (run_dir / "tensorboard").iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(value.tag for value in event.summary.value)
    assert {"epoch/val_loss", "epoch/hessian_eigenvalue", "step/train_loss", "alphas/normal", "alphas/reduce",
            "genotype"} <= tags
    assert main(["plot", str(run_dir)]) == 0
    assert capsys.readouterr().out == f"pictures: {run_dir / 'plots'}\n"
    for name in ("cell_normal", "cell_reduce", "alphas_normal", "alphas_reduce", "alpha_evolution_normal",
                 "alpha_evolution_reduce", "diagnostics"):
        assert (run_dir / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (run_dir / "plots" / f"{name}.svg").read_bytes()[:2000]
    assert main(["plot", str(tmp_path / "nowhere")]) == 2


# -- the resource estimate -----------------------------------------------------------------
def test_estimate_counts_parameters_and_activations_that_grow_with_the_batch(capsys):
    from keras_darts.runtime.footprint import static_estimate
    from keras_darts.runtime.kinds import kind_of

    spec = kd.load_spec(tiny())
    bilevel = build_search(spec)
    counts = static_estimate(spec, bilevel, kind_of(spec))
    # By hand: stem conv 3x3 1->8 and its BN (72 + 16); per cell the preprocessing (1x1 convs, a factorized
    # reduce 8->8+8 in cell 2) and, per edge, sep_conv_3x3 = 2 (9C + C^2) plus, on the 4 reducing edges of
    # the two reduction cells, skip_connect as a factorized reduce (C^2); classifier 32*10 + 10.
    cells = [(8 * 4 + 8 * 4) + 5 * 2 * (9 * 4 + 4 * 4),
             (8 * 8 + 8 * 8) + 5 * 2 * (9 * 8 + 8 * 8) + 4 * 8 * 8,
             (2 * 8 * 8 + 16 * 16) + 5 * 2 * (9 * 16 + 16 * 16) + 4 * 16 * 16]
    assert counts["weights"] == 72 + 16 + sum(cells) + 32 * 10 + 10 == 8154
    assert counts["alphas"] == 2 * 5 * 5  # two cell types, 5 edges for 2 nodes, 5 ops
    double = kd.load_spec(tiny(), overrides=["data.batch_size=64"])
    ratio = (static_estimate(double, build_search(double), kind_of(double))["activation_bytes"]
             / counts["activation_bytes"])
    assert 1.9 < ratio <= 2.0  # activations scale with the batch; a few per-channel tensors do not


def test_estimate_command_measures_each_order(tmp_path, capsys):
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(dump_yaml(tiny()))
    assert main(["estimate", str(spec_path), "--steps", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"estimate for tiny ({spec_path}), measured on this machine:"
    assert out[1].startswith("  parameters: ") and " 50 architecture parameters" in out[1]
    assert out[2].startswith("  activations: ") and out[2].endswith(" per forward pass at batch 32")
    for line, order in zip(out[3:], ("first", "second")):
        assert line.startswith(f"  {order} order: ") and " s per iteration " in line and "peak memory" in line
