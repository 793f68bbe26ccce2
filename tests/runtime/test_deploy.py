"""What a derived network costs (multiply-adds from its graph) and the TFLite worker's failures and fallbacks."""

import signal
import sys

import numpy as np
import pytest
import tensorflow as tf

import keras_darts as kd
from keras_darts.compiler import build_language_model, build_network
from keras_darts.runtime import deploy, litert_worker
from keras_darts.spec import ExportVerificationError, derived_from_document

SMALL = {
    "version": 1, "kind": "conv_cell", "name": "small",
    "operations": ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3"],
    "cells": {
        "normal": {"nodes": [[{"op": "sep_conv_3x3", "input": 0}, {"op": "skip_connect", "input": 1}],
                             [{"op": "dil_conv_3x3", "input": 2}, {"op": "max_pool_3x3", "input": 0}]]},
        "reduce": {"nodes": [[{"op": "max_pool_3x3", "input": 0}, {"op": "skip_connect", "input": 1}],
                             [{"op": "sep_conv_3x3", "input": 2}, {"op": "avg_pool_3x3", "input": 1}]]},
    },
    "network": {"init_channels": 4, "layers": 2, "stem_multiplier": 2, "reduction_cells": [1],
                "input_shape": [8, 8, 1], "num_classes": 10, "stem": "cifar", "auxiliary": False},
}


def test_multiply_adds_of_a_small_network_equal_a_hand_count():
    model = build_network(derived_from_document(SMALL))
    counted = deploy.multiply_adds(lambda x: model(x, training=False), [tf.TensorSpec((1, 8, 8, 1))])
    pixels, reduced = 8 * 8, 4 * 4

    def sep_conv(c, hw):  # twice: depthwise 3x3 then pointwise c -> c
        return 2 * (hw * c * 9 + hw * c * c)

    stem = pixels * 9 * 1 * 8  # 3x3 conv, 1 -> 2 x 4 channels
    # Cell 0 (normal, C=4): both inputs 8 channels -> 1x1 conv to 4; sep_conv; dil_conv (depthwise + pointwise).
    normal = 2 * pixels * 8 * 4 + sep_conv(4, pixels) + (pixels * 4 * 9 + pixels * 4 * 4)
    # Cell 1 (reduction, C=8): inputs 8 channels -> 1x1 conv to 8 at 8x8; the strided skip is a
    # factorized reduce (two 1x1 convs 8 -> 4 at 4x4); sep_conv at 4x4; pools cost none.
    reduction = 2 * pixels * 8 * 8 + 2 * reduced * 8 * 4 + sep_conv(8, reduced)
    classifier = 16 * 10  # two nodes of 8 channels -> 10 classes
    assert counted == stem + normal + reduction + classifier == 32416


def test_multiply_adds_of_darts_v2_at_cifar_size_are_the_published_528_million():
    model = build_network(kd.load_derived("DARTS_V2"), auxiliary=False)
    counted = deploy.multiply_adds(lambda x: model(x, training=False), [tf.TensorSpec((1, 32, 32, 3))])
    assert round(counted / 1e6) == 528  # as reported for DARTS (second order) on CIFAR-10


def test_multiply_adds_of_a_recurrent_cell_count_its_loop_body_per_token():
    derived = kd.load_derived("DARTS_V2_RNN")
    model = build_language_model(derived, embedding_size=16, hidden_size=16, vocabulary_size=50)
    counted = deploy.multiply_adds(lambda t, h: model(t, h, training=False)[0],
                                   [tf.TensorSpec((1, 1), tf.int32), tf.TensorSpec((1, 16))])
    # [x, h] (32) -> 2 x 16 for the first node; 8 nodes of 16 -> 2 x 16; the decoder 16 -> 50.
    assert counted == 32 * 32 + 8 * 16 * 32 + 16 * 50


def test_a_conversion_that_fails_names_the_file_and_the_reason(tmp_path):
    with pytest.raises(ExportVerificationError) as error:
        deploy.write_tflite(str(tmp_path / "no_saved_model"), ["saved_model", "tflite"], str(tmp_path))
    problem = error.value.problems[0]
    assert (problem.source, problem.path) == (str(tmp_path), "model.tflite")
    assert problem.message.startswith("converting it in a fresh process failed: ")
    assert "no_saved_model" in problem.message
    assert not (tmp_path / "model.tflite").exists()


def test_a_conversion_in_a_process_started_early_fails_as_one_started_late(tmp_path):
    with deploy.started_workers(["tflite"]) as workers, pytest.raises(ExportVerificationError) as error:
        deploy.write_tflite(str(tmp_path / "no_saved_model"), ["tflite"], str(tmp_path), workers=workers)
    assert error.value.problems[0].message.startswith("converting it in a fresh process failed: ")
    assert "no_saved_model" in error.value.problems[0].message
    assert workers["convert"].process.returncode == 1
    assert workers["check"].process.returncode == -signal.SIGKILL  # never handed a request: stopped on leaving


# The script a FreshProcess runs: it reads its request's path from standard input once started (``-``).
ECHO = """
import json, sys
sys.path.insert(0, {root!r})
from keras_darts.runtime.litert_worker import request_path
path = request_path(sys.argv[1])
if path:
    request = json.load(open(path))
    open(request["out"], "w").write(request["text"])
    sys.exit(request.get("exit", 0))
"""


def test_a_fresh_process_takes_its_request_from_standard_input_and_is_stopped_if_never_handed_one(tmp_path):
    import os

    code = ECHO.format(root=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    with deploy.FreshProcess(["-c", code]) as process:
        assert process.run({"out": str(tmp_path / "a.txt"), "text": "handed"}) is None
    assert (tmp_path / "a.txt").read_text() == "handed"
    with deploy.FreshProcess(["-c", code]) as process:
        reason = process.run({"out": str(tmp_path / "b.txt"), "text": "x", "exit": "it said no"})
    assert reason == "it said no"
    with deploy.FreshProcess(["-c", code]) as idle:
        pass
    assert idle.process.returncode == -signal.SIGKILL  # stopped, having done nothing


def test_float_tolerance_failure_names_the_file():
    expected = np.zeros((2, 3), np.float32)
    assert deploy.check_float_difference("/x/model.tflite", expected + 5e-5, expected) == pytest.approx(5e-5)
    with pytest.raises(ExportVerificationError) as error:
        deploy.check_float_difference("/x/model.tflite", expected + 2e-4, expected)
    assert str(error.value.problems[0]) == (
        f"/x: model.tflite: differs from the Keras model by {np.float32(2e-4).item()} (expected at most 0.0001)")


def test_without_ai_edge_litert_the_worker_falls_back_to_tensorflows_interpreter(monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # import fails
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    interpreter, name = litert_worker.interpreter_class()
    assert (interpreter, name) == (tf.lite.Interpreter, "tf.lite")


def test_int8_values_round_trip_through_the_quantisation_an_input_states():
    detail = {"dtype": np.int8, "quantization": (1 / 255, -128)}
    values = np.array([0.0, 0.31, 1.0, 1.5], np.float32)
    quantised = litert_worker._quantise(values, detail)
    np.testing.assert_array_equal(quantised, [-128, -49, 127, 127])  # 0.31 * 255 = 79.05 -> 79 steps; 1.5 is clipped
    np.testing.assert_allclose(litert_worker._dequantise(quantised, detail), [0.0, 79 / 255, 1.0, 1.0], atol=1e-7)
    plain = {"dtype": np.float32, "quantization": (0.0, 0)}
    np.testing.assert_array_equal(litert_worker._quantise(values, plain), values)


def test_onnx_without_its_packages_stops_compile_and_search_before_the_search(tmp_path, capsys, monkeypatch):
    import importlib.util

    from keras_darts.runtime.cli import compile_and_search_main
    from keras_darts.spec import dump_yaml
    from tests.conftest import tiny_spec_document

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    document = tiny_spec_document()
    document["export"] = {"formats": ["saved_model", "onnx"]}
    spec = tmp_path / "spec.yaml"
    spec.write_text(dump_yaml(document))
    assert compile_and_search_main([str(spec), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"error: {spec}: $.export.formats: onnx needs tf2onnx, which is not "
                                       "installed; pip install 'keras-darts[onnx]'\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stride", [1, 2])
def test_multiply_adds_of_a_dilated_convolution_count_its_output_positions_only(stride):
    from keras_darts.compiler import build_op

    op = build_op("dil_conv_3x3", 4, stride, affine=True, layer_name="dil")
    counted = deploy.multiply_adds(lambda x: op(x, training=False), [tf.TensorSpec((1, 8, 8, 4))])
    positions = (8 // stride) ** 2
    # The depthwise 3x3 and the pointwise 4 -> 4 at each output position, however TensorFlow lays the dilation out.
    assert counted == positions * 4 * 9 + positions * 4 * 4
