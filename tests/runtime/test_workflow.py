"""A real search on built-in data, retraining, SavedModel export, and the CLI around them."""

import json
import os

import numpy as np
import pytest
import yaml

import keras_darts as kd
from keras_darts.runtime.cli import compile_and_search_main, main
from keras_darts.runtime.determinism import auto_kernel_threads, cores
from keras_darts.spec import dump_yaml
from tests.conftest import tiny_spec_document


# The tests of one run share a worker (pytest-xdist ``--dist loadgroup``): each worker would otherwise
# search, retrain and export a run of its own.
shares_the_run = pytest.mark.xdist_group("finished_run")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One complete compile-and-search run of the tiny spec on scikit-learn's digits, exported in every format."""
    folder = tmp_path_factory.mktemp("run")
    spec_path = folder / "tiny.yaml"
    document = tiny_spec_document()
    document["export"] = {"formats": ["saved_model", "tflite", "tflite_dynamic", "tflite_int8", "onnx"],
                          "latency_runs": 5}
    spec_path.write_text(dump_yaml(document))
    run_dir = folder / "out"
    code = compile_and_search_main([str(spec_path), "--run-dir", str(run_dir), "--no-progress"])
    return code, spec_path, run_dir


@shares_the_run
def test_compile_and_search_leaves_every_artifact(finished_run):
    code, _, run_dir = finished_run
    assert code == 0
    for item in ("spec.yaml", "data.json", "derived.yaml", "search/history.json", "search/history.csv",
                 "search/alphas.npz", "search/derived/epoch_001.yaml", "search/derived/epoch_002.yaml",
                 "retrain/model.keras", "retrain/metrics.json", "export/saved_model/saved_model.pb",
                 "export/model.tflite", "export/model_dynamic.tflite", "export/model_int8.tflite",
                 "export/model.onnx", "export/report.json"):
        assert (run_dir / item).exists(), item
    # The pictures.
    for name in ("cell_normal", "cell_reduce", "alphas_normal", "alphas_reduce", "alpha_evolution_normal",
                 "alpha_evolution_reduce", "diagnostics"):
        for suffix in (".png", ".svg"):
            assert (run_dir / "plots" / (name + suffix)).stat().st_size > 0, name + suffix


@shares_the_run
def test_search_lowers_validation_loss_and_writes_a_valid_derived_spec(finished_run):
    _, _, run_dir = finished_run
    history = json.loads((run_dir / "search" / "history.json").read_text())
    assert len(history) == 2
    assert history[1]["val_loss"] < history[0]["val_loss"]
    derived = kd.load_derived(str(run_dir / "derived.yaml"))  # validates against the schema
    document = yaml.safe_load((run_dir / "derived.yaml").read_text())
    assert document["origin"]["epoch"] == 2
    assert document["origin"]["spec_name"] == "tiny"
    final = np.load(run_dir / "search" / "alphas.npz")
    np.testing.assert_allclose(np.asarray(document["origin"]["alphas"]["normal"]), final["normal"], rtol=1e-6)
    # history.json keeps the alpha softmaxes at full precision (not rounded).
    for cell_type in ("normal", "reduce"):
        logits = final[cell_type] - final[cell_type].max(axis=-1, keepdims=True)
        expected = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
        np.testing.assert_allclose(history[-1]["alpha_softmax"][cell_type], expected, rtol=1e-6, atol=0)
    # The derived cell is the derivation rule applied to the final alphas.
    rederived = kd.derive_genotype({t: final[t] for t in ("normal", "reduce")}, derived.operations, 2, 2)
    assert rederived == dict(derived.cells)


@shares_the_run
def test_retrained_model_is_well_above_chance_and_exported_model_agrees(finished_run):
    _, _, run_dir = finished_run
    metrics = json.loads((run_dir / "retrain" / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.2  # ten classes: chance is 0.1
    import keras

    from keras_darts.runtime.export import verify_saved_model

    model = keras.saving.load_model(str(run_dir / "retrain" / "model.keras"))
    info = json.loads((run_dir / "data.json").read_text())
    images = np.random.default_rng(0).uniform(0, 1, (5, 8, 8, 1)).astype("float32")
    network = model.get_layer("derived_network")
    difference = verify_saved_model(str(run_dir / "export" / "saved_model"), network, images,
                                    np.asarray(info["mean"], "float32"), np.asarray(info["std"], "float32"))
    assert difference < 1e-5


@shares_the_run
def test_saved_keras_model_takes_the_savedmodels_input_and_returns_its_logits(finished_run):
    # The README's contract: model.keras takes images in [0, 1] as the SavedModel
    # does (the normalisation is inside it) and returns logits, whose softmax is
    # the SavedModel's probabilities.
    import keras
    import tensorflow as tf

    _, _, run_dir = finished_run
    model = keras.saving.load_model(str(run_dir / "retrain" / "model.keras"))
    served = tf.saved_model.load(str(run_dir / "export" / "saved_model")).signatures["serving_default"]
    images = np.random.default_rng(1).uniform(0, 1, (6, 8, 8, 1)).astype("float32")
    probabilities = served(images=tf.constant(images))["probabilities"].numpy()
    logits = model.predict(images, verbose=0)
    assert logits.shape == (6, 10)
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), probabilities, atol=1e-6)
    # The network inside takes images normalised with data.json's statistics.
    info = json.loads((run_dir / "data.json").read_text())
    normalised = (images - np.asarray(info["mean"], "float32")) / np.asarray(info["std"], "float32")
    np.testing.assert_allclose(model.get_layer("derived_network")(normalised, training=False).numpy(), logits,
                               atol=1e-5)


def _tflite_outputs(path, images):
    """Run a TFLite file on ``images`` one at a time, (de)quantising as its input and output say."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path))
    run = interpreter.get_signature_runner("serving_default")
    into, out = run.get_input_details()["images"], run.get_output_details()["probabilities"]
    results = []
    for image in images:
        x = image[None]
        if into["dtype"] == np.int8:
            scale, zero = into["quantization"]
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
        y = run(images=x)["probabilities"]
        if out["dtype"] == np.int8:
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        results.append(y[0])
    return into["dtype"], np.array(results)


@shares_the_run
def test_tflite_and_onnx_files_run_in_this_process_agree_with_the_keras_model_and_the_report(finished_run):
    import keras

    from keras_darts.runtime.data import load_image_data

    _, spec_path, run_dir = finished_run
    report = json.loads((run_dir / "export" / "report.json").read_text())
    model = keras.saving.load_model(str(run_dir / "retrain" / "model.keras"))  # normalisation inside
    data = load_image_data(kd.load_spec(str(spec_path)))
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(model(data.x_test)))
    keras_accuracy = float(np.mean(expected.argmax(-1) == data.y_test))
    assert report["keras"] == {"metric": "accuracy", "value": keras_accuracy}
    assert report["test_examples"] == len(data.y_test) == 360
    for form, file, dtype in (("tflite", "model.tflite", np.float32), ("tflite_int8", "model_int8.tflite", np.int8)):
        entry = report["formats"][form]
        assert entry["path"] == str(run_dir / "export" / file)
        assert entry["bytes"] == (run_dir / "export" / file).stat().st_size
        input_dtype, probabilities = _tflite_outputs(run_dir / "export" / file, data.x_test)
        assert input_dtype == dtype
        accuracy = float(np.mean(probabilities.argmax(-1) == data.y_test))
        assert entry["value"] == pytest.approx(accuracy, abs=1e-12)
        assert entry["change"] == pytest.approx(accuracy - keras_accuracy, abs=1e-12)
        assert entry["latency_ms"] > 0
        if form == "tflite":
            np.testing.assert_allclose(probabilities, expected, atol=1e-4)
        else:  # integers throughout: close to Keras, not equal to it
            assert 1e-4 < np.max(np.abs(probabilities - expected)) < 0.25
            assert abs(accuracy - keras_accuracy) < 0.05
    import onnxruntime

    session = onnxruntime.InferenceSession(str(run_dir / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_probabilities = session.run(["probabilities"], {"images": data.x_test})[0]
    np.testing.assert_allclose(onnx_probabilities, expected, atol=1e-4)
    accuracy = float(np.mean(onnx_probabilities.argmax(-1) == data.y_test))
    assert report["formats"]["onnx"]["value"] == pytest.approx(accuracy, abs=1e-12)
    network = report["network"]
    assert network["parameters"] == json.loads((run_dir / "retrain" / "metrics.json").read_text())["parameters"]
    assert network["multiply_adds"] > network["parameters"]


@shares_the_run
def test_export_command_in_a_fresh_process_writes_the_formats_asked_for(finished_run):
    import shutil
    import subprocess
    import sys

    _, _, run_dir = finished_run
    shutil.rmtree(run_dir / "export")
    done = subprocess.run([sys.executable, "-m", "keras_darts.runtime.cli", "export", str(run_dir),
                           "--format", "saved_model", "--format", "tflite_dynamic"],
                          capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    parameters = json.loads((run_dir / "retrain" / "metrics.json").read_text())["parameters"]
    assert lines[0].startswith(f"network: {parameters:,} parameters, ")
    assert lines[2].startswith(f"saved_model: {run_dir / 'export' / 'saved_model'} (")
    assert lines[3].startswith(f"tflite_dynamic: {run_dir / 'export' / 'model_dynamic.tflite'} (")
    assert lines[-1] == f"export report: {run_dir / 'export' / 'report.json'}"
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["model_dynamic.tflite", "report.json",
                                                                       "saved_model"]
    report = json.loads((run_dir / "export" / "report.json").read_text())
    assert list(report["formats"]) == ["saved_model", "tflite_dynamic"]
    # Another format later is added to the report beside the earlier ones.
    assert main(["export", str(run_dir), "--format", "tflite"]) == 0
    report = json.loads((run_dir / "export" / "report.json").read_text())
    assert list(report["formats"]) == ["saved_model", "tflite_dynamic", "tflite"]


def test_export_of_a_directory_that_is_not_a_run_exits_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: spec.yaml: missing: not a keras-darts run directory\n"


@shares_the_run
def test_running_again_resumes_and_repeats_nothing_finished(finished_run, capsys, caplog):
    _, spec_path, run_dir = finished_run
    kept = ["retrain/metrics.json", "retrain/model.keras", "search/history.json", "search/alphas.npz",
            "export/saved_model/saved_model.pb"]
    before = {item: ((run_dir / item).stat().st_mtime_ns, (run_dir / item).read_bytes()) for item in kept}
    caplog.set_level("INFO")
    code = compile_and_search_main([str(spec_path), "--run-dir", str(run_dir), "--no-progress"])
    assert code == 0
    # Every stage is recognised as finished from the run directory alone: no
    # data, no supernet, no checkpoint, no estimate; the numbers are printed once.
    messages = [record.getMessage() for record in caplog.records]
    inter, intra = auto_kernel_threads()  # the threads this test process runs with (tests/conftest.py)
    threads = [f"threads: {inter} kernel{'s' if inter > 1 else ''} at once, 1 thread each (distribute.threads; "
               f"{cores()} CPU cores)"] if (inter, intra) != (0, 0) else []
    assert messages == [*threads, f"{run_dir} holds this spec's run: resuming it (--overwrite starts over)",
                        "the search finished in an earlier run (2 epochs); derived.yaml holds its result",
                        "the retraining finished in an earlier run"]
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    metrics = json.loads((run_dir / "retrain" / "metrics.json").read_text())
    assert captured.out.count("retrain: ") == 1
    assert f"retrain: {metrics['parameters']} parameters, test accuracy {metrics['test_accuracy']:.4f}" in captured.out
    for item in kept:
        if item.endswith((".json", ".keras", ".pb")) and item != "search/alphas.npz":
            assert before[item] == ((run_dir / item).stat().st_mtime_ns, (run_dir / item).read_bytes()), item
    assert (run_dir / "search" / "alphas.npz").read_bytes() == before["search/alphas.npz"][1]


@shares_the_run
def test_retrain_a_published_cell_on_the_runs_data(finished_run, capsys):
    _, _, run_dir = finished_run
    assert main(["retrain", str(run_dir), "--derived", "DARTS_V2", "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: {run_dir}: retrain/: exists already; pass --overwrite to replace it\n"
    assert main(["retrain", str(run_dir), "--derived", "DARTS_V2", "--overwrite", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "retrain: " in out and f"saved_model: {run_dir / 'export' / 'saved_model'} (" in out
    import keras

    model = keras.saving.load_model(str(run_dir / "retrain" / "model.keras")).get_layer("derived_network")
    network = model.derived.network
    # The published cells, in the network the run's spec retrains: 8x8x1 digits, C=4, 3 cells.
    assert (list(network.input_shape), network.num_classes, network.init_channels, network.layers) == (
        [8, 8, 1], 10, 4, 3)
    assert model.derived.cells == kd.load_derived("DARTS_V2").cells


def test_bad_spec_exits_2_with_one_line_per_problem(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text("version: 1\nname: bad\nsearch_space: {kind: conv_cell, k: 0, operations: [sep_conv_3x4]}\n")
    run_dir = tmp_path / "run"
    code = compile_and_search_main([str(spec), "--run-dir", str(run_dir)])
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: {spec}: $.search_space.operations[0]: unknown operation 'sep_conv_3x4'; known operations: none, "
        "max_pool_3x3, avg_pool_3x3, skip_connect, sep_conv_3x3, sep_conv_5x5, dil_conv_3x3, dil_conv_5x5 "
        "(did you mean 'sep_conv_3x3'?)\n"
        f"{spec}: $.search_space.k: expected k >= 1, got 0\n"
    )
    assert not run_dir.exists()


def test_data_that_does_not_fit_the_spec_exits_2(tmp_path, capsys):
    document = tiny_spec_document(network={"init_channels": 4, "layers": 3, "input_shape": [16, 16, 1],
                                           "num_classes": 10})
    spec = tmp_path / "mismatch.yaml"
    spec.write_text(dump_yaml(document))
    code = compile_and_search_main([str(spec), "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: {spec}: $.search_space.network.input_shape: [16, 16, 1], but digits images are [8, 8, 1]; "
        "set input_shape to [8, 8, 1]\n"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("data, field, message", [
    ({"source": "npz", "path": "nowhere.npz"}, "$.data.path",
     "nowhere.npz is not a file; expected an .npz with x_train, y_train, x_test, y_test"),
    ({"source": "image_folder", "path": "nowhere"}, "$.data.path",
     "expected a folder nowhere/train with one sub-folder of images per class"),
    ({"source": "fashion_mnist", "path": "."}, "$.data.path",
     "fashion_mnist: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
     "t10k-labels-idx1-ubyte.gz not found in .. Install them with 'apt-get install dataset-fashion-mnist' (Debian), "
     "point data.path at a folder holding the four IDX files, or use data.source: fashion_mnist_subset "
     "(shipped with keras-darts)."),
    ({"source": "tfds", "name": "no_such_dataset"}, "$.data.name",
     "tensorflow-datasets has no dataset named 'no_such_dataset'"),
])
def test_validate_finds_missing_data_without_reading_it(tmp_path, capsys, monkeypatch, data, field, message):
    monkeypatch.chdir(tmp_path)
    document = tiny_spec_document()
    document["data"] = {**document["data"], **data}
    spec = tmp_path / "data.yaml"
    spec.write_text(dump_yaml(document))
    assert main(["validate", str(spec)]) == 2
    assert capsys.readouterr().err == f"error: {spec}: {field}: {message}\n"


def test_compile_and_search_reports_a_missing_data_path_before_tensorflow_loads(tmp_path):
    import subprocess
    import sys

    document = tiny_spec_document()
    document["data"] = {**document["data"], "source": "npz", "path": str(tmp_path / "gone.npz")}
    spec = tmp_path / "gone.yaml"
    spec.write_text(dump_yaml(document))
    script = ("import sys\nfrom keras_darts.runtime.cli import compile_and_search_main\n"
              "code = compile_and_search_main(sys.argv[1:])\nprint(code, 'tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, str(spec), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert done.stdout == "2 False\n"
    assert done.stderr == (f"error: {spec}: $.data.path: {tmp_path / 'gone.npz'} is not a file; expected an .npz "
                           "with x_train, y_train, x_test, y_test\n")
    assert not (tmp_path / "run").exists()


def test_validate_and_show(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(dump_yaml(tiny_spec_document()))
    assert main(["validate", str(spec), "--set", "search.epochs=4"]) == 0
    out = capsys.readouterr().out
    assert f"{spec}: valid" in out and "search: 4 epochs, second order" in out
    assert main(["show", "DARTS_V2"]) == 0
    out = capsys.readouterr().out
    assert "node 5: skip_connect <- 0, dil_conv_3x3 <- 2" in out
    assert "parameters: 3349342 (auxiliary head excluded)" in out
    assert main(["validate", str(spec), "--set", "search.order=third"]) == 2
    assert capsys.readouterr().err == f"error: {spec}: $.search.order: expected one of 'first', 'second'; got 'third'\n"
    # A method on PC-DARTS' supernet, followed by DARTS-PT's selection, is said so.
    assert main(["validate", str(spec), "--set", "search.method=sdarts", "--set", "search.order=first",
                 "--set", "search.pc_darts.partial_channels=2", "--set", "search.darts_pt.tune_epochs=1"]) == 0
    assert ("search: 2 epochs, first order, method sdarts on PC-DARTS' supernet (K = 2), then DARTS-PT's "
            "selection; data: digits") in capsys.readouterr().out


def test_an_unexpected_failure_exits_1_with_one_line_and_an_interrupt_exits_130(tmp_path, capsys, monkeypatch):
    from keras_darts.runtime import cli

    spec = tmp_path / "spec.yaml"
    spec.write_text(dump_yaml(tiny_spec_document()))

    def fail(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("keras_darts.runtime.workflow.run_compile_and_search", fail)
    assert cli.compile_and_search_main([str(spec), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.endswith("error: RuntimeError: disk on fire\n(set KERAS_DARTS_DEBUG=1 for the traceback)\n")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("keras_darts.runtime.workflow.run_compile_and_search", interrupt)
    assert cli.compile_and_search_main([str(spec), "--run-dir", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err.endswith(
        "interrupted; run the same command again to resume from the last checkpoint\n")


def test_an_export_that_fails_verification_exits_1_naming_the_saved_model(tmp_path, capsys, monkeypatch):
    from keras_darts.runtime import cli
    from keras_darts.spec import ExportVerificationError

    def disagree(*args, **kwargs):
        raise ExportVerificationError.single(str(tmp_path / "saved_model"), "saved_model.pb",
                                             "differs from the Keras model by 0.5 (expected at most 1e-05)")

    monkeypatch.setattr("keras_darts.runtime.workflow.export_run", disagree)
    assert cli.main(["export", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'saved_model'}: saved_model.pb: differs from the Keras "
                                       "model by 0.5 (expected at most 1e-05)\n")


def test_tensorflows_start_up_notices_stay_out_of_the_terminal_unless_debugging(tmp_path):
    import subprocess
    import sys

    from keras_darts.spec import derived_with_network

    # DARTS_V2's cells in a network small enough to build in a moment (its CIFAR size is shown in-process above).
    small = derived_with_network(kd.load_derived("DARTS_V2"), init_channels=4, layers=3, input_shape=(8, 8, 1),
                                 auxiliary=False)
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(small.to_document()), encoding="utf-8")
    command = [sys.executable, "-m", "keras_darts.runtime.cli", "show", str(path)]
    environment = {k: v for k, v in os.environ.items() if k not in ("KERAS_DARTS_DEBUG", "TF_CPP_MIN_LOG_LEVEL")}
    quiet = subprocess.run(command, capture_output=True, text=True, env=environment)
    assert quiet.returncode == 0 and quiet.stderr == ""
    parameters = kd.count_parameters(kd.build_network(small))
    assert f"parameters: {parameters} (auxiliary head excluded)" in quiet.stdout
    # The notices are there to hide: with KERAS_DARTS_DEBUG=1 the CLI's start lets them reach the terminal.
    start = [sys.executable, "-c", "from keras_darts.runtime.cli import _tensorflow; _tensorflow()"]
    loud = subprocess.run(start, capture_output=True, text=True, env={**environment, "KERAS_DARTS_DEBUG": "1"})
    assert loud.returncode == 0 and "All log messages before absl::InitializeLog() is called" in loud.stderr


START_WITHOUT_KERAS_EXTRAS = """
import json, sys
from keras_darts.runtime.cli import _tensorflow
_tensorflow()
loaded = sorted(name for name in ("sklearn", "matplotlib") if name in sys.modules)
import keras
from keras.src.wrappers import sklearn_wrapper
from sklearn.datasets import load_digits
from matplotlib.figure import Figure
print(json.dumps({"loaded": loaded, "keras_wrappers_see_sklearn": sklearn_wrapper.sklearn is not None,
                  "digits": load_digits().images.shape, "figure": type(Figure()).__name__}))
"""


def test_the_clis_tensorflow_start_keeps_scikit_learn_and_pyplot_out_of_keras_and_importable_after_it():
    import subprocess
    import sys

    # Without KERAS_DARTS_DEBUG from the calling shell: it would let the start-up notices through.
    environment = {k: v for k, v in os.environ.items() if k != "KERAS_DARTS_DEBUG"}
    done = subprocess.run([sys.executable, "-c", START_WITHOUT_KERAS_EXTRAS], capture_output=True, text=True,
                          env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""
    assert json.loads(done.stdout) == {"loaded": [], "keras_wrappers_see_sklearn": False,
                                       "digits": [1797, 8, 8], "figure": "Figure"}


def test_filtering_descriptor_2_keeps_every_line_that_is_not_a_start_up_notice(capfd):
    from keras_darts.runtime.startup import descriptor_2_filtered

    with descriptor_2_filtered():
        os.write(2, b"I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on. You may see\n")
        os.write(2, b"W0000 00:00:1.0 1 some_kernel.cc:10] a real warning\n")
        os.write(2, b"E0000 00:00:1.0 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n")
    assert capfd.readouterr().err == "W0000 00:00:1.0 1 some_kernel.cc:10] a real warning\n"
